"""Pure, jitted train and eval steps.

`train_step(state, batch) -> (state, metrics)` and `eval_step(params, batch)
-> metrics` are plain functions of pytrees; `compile_steps` jits them with
explicit input/output shardings over the mesh and donates the state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from lm.models.losses import lm_loss_sum, lm_token_losses
from lm.train import sharding as sharding_lib
from lm.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int = 1) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Builds `train_step(state, batch)`.

  batch: {'inputs': [batch, length], 'targets': [batch, length]}. With
  `grad_accum_steps = k` the batch is split into k micro-batches whose
  gradients are averaged (scan, so memory is that of one micro-batch).
  """
  deterministic = model.config.dropout == 0.0

  def loss_fn(params: Any, micro: Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    loss_sum, count = lm_loss_sum(model, params, micro, deterministic=deterministic, rng=rng)
    return loss_sum / jnp.maximum(count, 1.0), loss_sum

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(state.key, state.step)
    if grad_accum_steps == 1:
      (loss, _), grads = grad_fn(state.params, batch, rng)
    else:
      micro_batches = jax.tree.map(
          lambda x: x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:]), batch)

      def accumulate(carry, inputs):
        index, micro = inputs
        (loss, _), grads = grad_fn(state.params, micro, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro_batches))
      loss, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, grads))
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": schedule(state.step)}
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable[[Any, Batch], Metrics]:
  """Builds `eval_step(params, batch) -> {'loss_sum', 'tokens', 'rows/loss_sum', 'rows/tokens'}`.

  The sums add up over batches; the "rows/" values are per row [batch]. Sentence
  batches (with a 'mask') also count 'sentences', the rows with a target.
  """

  def eval_step(params: Any, batch: Batch) -> Metrics:
    mask = batch.get("mask")
    losses = lm_token_losses(model, params, batch["inputs"], batch["targets"])  # [batch, length]
    weights = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
    row_loss, row_tokens = jnp.sum(losses * weights, axis=-1), jnp.sum(weights, axis=-1)
    # Per-row sums ("rows/", gathered by the loop) pair two models example by example (--mode ab).
    out = {"loss_sum": jnp.sum(row_loss), "tokens": jnp.sum(row_tokens), "rows/loss_sum": row_loss,
           "rows/tokens": row_tokens}
    if mask is not None:
      out["sentences"] = jnp.sum(jnp.any(mask > 0, axis=-1).astype(jnp.float32))
    return out

  return eval_step


@dataclasses.dataclass
class CompiledSteps:
  """The jitted steps and the shardings they were compiled for.

  batch_sharding: of a [batch, length] array (what `ProcessRows` is computed
  from); batch_shardings: one per batch key (1-D keys such as 'index' too).
  """

  train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
  eval_step: Callable[[Any, Batch], Metrics]
  state_shardings: TrainState
  batch_sharding: NamedSharding
  mesh: Mesh
  rules: sharding_lib.Rules
  batch_shardings: dict[str, NamedSharding] = dataclasses.field(default_factory=dict)

  def context(self) -> contextlib.AbstractContextManager:
    """Mesh + logical-rule context every call of the steps (and tracing) runs under."""
    return mesh_context(self.mesh, self.rules)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: sharding_lib.Rules) -> Iterator[None]:
  """Activates the mesh and the logical-axis rules (needed while tracing the model)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def cpu_compiler_options(options: Mapping[str, Any], mesh: Mesh) -> dict[str, Any] | None:
  """XLA options for steps compiled for a mesh of CPUs (None on accelerators).

  An option the user also sets in XLA_FLAGS is left out, so the environment
  wins over the config, as it would without this.
  """
  if mesh.devices.flat[0].platform != "cpu":
    return None
  user_flags = os.environ.get("XLA_FLAGS", "")
  chosen = {name: value for name, value in options.items() if f"--{name}=" not in user_flags}
  return chosen or None


LM_BATCH_RANKS = {"inputs": 2, "targets": 2}


def compile_steps(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                  state_shardings: TrainState, mesh: Mesh, rules: sharding_lib.Rules,
                  grad_accum_steps: int = 1, compiler_options: Mapping[str, Any] | None = None,
                  batch_ranks: Mapping[str, int] | None = None) -> CompiledSteps:
  """Jits the LM's steps with explicit shardings; the train state is donated.

  `compiler_options` are XLA debug options for both steps (e.g. from
  `cpu_compiler_options`); `batch_ranks` the batch's keys and their ranks
  (default: inputs and targets, [batch, length]).
  """
  return jit_steps(make_train_step(model, tx, schedule, grad_accum_steps), make_eval_step(model), state_shardings,
                   mesh, rules, batch_ranks or LM_BATCH_RANKS, compiler_options)


def jit_steps(train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
              eval_step: Callable[[Any, Batch], Metrics], state_shardings: TrainState, mesh: Mesh,
              rules: sharding_lib.Rules, batch_ranks: Mapping[str, int],
              compiler_options: Mapping[str, Any] | None = None) -> CompiledSteps:
  """Jits any head's pure steps over the mesh: state donated, batch split over its rows, metrics replicated."""
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  batch_shardings = {key: sharding_lib.batch_sharding(mesh, rules, rank) for key, rank in batch_ranks.items()}
  replicated = sharding_lib.replicated(mesh)
  options = dict(compiler_options) if compiler_options else None
  train_step = jax.jit(
      train_step,
      in_shardings=(state_shardings, batch_shardings),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0,
      compiler_options=options,
  )
  eval_step = jax.jit(
      eval_step,
      in_shardings=(state_shardings.params, batch_shardings),
      out_shardings=replicated,
      compiler_options=options,
  )
  return CompiledSteps(train_step, eval_step, state_shardings, batch_sharding, mesh, rules, batch_shardings)
