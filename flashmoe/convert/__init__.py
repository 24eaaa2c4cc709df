"""Producers of a model directory: Hugging Face / MLX checkpoints (checkpoint.py) and synthetic models with
real shapes (synth.py). Each writes through flashmoe.format's one writer."""
