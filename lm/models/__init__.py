"""Flax linen modules. `TransformerLM` is the backbone every head builds on."""

from lm.models.transformer import TransformerConfig, TransformerLM

__all__ = ["TransformerConfig", "TransformerLM"]
