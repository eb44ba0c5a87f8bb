"""Sequence classifier: the Transformer LM's hidden states, pooled, then a linear layer to class logits.

  tokens [batch, length] -> TransformerLM(return_hidden) [batch, length, width]
         -> pool over the sentence's positions (mask)      [batch, width]
         -> dropout -> Dense                               [batch, num_classes]

The backbone (params key "lm") has the LM's layout (embed, position table,
blocks, final norm), so a head="lm" checkpoint on the same tokenizer fills it
as it is (init-from): only the small "classify" layer starts from scratch.
Attention is causal, as in the LM, or bidirectional (`attention`), which a
classifier trained from scratch gains from: every token reads the whole
sentence (padding is masked as a key). Pooling:

  mean: the mean of the final-norm hidden states over the sentence's tokens
        (BOS ... EOS), robust when the model has not learned to summarize;
  max:  their per-feature maximum over those tokens (Conneau et al. 2017);
  last: the hidden state at the last token (EOS), which in a causal model is
        the only position that has read the whole sentence (GPT-style).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lm.models.layers import Projection, add_learned_positions, make_norm, token_embedding
from lm.models.transformer import TransformerConfig, apply_blocks

POOLINGS = ("mean", "max", "last")
ATTENTIONS = ("causal", "bidirectional")


class Backbone(nn.Module):
  """The LM's layers up to the final norm: tokens [batch, length] -> hidden [batch, length, width].

  Parameter names are TransformerLM's, so an LM checkpoint restores into it.
  """

  config: TransformerConfig
  causal: bool = True

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
    cfg = self.config
    batch, length = tokens.shape
    tokens = nn.with_logical_constraint(tokens, ("batch", "length"))
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    x = add_learned_positions(self, cfg, token_embedding(cfg)(tokens), positions)
    x = nn.Dropout(rate=cfg.dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    # Causal: padding comes after the sentence, so no real token attends to it. Bidirectional: mask it as a key.
    key_mask = None if self.causal else mask.astype(bool)
    x = apply_blocks(cfg, x, positions, decode=False, deterministic=deterministic, causal=self.causal,
                     key_mask=key_mask)
    return make_norm(cfg, "final_norm")(x)


def pool(hidden: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
  """hidden [batch, length, width], mask [batch, length] (1 on the sentence's tokens) -> [batch, width].

  Rows with an all-zero mask (evaluation padding) pool to zeros.
  """
  mask = mask.astype(hidden.dtype)
  if pooling == "mean":
    total = jnp.einsum("bld,bl->bd", hidden, mask)
    return total / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
  if pooling == "max":  # per feature, over the sentence's positions (InferSent's choice for sentence encoders)
    has_tokens = jnp.sum(mask, axis=-1, keepdims=True) > 0
    picked = jnp.max(jnp.where(mask[:, :, None] > 0, hidden, jnp.finfo(hidden.dtype).min), axis=1)
    return jnp.where(has_tokens, picked, 0.0)
  if pooling == "last":
    last = jnp.maximum(jnp.sum(mask, axis=-1).astype(jnp.int32) - 1, 0)  # [batch]
    picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return picked * (jnp.sum(mask, axis=-1, keepdims=True) > 0)
  raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}.")


class TransformerClassifier(nn.Module):
  """Class logits [batch, num_classes] (float32) for token sequences [batch, length] and their mask."""

  config: TransformerConfig
  num_classes: int
  pooling: str = "mean"
  attention: str = "causal"

  def setup(self):
    if self.num_classes < 2:
      raise ValueError(f"A classifier needs at least 2 classes (got {self.num_classes}).")
    if self.pooling not in POOLINGS:
      raise ValueError(f"config.classifier.pooling={self.pooling!r} is not one of {POOLINGS}.")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"config.classifier.attention={self.attention!r} is not one of {ATTENTIONS}.")
    self.lm = Backbone(self.config, causal=self.attention == "causal")
    self.classify = Projection((self.num_classes,), ("embed", "classes"), use_bias=True,
                                      std=self.config.init_std, dtype=self.config.compute_dtype,
                                      param_dtype=self.config.weight_dtype)
    self.dropout = nn.Dropout(rate=self.config.dropout)

  def __call__(self, tokens: jax.Array, mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
    hidden = self.lm(tokens, mask, deterministic=deterministic)
    pooled = pool(hidden, mask, self.pooling)
    pooled = self.dropout(pooled, deterministic=deterministic)
    return self.classify(pooled).astype(jnp.float32)


def classification_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array, *, label_smoothing: float = 0.0,
                        class_weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Weighted mean cross-entropy and the per-row losses.

  logits: [batch, classes]; labels: [batch] int; valid: [batch] (0 on padding rows);
  class_weights: [classes] or None. The mean is sum_i w_{y_i} l_i / sum_i w_{y_i}
  over valid rows, so class weights re-balance classes without changing the
  loss scale. Label smoothing mixes the one-hot target with the uniform
  distribution: (1 - s) * onehot + s / classes.
  """
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  row_loss = optax.softmax_cross_entropy(logits, targets)  # [batch]
  weights = valid.astype(jnp.float32)
  if class_weights is not None:
    weights = weights * class_weights[labels]
  return jnp.sum(row_loss * weights) / jnp.maximum(jnp.sum(weights), 1e-9), row_loss
