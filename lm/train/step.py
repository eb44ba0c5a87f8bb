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

from lm.models import fused_loss
from lm.train import sharding as sharding_lib
from lm.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Summed token cross-entropy and token count.

  logits: [batch, length, vocab] float32; targets: [batch, length] int32;
  mask: [batch, length] (1 where a target counts: sentence examples), None for all.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if mask is None:
    return losses.sum(), jnp.asarray(losses.size, jnp.float32)
  mask = mask.astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


def lm_loss_sum(model: nn.Module, params: Any, batch: Batch, *, deterministic: bool = True,
                rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """A TransformerLM's summed token cross-entropy and token count on a batch (see `cross_entropy`).

  Through the full logits, or through `fused_loss.fused_loss_sum` without
  them when the model's `loss_impl` says so for this batch's shape (same
  value; the gradient is computed chunk by chunk).
  """
  cfg = model.config
  mask = batch.get("mask")
  out, table = _lm_forward(model, params, batch["inputs"], deterministic, rng)
  if table is None:
    return cross_entropy(out, batch["targets"], mask)
  weights = jnp.ones(batch["targets"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  loss_sum = fused_loss.fused_loss_sum(out, table[0], batch["targets"], weights, table[1], cfg.loss_chunk_len,
                                       cfg.valid_vocab_size)
  return loss_sum, jnp.sum(weights)


def lm_token_losses(model: nn.Module, params: Any, inputs: jax.Array, targets: jax.Array) -> jax.Array:
  """A TransformerLM's per-token cross-entropy [batch, length] (evaluation; fused like `lm_loss_sum`)."""
  cfg = model.config
  out, table = _lm_forward(model, params, inputs)
  if table is None:
    return optax.softmax_cross_entropy_with_integer_labels(out, targets)
  return fused_loss.token_losses(out, table[0], targets, vocab_major=table[1], chunk_len=cfg.loss_chunk_len,
                                 valid_vocab=cfg.valid_vocab_size)


def _lm_forward(model: nn.Module, params: Any, inputs: jax.Array, deterministic: bool = True,
                rng: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, bool] | None]:
  """(logits, None), or (final hidden states, (output table, vocab_major)) where the model's loss_impl
  fuses the loss for this [batch, length] (`TransformerConfig.fused_loss`)."""
  cfg = model.config
  fused = cfg.fused_loss(*inputs.shape, devices=jax.device_count())
  out = model.apply({"params": params}, inputs, deterministic=deterministic,
                    rngs={"dropout": rng} if rng is not None else {}, return_hidden=fused)
  return out, fused_loss.output_table(params, cfg.tie_embeddings) if fused else None


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
