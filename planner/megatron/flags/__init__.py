"""Every flag Megatron-LM's argument parser accepts, per dialect (dumped from add_megatron_arguments)."""
