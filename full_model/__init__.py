"""Reference 3D-parallel training step, Megatron-DeepSpeed job scripts and log parsing."""
