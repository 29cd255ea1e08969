"""Scale benchmark: megacpp against NVIDIA's published Megatron runs on H100 and B200."""
