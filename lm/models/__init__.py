"""Flax linen modules. `TransformerLM` is the backbone every head builds on."""

from lm.models.config import TransformerConfig
from lm.models.transformer import TransformerLM
from lm.models.vae import SentenceVAE, VAEConfig

__all__ = ["SentenceVAE", "TransformerConfig", "TransformerLM", "VAEConfig"]
