"""Target-LoRA training: the pure step here, the Ray Train + DeepSpeed shell beside it."""
