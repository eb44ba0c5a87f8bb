"""Cross-entropy of the output projection without the full-vocabulary logits.

A language model's last matmul, hidden [batch, length, embed] @ table ->
logits [batch, length, vocab], followed by the softmax cross-entropy, is the
largest activation of a small-width, large-vocabulary model: GPT-2 small at
batch 16 x 1024 holds 16,384 x 50,304 float32 logits, 3.3 GB, plus their
bfloat16 copy and gradient. `fused_loss_sum` computes the same loss over
chunks of positions (`chunk_len` at a time), so only one chunk's logits
[batch, chunk_len, vocab] exist at once.

The gradient is computed in the same pass (the fused linear cross-entropy of
Liger-Kernel, Hsu et al. 2024): each chunk's d loss / d logits = (softmax -
one-hot) x weight is multiplied into d hidden and accumulated into d table
(float32) right away, and the backward pass only scales them by the incoming
cotangent. No logits are recomputed, so the matmul FLOPs equal the plain
path's (forward 1, backward 2 per chunk), and the saved residuals are d hidden
[batch, length, embed] and d table (the table's size).

The weights [batch, length] say what each position counts for (the mask of
sentence examples, 1 elsewhere); the result is sum(weights x token loss), a
scalar, which is what makes the gradient computable up front: a scalar
cotangent scales it.

`token_losses` is the forward alone, per position [batch, length], for
evaluation.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def chunk_length(length: int, chunk_len: int) -> int:
  """The largest divisor of `length` that is <= chunk_len (the chunks must tile the sequence)."""
  chunk_len = max(1, min(chunk_len, length))
  while length % chunk_len:
    chunk_len -= 1
  return chunk_len


def _chunks(x: jax.Array, size: int) -> jax.Array:
  """[batch, length, ...] -> [length // size, batch, size, ...] (chunks first, for lax.scan)."""
  batch, length = x.shape[:2]
  return jnp.moveaxis(x.reshape((batch, length // size, size) + x.shape[2:]), 1, 0)


def _unchunk(x: jax.Array) -> jax.Array:
  """Inverse of `_chunks`."""
  chunks, batch, size = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape((batch, chunks * size) + x.shape[3:])


# The logit of a padding id: exp() of it is 0 next to any real logit, and unlike -inf it keeps 0 * logit finite.
PADDING_LOGIT = -1e9


def mask_padding(logits: jax.Array, valid_vocab: int | None) -> jax.Array:
  """logits [..., vocab] with the ids >= valid_vocab (vocabulary padding) at -1e9: they get no probability."""
  if valid_vocab is None or valid_vocab >= logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, jnp.asarray(PADDING_LOGIT, logits.dtype))


def _logits(hidden: jax.Array, table: jax.Array, vocab_major: bool, valid_vocab: int | None) -> jax.Array:
  """hidden [batch, chunk, embed] x table -> float32 logits [batch, chunk, vocab] (float32 accumulation).

  vocab_major: table is [vocab, embed] (a tied embedding) rather than [embed, vocab].
  """
  spec = "bce,ve->bcv" if vocab_major else "bce,ev->bcv"
  logits = jnp.einsum(spec, hidden, table, preferred_element_type=jnp.float32)
  return mask_padding(nn.with_logical_constraint(logits, ("batch", "length", "vocab")), valid_vocab)


def _chunk_loss(hidden: jax.Array, table: jax.Array, targets: jax.Array, vocab_major: bool,
                valid_vocab: int | None):
  """Per-position loss [batch, chunk], logits [batch, chunk, vocab] and log-partition [batch, chunk]."""
  logits = _logits(hidden, table, vocab_major, valid_vocab)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target_logit, logits, log_z


def token_losses(hidden: jax.Array, table: jax.Array, targets: jax.Array, *, vocab_major: bool,
                 chunk_len: int = 128, valid_vocab: int | None = None) -> jax.Array:
  """Per-position cross-entropy [batch, length] float32, chunk by chunk; forward only (evaluation).

  hidden: [batch, length, embed] (the final norm's output); table: the output
  projection, [vocab, embed] when vocab_major (tied embedding) else [embed,
  vocab], cast to hidden's dtype; targets: [batch, length] int32;
  valid_vocab: ids from here on are vocabulary padding (`mask_padding`),
  None: there is none.
  """
  size = chunk_length(hidden.shape[1], chunk_len)
  table = table.astype(hidden.dtype)

  def one(args):
    chunk_hidden, chunk_targets = args
    return _chunk_loss(chunk_hidden, table, chunk_targets, vocab_major, valid_vocab)[0]

  return _unchunk(jax.lax.map(one, (_chunks(hidden, size), _chunks(targets, size))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def fused_loss_sum(hidden: jax.Array, table: jax.Array, targets: jax.Array, weights: jax.Array,
                   vocab_major: bool, chunk_len: int = 128, valid_vocab: int | None = None) -> jax.Array:
  """sum(weights x cross-entropy) of hidden @ table against targets, a float32 scalar.

  hidden: [batch, length, embed] in the compute dtype; table: the output
  projection's parameter as stored (float32 master weights; it is cast to
  hidden's dtype for the matmuls, and its gradient is accumulated in float32
  and returned in its own dtype); targets: [batch, length] int32; weights:
  [batch, length] float32; valid_vocab: as in `token_losses`. See the module doc.
  """
  losses = token_losses(hidden, table, targets, vocab_major=vocab_major, chunk_len=chunk_len,
                        valid_vocab=valid_vocab)
  return jnp.sum(losses * weights)


def _fused_forward(hidden, table, targets, weights, vocab_major, chunk_len, valid_vocab):
  size = chunk_length(hidden.shape[1], chunk_len)
  compute_table = table.astype(hidden.dtype)
  grad_shape = table.shape

  def step(grad_table, args):
    chunk_hidden, chunk_targets, chunk_weights = args
    losses, logits, log_z = _chunk_loss(chunk_hidden, compute_table, chunk_targets, vocab_major, valid_vocab)
    # d(sum w * loss) / d logits = w * (softmax - onehot), in float32, then the matmuls in the compute dtype.
    probs = jnp.exp(logits - log_z[..., None])
    onehot = jax.nn.one_hot(chunk_targets, logits.shape[-1], dtype=jnp.float32)
    d_logits = ((probs - onehot) * chunk_weights[..., None]).astype(hidden.dtype)
    d_logits = nn.with_logical_constraint(d_logits, ("batch", "length", "vocab"))
    if vocab_major:
      d_hidden = jnp.einsum("bcv,ve->bce", d_logits, compute_table)
      d_table = jnp.einsum("bcv,bce->ve", d_logits, chunk_hidden, preferred_element_type=jnp.float32)
    else:
      d_hidden = jnp.einsum("bcv,ev->bce", d_logits, compute_table)
      d_table = jnp.einsum("bcv,bce->ev", d_logits, chunk_hidden, preferred_element_type=jnp.float32)
    return grad_table + d_table, (jnp.sum(losses * chunk_weights), d_hidden.astype(hidden.dtype))

  grad_table, (loss_sums, d_hidden) = jax.lax.scan(
      step, jnp.zeros(grad_shape, jnp.float32),
      (_chunks(hidden, size), _chunks(targets, size), _chunks(weights.astype(jnp.float32), size)))
  return jnp.sum(loss_sums), (_unchunk(d_hidden), grad_table.astype(table.dtype))


def _fused_backward(vocab_major, chunk_len, valid_vocab, residuals, cotangent):
  del vocab_major, chunk_len, valid_vocab
  d_hidden, d_table = residuals
  # The targets are integers and the weights a mask: neither is differentiated (None: zero cotangent).
  return (cotangent * d_hidden).astype(d_hidden.dtype), (cotangent * d_table).astype(d_table.dtype), None, None


fused_loss_sum.defvjp(_fused_forward, _fused_backward)


def output_table(params: Any, tie_embeddings: bool) -> tuple[jax.Array, bool]:
  """The output projection of a TransformerLM's params and whether it is [vocab, embed] (tied)."""
  if tie_embeddings:
    return params["embed"]["embedding"], True
  return params["unembed"]["kernel"], False
