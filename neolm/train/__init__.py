"""Training: data preparation, architecture presets, and the training loop (one CPU to many GPUs)."""
