"""Built-in LoRA methods, one module each. Every module here is imported by `load_methods()`."""
