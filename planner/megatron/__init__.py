"""The mapping onto Megatron-LM: its flags, and the launch scripts rendered from a plan.

Megatron-LM's command-line flag names appear in this package only.
"""
