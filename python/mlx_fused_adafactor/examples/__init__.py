"""Runnable examples: ``python -m mlx_fused_adafactor.examples.train_lm``."""
