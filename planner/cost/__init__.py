"""What a layout costs: blocks (parameters, FLOPs, activations per block) -> memory, communication
and step (with kernel_rates, the measured kernel tables), every fitted number in coefficients."""
