"""The PyTorch twin of the MLX engine (Linux + NVIDIA). Same config, same adapter files."""
