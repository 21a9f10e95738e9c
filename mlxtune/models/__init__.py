"""MLX model code we own: the Gemma 4 vision and audio towers and the multimodal wrapper around
mlx-lm's text decoder. Tensor names follow the Hugging Face checkpoints."""
