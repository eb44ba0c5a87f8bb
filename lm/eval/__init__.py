"""Evaluation: perplexity and bits per character of checkpoints."""
