"""Optax optimizer and learning-rate schedule from the `optim` config group."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import optax


def learning_rate_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then decay to `min_lr` at `decay_steps` (default: total steps).

  `schedule` is "cosine" (nanoGPT, Chinchilla), "linear", or "constant" (no decay).
  """
  warmup = int(optim["warmup_steps"])
  decay_steps = int(optim.get("decay_steps") or total_steps)
  lr, min_lr = float(optim["lr"]), float(optim["min_lr"])
  kind = optim.get("schedule", "cosine")
  warmup_fn = optax.linear_schedule(0.0, lr, max(warmup, 1))
  remaining = max(decay_steps - warmup, 1)
  if kind == "cosine":
    decay_fn = optax.cosine_decay_schedule(lr, remaining, alpha=min_lr / lr if lr else 0.0)
  elif kind == "linear":
    decay_fn = optax.linear_schedule(lr, min_lr, remaining)
  elif kind == "constant":
    decay_fn = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optim.schedule={kind!r} is not one of ('cosine', 'linear', 'constant').")
  return optax.join_schedules([warmup_fn, decay_fn], [warmup])


EMBEDDING_NAMES = ("embedding", "position_embedding")


def decay_mask(params: Any, decay_embeddings: bool = True) -> Any:
  """Weight decay on matrices only, not on biases or norm scales (nanoGPT's rule).

  With `decay_embeddings=False` the token and position tables are not decayed
  either: their rows are only updated for tokens/positions that occur, so
  decay shrinks rare rows toward zero between their updates.
  """

  def decays(path, p) -> bool:
    # The last dict key names the parameter (flax's partitioning boxes add an attribute key after it).
    names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
    name = names[-1] if names else ""
    return p.ndim >= 2 and (decay_embeddings or name not in EMBEDDING_NAMES)

  return jax.tree_util.tree_map_with_path(decays, params)


OPTIMIZERS = ("adamw", "sgd")


def _direction(optim: Mapping[str, Any]) -> list[optax.GradientTransformation]:
  """The update direction of `optim.name`, before the learning rate: Adam's (b1, b2, eps), or SGD's
  heavy-ball momentum b1 (0: plain SGD; DP-SGD's usual choice: it does not rescale each coordinate by its
  own noise-dominated second moment as Adam does)."""
  name = optim.get("name", "adamw")
  if name == "adamw":
    return [optax.scale_by_adam(b1=float(optim["b1"]), b2=float(optim["b2"]), eps=float(optim.get("eps", 1e-8)))]
  if name == "sgd":
    return [optax.trace(decay=float(optim["b1"]))] if float(optim["b1"]) else []
  raise ValueError(f"optim.name={name!r} is not one of {OPTIMIZERS}.")


def make_optimizer(optim: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping, then AdamW (`optim.name="adamw"`) or SGD with momentum and the same decoupled,
  masked weight decay (`"sgd"`); returns the transformation and its schedule."""
  schedule = learning_rate_schedule(optim, total_steps)
  if optim.get("name", "adamw") != "adamw":
    return optax.chain(make_update_direction(optim), optax.scale_by_learning_rate(schedule)), schedule
  parts = []  # AdamW as optax builds it: the optimizer state's layout of every checkpoint written before "sgd"
  if optim.get("grad_clip"):
    parts.append(optax.clip_by_global_norm(float(optim["grad_clip"])))
  parts.append(
      optax.adamw(
          schedule,
          b1=float(optim["b1"]),
          b2=float(optim["b2"]),
          eps=float(optim.get("eps", 1e-8)),
          weight_decay=float(optim["weight_decay"]),
          mask=functools.partial(decay_mask, decay_embeddings=bool(optim.get("decay_embeddings", True))),
      ))
  return optax.chain(*parts), schedule


def make_update_direction(optim: Mapping[str, Any]) -> optax.GradientTransformation:
  """The optimizer without its learning rate: clip, Adam (or momentum), decoupled weight decay (masked).

  `-lr * direction` is exactly `make_optimizer`'s update; loops that set the
  learning rate per step themselves (the online loop's per-chunk schedule) scale it.
  """
  parts = []
  if optim.get("grad_clip"):
    parts.append(optax.clip_by_global_norm(float(optim["grad_clip"])))
  parts.extend(_direction(optim))
  if float(optim["weight_decay"]):
    parts.append(optax.add_decayed_weights(
        float(optim["weight_decay"]),
        mask=functools.partial(decay_mask, decay_embeddings=bool(optim.get("decay_embeddings", True)))))
  return optax.chain(*parts) if parts else optax.identity()


class MultiOptimizer:
  """One optax optimizer per top-level part of the params (a GAN's players).

  It is an optax transformation (`init`, `update` of all parts) whose state is
  {part: that part's optimizer state}, so Orbax saves and restores all of
  them, sharded like their parameters; the engine's step updates one part at
  a time (`lm.train.step.Update.part`) with `part_update`.
  """

  def __init__(self, parts: Mapping[str, optax.GradientTransformation]):
    self.parts = dict(parts)

  def init(self, params: Mapping[str, Any]) -> dict[str, Any]:
    missing = set(self.parts) - set(params)
    if missing:
      raise ValueError(f"The params have no part(s) {sorted(missing)} for their optimizers.")
    return {name: tx.init(params[name]) for name, tx in self.parts.items()}

  def part_update(self, part: str, grads: Any, opt_state: dict[str, Any], params: dict[str, Any]
                  ) -> tuple[Any, dict[str, Any]]:
    """The updates of `params[part]` for `grads` (of that part), and the new optimizer state of all parts."""
    updates, new_part_state = self.parts[part].update(grads, opt_state[part], params[part])
    return updates, dict(opt_state, **{part: new_part_state})

  def update(self, grads: Any, state: dict[str, Any], params: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """All parts at once (optax's GradientTransformation.update)."""
    updates, new_state = {}, {}
    for name, tx in self.parts.items():
      updates[name], new_state[name] = tx.update(grads[name], state[name], None if params is None else params[name])
    return updates, new_state
