"""What a layout costs: parameters and activations per block, memory, communication and step time."""
