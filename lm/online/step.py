"""The online train step (learning rate per call, regularizers) and per-sequence evaluation.

The online loop sets the learning rate itself (a schedule per chunk), so the
step takes it as an argument and the optimizer is AdamW's update direction
without a learning rate (`lm.train.optim.make_update_direction`). The
regularizers pull toward `anchor`, the weights before the chunk:

  loss = cross-entropy
       + l2_init * 0.5 * |params - anchor|^2                  (L2-init)
       + ewc * 0.5 * sum fisher * (params - anchor)^2          (EWC)
       + distill * KL(anchor's predictions || params') on replay rows  (LwF)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lm.online import regularizers
from lm.train.state import TrainState
from lm.models.losses import cross_entropy

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Regularization:
  l2_init: float = 0.0
  ewc: float = 0.0
  distill: float = 0.0
  distill_temperature: float = 1.0

  @property
  def needs_anchor(self) -> bool:
    return bool(self.l2_init or self.ewc or self.distill)

  @classmethod
  def from_config(cls, online: Any) -> Regularization:
    return cls(float(online.l2_init), float(online.ewc), float(online.distill), float(online.distill_temperature))


def make_online_step(model: nn.Module, direction: optax.GradientTransformation,
                     reg: Regularization) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Builds `step(state, batch, lr, anchor, fisher) -> (state, metrics)`.

  batch: {'inputs', 'targets': [batch, length] int32, 'is_replay': [batch] bool}.
  `anchor` and `fisher` are params-shaped pytrees, or () when no regularizer needs them.
  """
  deterministic = model.config.dropout == 0.0

  def loss_fn(params, batch, rng, anchor, fisher):
    logits = model.apply({"params": params}, batch["inputs"], deterministic=deterministic, rngs={"dropout": rng})
    loss_sum, count = cross_entropy(logits, batch["targets"])
    ce = loss_sum / count
    terms = {}
    if reg.l2_init:
      terms["l2_init"] = regularizers.l2_init_penalty(params, anchor)
    if reg.ewc:
      terms["ewc"] = regularizers.ewc_penalty(params, anchor, fisher)
    if reg.distill:
      teacher = model.apply({"params": anchor}, batch["inputs"], deterministic=True)
      terms["distill"] = regularizers.distillation_loss(
          logits, teacher, temperature=reg.distill_temperature,
          mask=jnp.broadcast_to(batch["is_replay"][:, None], batch["targets"].shape))
    weights = {"l2_init": reg.l2_init, "ewc": reg.ewc, "distill": reg.distill}
    total = ce + sum(weights[name] * value for name, value in terms.items())
    return total, (ce, terms)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: Batch, lr: jax.Array, anchor: Any, fisher: Any):
    rng = jax.random.fold_in(state.key, state.step)
    (total, (ce, terms)), grads = grad_fn(state.params, batch, rng, anchor, fisher)
    direction_update, opt_state = direction.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: -lr * u, direction_update)
    params = optax.apply_updates(state.params, updates)
    metrics = {"train/loss": ce, "train/total_loss": total, "train/grad_norm": optax.global_norm(grads),
               "train/lr": lr, "train/replay_rows": jnp.sum(batch["is_replay"].astype(jnp.float32))}
    metrics.update({f"train/{name}": value for name, value in terms.items()})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_sequence_losses(model: nn.Module) -> Callable[[Any, Batch], jax.Array]:
  """`losses(params, batch) -> [batch]`: each sequence's mean token loss (for paired comparisons)."""

  def losses(params: Any, batch: Batch) -> jax.Array:
    logits = model.apply({"params": params}, batch["inputs"], deterministic=True)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    return per_token.mean(axis=-1)

  return losses


def chunk_learning_rate(step_in_chunk: int, steps_in_chunk: int, chunk_index: int, *, lr: float, min_lr: float,
                        warmup_steps: int, schedule: str) -> float:
  """The online learning rate at a step of a chunk (chunk_index counts from 0).

  `rewarm` (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually
  Pre-train LLMs"): every chunk warms up linearly to `lr` and decays to
  `min_lr` by a cosine over the chunk. `constant` ("infinite" schedule without
  its final cooldown): warm up once, in the first chunk, then stay at `lr`.
  """
  warmup = max(int(warmup_steps), 0)
  if schedule == "constant":
    if chunk_index == 0 and step_in_chunk < warmup:
      return lr * (step_in_chunk + 1) / warmup
    return lr
  if step_in_chunk < warmup:
    return lr * (step_in_chunk + 1) / warmup
  span = max(steps_in_chunk - warmup, 1)
  progress = min((step_in_chunk - warmup) / span, 1.0)
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
