"""Training engine: config, trainer, checkpoints, metrics."""
