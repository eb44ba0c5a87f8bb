"""The language model's token cross-entropy: through the full logits, or fused with the output projection.

`lm_loss_sum` (training) and `lm_token_losses` (evaluation) pick the path the
model's `loss_impl` says for the batch's shape (`TransformerConfig.fused_loss`):
the full [batch, length, vocab] float32 logits and optax's cross-entropy, or
`lm.models.fused_loss`, which never builds them (same value; the gradient is
computed chunk by chunk).

A batch of windows that pack several documents (`data.document_mask`) also
carries "segment_ids" and "positions" [batch, length], handed to the model
(`TransformerLM`), and a "mask" that leaves out the targets that begin a new
document; both paths weight by the mask.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lm.models.fused_loss import fused_loss_sum, output_table, token_losses

Batch = dict[str, jax.Array]
# The batch keys that go to the model beside its inputs (packed documents), as `TransformerLM`'s keyword args.
DOCUMENT_KEYS = ("positions", "segment_ids")


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Summed token cross-entropy and token count.

  logits: [batch, length, vocab] float32; targets: [batch, length] int32;
  mask: [batch, length] (1 where a target counts: sentence examples, or packed windows
  without the targets that begin a new document), None for all.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if mask is None:
    return losses.sum(), jnp.asarray(losses.size, jnp.float32)
  mask = mask.astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


def distillation_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Per token, T^2 * KL(softmax(teacher / T) || softmax(student / T)), float32 [batch, length].

  The soft-target term of knowledge distillation (Hinton et al. 2015): the
  T^2 keeps its gradient's scale independent of T. The teacher gets no
  gradient. Classes the teacher gives probability 0 (-inf or padded logits)
  add 0, not 0 * inf; each token's KL is clamped at 0, because two nearly
  equal distributions computed by separately compiled passes can round its
  sum just below, so the term is >= 0 exactly and 0 when the two agree.
  Shared by the distillation task (`lm.tasks.distill`) and the online loop's
  LwF regularizer (`lm.online.regularizers.distillation_loss`).
  """
  if temperature <= 0:
    raise ValueError(f"temperature is {temperature}; pass a temperature > 0 (1 = the plain distributions).")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} differ; "
                     "run both models on the same inputs (and the same vocabulary).")
  teacher_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature, axis=-1)
  student_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  teacher_p = jnp.exp(teacher_logp)
  kl = jnp.sum(jnp.where(teacher_p > 0, teacher_p * (teacher_logp - student_logp), 0.0), axis=-1)
  return jnp.maximum(kl, 0.0) * temperature**2


def lm_loss_sum(model: nn.Module, params: Any, batch: Batch, *, deterministic: bool = True,
                rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """A TransformerLM's summed token cross-entropy and token count on a batch (see `cross_entropy`).

  Through the full logits, or through `fused_loss_sum` without
  them when the model's `loss_impl` says so for this batch's shape (same
  value; the gradient is computed chunk by chunk). The batch's "positions"
  and "segment_ids", where it has them, go to the model (module doc).
  """
  cfg = model.config
  mask = batch.get("mask")
  out, table = _lm_forward(model, params, batch["inputs"], deterministic, rng, **document_args(batch))
  if table is None:
    return cross_entropy(out, batch["targets"], mask)
  weights = jnp.ones(batch["targets"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  loss_sum = fused_loss_sum(out, table[0], batch["targets"], weights, table[1], cfg.loss_chunk_len,
                                       cfg.valid_vocab_size)
  return loss_sum, jnp.sum(weights)


def lm_token_losses(model: nn.Module, params: Any, inputs: jax.Array, targets: jax.Array, *,
                    positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
  """A TransformerLM's per-token cross-entropy [batch, length] (evaluation; fused like `lm_loss_sum`).

  inputs, targets: [batch, length] int32; positions, segment_ids: [batch,
  length] int32 of windows that pack several documents, None otherwise.
  """
  cfg = model.config
  out, table = _lm_forward(model, params, inputs, positions=positions, segment_ids=segment_ids)
  if table is None:
    return optax.softmax_cross_entropy_with_integer_labels(out, targets)
  return token_losses(out, table[0], targets, vocab_major=table[1], chunk_len=cfg.loss_chunk_len,
                                 valid_vocab=cfg.valid_vocab_size)


def document_args(batch: Batch) -> dict[str, jax.Array]:
  """The batch's "positions" and "segment_ids" (packed documents) that it has, as the model's keyword args."""
  return {key: batch[key] for key in DOCUMENT_KEYS if batch.get(key) is not None}


def _lm_forward(model: nn.Module, params: Any, inputs: jax.Array, deterministic: bool = True,
                rng: jax.Array | None = None, *, positions: jax.Array | None = None,
                segment_ids: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, bool] | None]:
  """(logits, None), or (final hidden states, (output table, vocab_major)) where the model's loss_impl
  fuses the loss for this [batch, length] (`TransformerConfig.fused_loss`)."""
  cfg = model.config
  fused = cfg.fused_loss(*inputs.shape, devices=jax.device_count())
  # Only what is given, so a plain batch calls the model exactly as before.
  documents = document_args({"positions": positions, "segment_ids": segment_ids})
  out = model.apply({"params": params}, inputs, deterministic=deterministic,
                    rngs={"dropout": rng} if rng is not None else {}, return_hidden=fused, **documents)
  return out, output_table(params, cfg.tie_embeddings) if fused else None
