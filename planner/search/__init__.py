"""The layout space: Megatron's rules, the search over them, the stage split and the rank map."""
