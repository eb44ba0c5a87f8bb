"""The online loss (regularizers) on the engine's step, the per-chunk learning rate, per-sequence evaluation.

The online loop sets the learning rate itself (a schedule per chunk), so the
step takes it as an input and the optimizer is AdamW's update direction
without a learning rate (`lm.train.optim.make_update_direction`). The
regularizers pull toward `anchor`, the weights before the chunk:

  loss = cross-entropy
       + l2_init * 0.5 * |params - anchor|^2                  (L2-init)
       + ewc * 0.5 * sum fisher * (params - anchor)^2          (EWC)
       + distill * KL(anchor's predictions || params') on replay rows  (LwF)

A preference chunk's step (`make_online_preference_step`) is DPO against the
served model, plus the language model's loss on replayed text:

  loss = DPO(pairs; reference = the served model) + cross-entropy(replayed windows)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lm.models.losses import cross_entropy, lm_loss_sum
from lm.models.preference import pair_logprobs, pair_weights, preference_loss
from lm.online import regularizers
from lm.train import privacy as privacy_lib
from lm.train import step as step_lib

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


def make_online_loss(model: nn.Module, reg: Regularization) -> step_lib.LossFn:
  """The online loss as the engine's loss function (`lm.train.step`), reported as train/total_loss.

  The step is called with inputs {"lr", "anchor", "fisher"} (anchor and fisher
  params-shaped pytrees, or () when no regularizer needs them) and a batch
  {'inputs', 'targets': [batch, length] int32, 'is_replay': [batch] bool}.
  The cross-entropy is the language model's (fused with the output projection
  when the model says so), except with distillation, which needs the full
  logits; every term adds up exactly over micro-batches.
  """
  deterministic = model.config.dropout == 0.0

  def loss_fn(params, batch, ctx):
    anchor, fisher = ctx.inputs["anchor"], ctx.inputs["fisher"]
    logits = None
    if reg.distill:
      logits = model.apply({"params": params}, batch["inputs"], deterministic=deterministic, rngs={"dropout": ctx.rng})
      loss_sum, _ = cross_entropy(logits, batch["targets"])
    else:
      loss_sum, _ = lm_loss_sum(model, params, batch, deterministic=deterministic, rng=ctx.rng)
    ce = ctx.mean(loss_sum, "tokens")
    terms = {}
    if reg.l2_init:
      terms["l2_init"] = regularizers.l2_init_penalty(params, anchor) * ctx.share
    if reg.ewc:
      terms["ewc"] = regularizers.ewc_penalty(params, anchor, fisher) * ctx.share
    if reg.distill:
      teacher = model.apply({"params": anchor}, batch["inputs"], deterministic=True)
      mask = jnp.broadcast_to(batch["is_replay"][:, None], batch["targets"].shape).astype(jnp.float32)
      mean = regularizers.distillation_loss(logits, teacher, temperature=reg.distill_temperature, mask=mask)
      terms["distill"] = mean * jnp.sum(mask) / jnp.maximum(ctx.totals["replay_tokens"], 1.0)
    weights = {"l2_init": reg.l2_init, "ewc": reg.ewc, "distill": reg.distill}
    total = ce + sum(weights[name] * value for name, value in terms.items())
    replay_rows = jnp.sum(batch["is_replay"].astype(jnp.float32))
    return total, {"loss": ce, "replay_rows": replay_rows, **terms}

  return loss_fn


def loss_totals(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The online batch's target tokens and replayed target tokens."""
  replay = jnp.sum(batch["is_replay"].astype(jnp.float32)) * batch["targets"].shape[1]
  return {"tokens": jnp.asarray(batch["targets"].size, jnp.float32), "replay_tokens": replay}


def make_online_step(model: nn.Module, direction: optax.GradientTransformation, reg: Regularization,
                     grad_accum_steps: int = 1, privacy: privacy_lib.DpSgd | None = None) -> Callable:
  """`step(state, batch, {"lr", "anchor", "fisher"}) -> (state, metrics)`: the engine's step with the online loss.

  privacy: DP-SGD's (a private run, lm.online.privacy): each row's online loss is clipped on its own, the batch
  carries 'dp_real' and the inputs "dp_expected_rows", the chunk's divisor of the noisy sum."""
  return step_lib.make_train_step(step_lib.Update(make_online_loss(model, reg), loss_name="total_loss"), direction,
                                  lr_from_inputs=True, grad_accum_steps=grad_accum_steps, loss_totals=loss_totals,
                                  privacy=privacy)


def make_online_preference_loss(model: nn.Module, *, beta: float, label_smoothing: float, kind: str
                                ) -> step_lib.LossFn:
  """The loss of a preference chunk's step (`lm.models.preference`), against the served model, with replay.

  The step is called with inputs {"lr", "reference"} (the served model's params, frozen for the chunk) and
  a batch of pair rows and replayed rows, each as a pair (`lm.data.pairs`' keys) plus 'is_replay' [batch]:
  a replayed window is its chosen side (mask all 1) with an empty rejected side. The loss is the DPO loss's
  mean over the pair rows plus the language model's mean token loss over the replayed rows (what keeps the
  model's text knowledge while it learns preferences), both exact over micro-batches.
  """

  def loss_fn(params, batch, ctx):
    replay = batch["is_replay"].astype(jnp.float32)
    pairs = pair_weights(batch) * (1.0 - replay)
    policy_chosen, policy_rejected = pair_logprobs(model, params, batch)
    reference_chosen, reference_rejected = jax.lax.stop_gradient(pair_logprobs(model, ctx.inputs["reference"], batch))
    losses, figures = preference_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=beta,
                                      label_smoothing=label_smoothing, kind=kind)
    mean = lambda values: ctx.mean(jnp.sum(values * pairs), "pairs")  # noqa: E731
    dpo = mean(losses)
    replay_loss = ctx.mean(-jnp.sum(policy_chosen * replay), "replay_tokens")
    return dpo + replay_loss, {"loss": dpo, "replay_loss": replay_loss, "accuracy": mean(figures["correct"]),
                               "margin": mean(figures["margin"]), "replay_rows": jnp.sum(replay)}

  return loss_fn


def preference_loss_totals(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """A preference batch's pair rows and replayed target tokens."""
  replay = batch["is_replay"].astype(jnp.float32)
  return {"pairs": jnp.sum(pair_weights(batch) * (1.0 - replay)),
          "replay_tokens": jnp.sum(jnp.sum(batch["chosen_mask"].astype(jnp.float32), axis=-1) * replay)}


def make_online_preference_step(model: nn.Module, direction: optax.GradientTransformation, *, beta: float,
                                label_smoothing: float, kind: str, grad_accum_steps: int = 1) -> Callable:
  """`step(state, batch, {"lr", "reference"}) -> (state, metrics)`: the engine's step with the preference loss."""
  loss_fn = make_online_preference_loss(model, beta=beta, label_smoothing=label_smoothing, kind=kind)
  return step_lib.make_train_step(step_lib.Update(loss_fn, loss_name="total_loss"), direction, lr_from_inputs=True,
                                  grad_accum_steps=grad_accum_steps, loss_totals=preference_loss_totals)


def make_preference_margins(model: nn.Module) -> Callable[[Any, Batch], jax.Array]:
  """`margins(params, batch) -> [batch]`: log p(chosen) - log p(rejected) of each pair (the model's own ranking)."""

  def margins(params: Any, batch: Batch) -> jax.Array:
    chosen, rejected = pair_logprobs(model, params, batch)
    return chosen - rejected

  return margins


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
