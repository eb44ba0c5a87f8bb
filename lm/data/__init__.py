"""Data: sources, tokenizers and input pipelines."""
