"""Flax linen modules. `TransformerLM` is the backbone every head builds on."""

from lm.models.transformer import TransformerConfig, TransformerLM
from lm.models.vae import SentenceVAE, VAEConfig

__all__ = ["SentenceVAE", "TransformerConfig", "TransformerLM", "VAEConfig"]
