"""dpfl-bench: benchmark differentially private federated fine-tuning of large models with LoRA."""

__version__ = "0.7.0"
