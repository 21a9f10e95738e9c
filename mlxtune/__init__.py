"""mlxtune: LoRA fine-tuning on Apple Silicon with MLX. Importing this pulls in nothing heavy."""

__version__ = "0.1.0"
