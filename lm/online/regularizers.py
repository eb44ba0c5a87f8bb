"""Regularizers that keep what a model knew while it trains on new data.

Fine-tuning on a new chunk moves the weights wherever the new loss wants,
erasing earlier skills (catastrophic forgetting). Three classic remedies, each
added to the new-data loss with a weight:

- L2-init: 0.5 * ||params - anchor||^2, a pull towards the weights before
  the chunk (Kumar et al. 2023, "Maintaining Plasticity in Continual Learning
  via Regenerative Regularization"; Li et al. 2018, "Explicit Inductive Bias
  for Transfer Learning", L2-SP).
- EWC: the same pull, weighted per weight by its diagonal Fisher information,
  so weights the old data depends on move least (Kirkpatrick et al. 2017,
  "Overcoming catastrophic forgetting in neural networks").
- Distillation: keep the outputs, not the weights, close to the old model's
  ("Learning without Forgetting", Li & Hoiem 2017; Hinton et al. 2015).

All functions are pure JAX and jit-friendly; every loss is a float32 scalar
whatever the parameters' dtype, so bfloat16 params do not lose the small
differences the penalties are made of.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from lm.models.losses import distillation_kl

# Floor of the Fisher mean in `normalize_fisher`: an all-zero Fisher stays zero
# instead of becoming NaN.
_MIN_FISHER_MEAN = 1e-30


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _tree_sum(tree: Any) -> jax.Array:
  return sum((jnp.sum(leaf) for leaf in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))


def l2_init_penalty(params: Any, anchor: Any) -> jax.Array:
  """0.5 * sum over all leaves of (params - anchor)^2, a scalar float32.

  params, anchor: pytrees of the same structure and shapes (anchor = the
  parameters before the chunk; pass it through `jax.lax.stop_gradient` or as
  a non-differentiated argument).
  """
  return 0.5 * _tree_sum(jax.tree.map(lambda p, a: jnp.square(_f32(p) - _f32(a)), params, anchor))


def ewc_penalty(params: Any, anchor: Any, fisher: Any) -> jax.Array:
  """0.5 * sum fisher * (params - anchor)^2 (EWC, diagonal Fisher), a scalar float32.

  fisher: a pytree like params, e.g. from `diagonal_fisher` (optionally
  `normalize_fisher`ed) on the old data, at `anchor`.
  """
  return 0.5 * _tree_sum(
      jax.tree.map(lambda p, a, f: _f32(f) * jnp.square(_f32(p) - _f32(a)), params, anchor, fisher))


def diagonal_fisher(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batches: Iterable[Any]) -> Any:
  """Empirical diagonal Fisher: the mean over batches of grad(loss_fn)(params, batch)^2.

  loss_fn(params, batch) -> the scalar mean loss of one batch. Returns a
  float32 pytree like params. The gradient is of the batch's mean loss, so
  this is the squared batch gradient, a cheap stand-in for the per-example
  Fisher: its scale shrinks with the batch size (by up to 1/batch_size where
  gradient noise dominates), which `normalize_fisher` removes. Runs one jitted
  gradient function (compiled once per batch shape).
  """
  grad_fn = jax.jit(jax.grad(loss_fn))

  @jax.jit
  def accumulate(total: Any, grads: Any) -> Any:
    return jax.tree.map(lambda t, g: t + jnp.square(_f32(g)), total, grads)

  total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  count = 0
  for batch in batches:
    total = accumulate(total, grad_fn(params, batch))
    count += 1
  if count == 0:
    raise ValueError("diagonal_fisher got no batches; pass a non-empty iterable of batches of the old data.")
  return jax.tree.map(lambda t: t / count, total)


def normalize_fisher(fisher: Any) -> Any:
  """Scales `fisher` so the mean over all its entries is 1.

  The raw Fisher's scale depends on the model size, the loss, the batch size
  and how well the model fits, so an EWC weight tuned for one model means
  nothing for another; after normalization, `ewc_penalty` with weight lambda
  is lambda times an L2-init penalty of the same average strength, reweighted
  towards the weights the old data needs. An all-zero Fisher stays zero.
  """
  leaves = jax.tree.leaves(fisher)
  entries = sum(jnp.size(leaf) for leaf in leaves)
  mean = _tree_sum(jax.tree.map(_f32, fisher)) / max(entries, 1)
  scale = 1.0 / jnp.maximum(mean, _MIN_FISHER_MEAN)
  return jax.tree.map(lambda f: _f32(f) * scale, fisher)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0,
                      mask: jax.Array | None = None) -> jax.Array:
  """Mean over tokens of KL(softmax(teacher / T) || softmax(student / T)) * T^2, a scalar float32.

  student_logits, teacher_logits: [batch, length, vocab]; the teacher gets
  no gradient. The T^2 keeps the gradient's scale independent of T (Hinton
  et al. 2015). mask: [batch, length] or [batch] (1 / True = include; e.g.
  `is_replay` to distill only on replayed rows); the mean is over included
  tokens, and 0 if there are none. Each token's KL is clamped at 0 (rounding
  can take it just below), so the loss is >= 0 exactly, and 0 when teacher
  and student agree.
  """
  kl = distillation_kl(student_logits, teacher_logits, temperature)  # [batch, length], T^2 included
  if mask is None:
    weights = jnp.ones_like(kl)
  else:
    mask = _f32(mask)
    if mask.ndim == 1:
      mask = mask[:, None]
    weights = jnp.broadcast_to(mask, kl.shape)
  return jnp.sum(kl * weights) / jnp.maximum(jnp.sum(weights), 1.0)
