"""Kernel sources (Metal for Apple GPUs, CUDA for MLX's CUDA back-end) loaded by the MLX backend; see README.md."""
