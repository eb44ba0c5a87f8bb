"""The engine's train step: one `make_train_step` for every task, and the jit that shards it over the mesh.

A task hands the engine its loss, never its step (levanter's trainer is the
model): one or more `Update`s, each a loss function of (the params it trains,
a batch, a `StepContext`) and the part of the params it trains. The engine
does everything around it, the same for every task:

  * gradient accumulation (`grad_accum_steps = k`): the global batch is split
    into k micro-batches scanned in order, so memory is that of one
    micro-batch; losses are normalized by totals of the *global* batch
    (`StepContext.totals`, from the task's `loss_totals(batch)`), so the
    gradients and metrics of k micro-batches add up to those of one step on
    the whole batch, exactly (token-weighted, not a mean of means);
  * per-row randomness (`StepContext.row_keys`) keyed by (step, row of the
    global batch), so a sampled latent or a dropped word does not depend on k
    either; the dropout key (`StepContext.rng`) is the step's without
    accumulation and `fold_in(step key, micro-batch)` with it;
  * updates of one part of the params with its own optimizer (a GAN's
    critic steps, then its generator: `Update.part`, `Update.repeats`), from
    values a task prepares once per step (`prepare`, no gradient);
  * DP-SGD (`privacy`, lm.train.privacy): one gradient per example (the
    loss of each row alone, vmapped), each clipped to a norm, summed over the
    logical batch (across micro-batches), Gaussian noise added once, then the
    optimizer: `train/clip_fraction` and `train/example_grad_norm` report it;
  * the gradient norm, the optimizer update (its learning rate from a schedule
    of the step, or given per call: `lr_from_inputs`), metrics named
    `train/...`, and the jit with explicit shardings and a donated state
    (`jit_steps`). The NaN/Inf guard is the loop's (`lm.train.loop.fit`):
    it checks `train/loss` and `train/grad_norm`, which every step returns.

`train_step(state, batch[, inputs]) -> (state, metrics)` is pure; its
randomness is `fold_in(state.rng, state.step)`, so a resumed run draws what
an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from lm.data import pipeline
from lm.core.errors import MeshError
from lm.train import privacy as privacy_lib
from lm.train import sharding as sharding_lib
from lm.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
_NOISE_STREAM = 0x5EED  # DP-SGD's noise key: fold_in(step key, this), apart from dropout's and the rows' keys


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a loss function knows besides its params and (micro-)batch.

  A loss function returns *contributions*: values whose sum over the
  micro-batches of a step is the value on the global batch. Divide sums by a
  total (`mean`) and scale per-step terms by `share`, and accumulation is
  exact.
  """

  step: jax.Array  # the state's step before this update (int32 scalar)
  rng: jax.Array  # dropout key of this micro-batch
  step_rng: jax.Array  # the step's key, the same for every micro-batch
  rows: jax.Array  # [micro] positions of this micro-batch's rows in the global batch
  repeat: jax.Array  # which of the update's `repeats` this is (0 for most)
  totals: Mapping[str, jax.Array]  # "rows" and the task's loss_totals, over the global batch
  params: Any  # all the params as they are at this update (the other parts of a GAN)
  inputs: Any = None  # what the step was called with besides (state, batch), e.g. {"lr", "anchor"}

  def row_keys(self, stream: int) -> jax.Array:
    """[micro] keys, one per row, from (step, stream, repeat, row): the same with or without accumulation."""
    base = jax.random.fold_in(jax.random.fold_in(self.step_rng, stream), self.repeat)
    return jax.vmap(lambda row: jax.random.fold_in(base, row))(self.rows)

  def mean(self, value_sum: jax.Array, total: str = "rows") -> jax.Array:
    """This micro-batch's contribution to a mean over the global batch: value_sum / totals[total]."""
    return value_sum / jnp.maximum(self.totals[total], 1.0)

  @property
  def share(self) -> jax.Array:
    """This micro-batch's fraction of the global batch's rows: scale per-step terms by it."""
    return self.rows.shape[0] / self.totals["rows"]


LossFn = Callable[[Any, Batch, StepContext], tuple[jax.Array, Metrics]]


@dataclasses.dataclass(frozen=True)
class Update:
  """One optimizer update in a step: the gradient of `loss_fn` with respect to `part` of the params.

  loss_fn(trainable, batch, ctx) -> (loss, metrics): `trainable` is
  params[part] (all params when part is None); metrics are contributions
  too, reported as `train/<name>`. `repeats` updates run in order (scanned),
  and the last one's loss and metrics are reported: `train/<loss_name>`,
  `train/<grad_norm_name>`.
  """

  loss_fn: LossFn
  part: str | None = None
  repeats: int = 1
  loss_name: str = "loss"
  grad_norm_name: str = "grad_norm"


Prepare = Callable[[Any, Batch, StepContext], Batch]  # (params, micro-batch, ctx) -> extra batch fields


def _micro_batches(tree: Any, k: int) -> Any:
  return jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), tree)


def make_train_step(updates: LossFn | Update | Sequence[Update], optimizer: Any, *,
                    learning_rate: optax.Schedule | None = None, lr_from_inputs: bool = False,
                    grad_accum_steps: int = 1, loss_totals: Callable[[Batch], Mapping[str, jax.Array]] | None = None,
                    prepare: Prepare | None = None, step_metrics: Callable[[jax.Array], Metrics] | None = None,
                    privacy: privacy_lib.DpSgd | None = None) -> Callable[..., tuple[TrainState, Metrics]]:
  """Builds `train_step(state, batch, inputs=None) -> (state, metrics)` (module doc).

  Args:
    updates: a loss function (one update of all params), an `Update`, or
      several, applied in order.
    optimizer: an optax transformation (updates of all params) or a
      `MultiOptimizer` (updates of its parts).
    learning_rate: the schedule `train/lr` reports (the optimizer applies it).
    lr_from_inputs: the optimizer is an update direction without a learning
      rate; the step is called with inputs["lr"] and applies -lr * direction.
    grad_accum_steps: micro-batches per step; divides the batch.
    loss_totals: the global batch -> normalizers (e.g. its target tokens).
    prepare: values computed once per step and micro-batch before the
      updates, without gradient (a GAN's generated batch); added to it.
    step_metrics: the step -> metrics that are not contributions (a KL weight).
    privacy: DP-SGD's clip and noise (one update, not repeated): each row's
      loss is its own mean (its own `loss_totals`), the update's gradient the
      noised sum of clipped per-row gradients over the batch size, and the
      loss reported the mean of the rows' losses.
  """
  if callable(updates) and not isinstance(updates, Update):
    updates = Update(updates)
  updates = (updates,) if isinstance(updates, Update) else tuple(updates)
  k = int(grad_accum_steps)
  if privacy is not None and (len(updates) != 1 or updates[0].repeats != 1):
    raise ValueError("DP-SGD clips one update's per-example gradients: a step of several updates (or repeats) "
                     "has no single per-example gradient to clip.")

  def part_of(params, part):
    return params if part is None else params[part]

  def apply(update, grads, params, opt_state, lr):
    if update.part is None:
      changes, opt_state = optimizer.update(grads, opt_state, params)
    else:
      changes, opt_state = optimizer.part_update(update.part, grads, opt_state, params)
    if lr_from_inputs:
      changes = jax.tree.map(lambda change: -lr * change, changes)
    trained = optax.apply_updates(part_of(params, update.part), changes)
    params = trained if update.part is None else dict(params, **{update.part: trained})
    return params, opt_state

  def train_step(state: TrainState, batch: Batch, inputs: Any = None) -> tuple[TrainState, Metrics]:
    step_rng = jax.random.fold_in(state.key, state.step)
    size = jax.tree.leaves(batch)[0].shape[0]
    totals = {"rows": jnp.asarray(size, jnp.float32), **(loss_totals(batch) if loss_totals else {})}
    micro = size // k

    def context(index, params, repeat):
      return StepContext(step=state.step, rng=step_rng if k == 1 else jax.random.fold_in(step_rng, index),
                         step_rng=step_rng, rows=index * micro + jnp.arange(micro), repeat=repeat, totals=totals,
                         params=params, inputs=inputs)

    data = batch if k == 1 else _micro_batches(batch, k)  # [micro] or [k, micro] leaves
    if prepare is not None:
      def prepared(index, micro_batch):
        extra = prepare(state.params, micro_batch, context(index, state.params, 0))
        return dict(micro_batch, **jax.lax.stop_gradient(extra))
      data = prepared(0, data) if k == 1 else jax.lax.map(lambda x: prepared(*x), (jnp.arange(k), data))

    def gradients(update, params, repeat):
      grad_fn = jax.value_and_grad(update.loss_fn, has_aux=True)
      trainable = part_of(params, update.part)
      if k == 1:
        return grad_fn(trainable, data, context(0, params, repeat))

      def accumulate(carry, item):
        index, micro_batch = item
        out = grad_fn(trainable, micro_batch, context(index, params, repeat))
        return jax.tree.map(jnp.add, carry, out), None

      first = context(0, params, repeat)
      shapes = jax.eval_shape(lambda t, b: grad_fn(t, b, first), trainable, jax.tree.map(lambda x: x[0], data))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), data))
      return total

    def private_gradients(update, params, repeat):
      """(mean loss, mean aux + clipping figures), noised mean of clipped per-row gradients."""
      trainable = part_of(params, update.part)

      def clipped(index, micro_batch):
        base = context(index, params, repeat)
        real = micro_batch.get("dp_real")  # Poisson sampling: 1 for a drawn example, 0 for padding
        micro_batch = {key: value for key, value in micro_batch.items() if key != "dp_real"}

        def one(trainable, single, row):  # one example, with a batch axis of 1, and its row of the global batch
          totals = {"rows": jnp.float32(1.0), **(loss_totals(single) if loss_totals else {})}
          return update.loss_fn(trainable, single, dataclasses.replace(
              base, rng=jax.random.fold_in(base.rng, row[0]), rows=row, totals=totals))

        summed, (losses, norms, aux) = privacy_lib.clipped_gradient_sum(one, privacy.clip_norm)(
            trainable, micro_batch, base.rows, None if real is None else real == 0)
        weight = jnp.ones_like(losses) if real is None else real.astype(losses.dtype)
        return summed, {"loss": jnp.sum(weight * losses),
                        "aux": jax.tree.map(lambda v: jnp.sum(weight.reshape((-1,) + (1,) * (v.ndim - 1)) * v), aux),
                        "clipped": jnp.sum(weight * (norms > privacy.clip_norm)), "norms": jnp.sum(weight * norms),
                        "real": jnp.sum(weight)}

      if k == 1:
        total, sums = clipped(0, data)
      else:
        first = jax.eval_shape(clipped, 0, jax.tree.map(lambda x: x[0], data))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
        (total, sums), _ = jax.lax.scan(lambda carry, item: (jax.tree.map(jnp.add, carry, clipped(*item)), None),
                                        zeros, (jnp.arange(k), data))
      noisy = privacy_lib.add_noise(total, jax.random.fold_in(step_rng, _NOISE_STREAM), privacy.noise_std)
      # Poisson sampling divides by the expected batch, a constant (dividing by the rows drawn would let one
      # example change the scale of everyone's contribution); shuffled batches always hold `size` rows.
      divisor = inputs["dp_expected_rows"] if privacy.expected_rows_from_inputs else (
          privacy.expected_batch_size or size)
      grads = jax.tree.map(lambda g: g / divisor, noisy)
      rows = jnp.maximum(sums["real"], 1.0)
      aux = {**jax.tree.map(lambda v: v / rows, sums["aux"]), "clip_fraction": sums["clipped"] / rows,
             "example_grad_norm": sums["norms"] / rows}
      if privacy.expected_batch_size or privacy.expected_rows_from_inputs:
        aux["dp_rows"] = sums["real"]
      return (sums["loss"] / rows, aux), grads

    lr = inputs["lr"] if lr_from_inputs else None
    params, opt_state, metrics = state.params, state.opt_state, {}

    def one_update(update, params, opt_state, repeat):
      (loss, aux), grads = (private_gradients if privacy is not None else gradients)(update, params, repeat)
      params, opt_state = apply(update, grads, params, opt_state, lr)
      return params, opt_state, {update.loss_name: loss, update.grad_norm_name: optax.global_norm(grads), **aux}

    for update in updates:
      if update.repeats == 1:
        params, opt_state, out = one_update(update, params, opt_state, jnp.int32(0))
      else:
        def repeated(carry, repeat, update=update):
          params, opt_state, out = one_update(update, *carry, repeat)
          return (params, opt_state), out
        (params, opt_state), stacked = jax.lax.scan(repeated, (params, opt_state), jnp.arange(update.repeats))
        out = jax.tree.map(lambda x: x[-1], stacked)
      metrics.update(out)
    metrics["lr"] = lr if lr_from_inputs else (learning_rate(state.step) if learning_rate is not None
                                                else jnp.float32(0.0))
    if step_metrics is not None:
      metrics.update(step_metrics(state.step))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {f"train/{name}": jnp.asarray(value, jnp.float32) for name, value in metrics.items()}

  return train_step


@dataclasses.dataclass
class CompiledSteps:
  """The jitted steps, the shardings they were compiled for, and the global batch size they read.

  batch_sharding: of a [batch, length] array; batch_shardings: one per batch
  key (1-D keys such as 'index' too).
  """

  train_step: Callable[..., tuple[TrainState, Metrics]]
  eval_step: Callable[[Any, Batch], Metrics]
  state_shardings: TrainState
  batch_sharding: NamedSharding
  mesh: Mesh
  rules: sharding_lib.Rules
  batch_shardings: dict[str, NamedSharding] = dataclasses.field(default_factory=dict)
  global_batch_size: int = 0
  compiler_options: dict[str, Any] | None = None
  train_batch_shardings: dict[str, NamedSharding] | None = None  # None: batch_shardings (training-only keys added)

  @property
  def train_shardings(self) -> dict[str, NamedSharding]:
    """One sharding per key of a training batch (the eval keys and any the train step alone reads)."""
    return self.batch_shardings if self.train_batch_shardings is None else self.train_batch_shardings

  def context(self) -> contextlib.AbstractContextManager:
    """Mesh + logical-rule context every call of the steps (and tracing) runs under."""
    return mesh_context(self.mesh, self.rules)

  @property
  def process_rows(self) -> pipeline.ProcessRows:
    """The rows of every global batch this process reads (all of them with one process)."""
    try:
      return pipeline.ProcessRows.for_sharding(self.batch_sharding, self.global_batch_size)
    except ValueError as error:
      raise MeshError(str(error)) from error

  def for_params(self, params_shardings: Any, eval_step: Callable[[Any, Batch], Metrics]) -> CompiledSteps:
    """These steps for parameters of another layout (a quantized model's int8 values and scales,
    `lm.models.quantize.quantized_shardings`): the task's `eval_step` jitted again for it, and `jit_eval`
    with it too. Training is left out: such parameters are evaluated and decoded, never trained."""

    def not_trainable(*args: Any, **kwargs: Any) -> Any:
      raise TypeError("these steps evaluate parameters of another layout (a quantized model); they do not train")

    jitted = jax.jit(eval_step, in_shardings=(params_shardings, self.batch_shardings),
                     out_shardings=sharding_lib.replicated(self.mesh), compiler_options=self.compiler_options)
    return dataclasses.replace(self, train_step=not_trainable, eval_step=jitted,
                               state_shardings=self.state_shardings.replace(params=params_shardings))

  def jit_eval(self, eval_step: Callable[[Any, Batch], Metrics], batch_keys: Sequence[str]) -> Callable:
    """Another eval step over [batch, length] keys, jitted like `eval_step` (params sharded, outputs replicated)."""
    return jax.jit(eval_step, in_shardings=(self.state_shardings.params, {key: self.batch_sharding
                                                                          for key in batch_keys}),
                   out_shardings=sharding_lib.replicated(self.mesh), compiler_options=self.compiler_options)


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


def jit_steps(train_step: Callable[..., tuple[TrainState, Metrics]], eval_step: Callable[[Any, Batch], Metrics],
              state_shardings: TrainState, mesh: Mesh, rules: sharding_lib.Rules, batch_ranks: Mapping[str, int], *,
              global_batch_size: int, compiler_options: Mapping[str, Any] | None = None,
              takes_inputs: bool = False, train_only_ranks: Mapping[str, int] | None = None) -> CompiledSteps:
  """Jits a task's pure steps over the mesh: state donated, batch split over its rows, metrics replicated.

  train_only_ranks: batch keys the train step reads and the eval step does not (DP-SGD's `dp_real`).

  takes_inputs: the train step has a third argument (`inputs`), placed as the
  caller's arrays are (the online loop's learning rate and anchor weights).
  """
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  batch_shardings = {key: sharding_lib.batch_sharding(mesh, rules, rank) for key, rank in batch_ranks.items()}
  train_shardings = dict(batch_shardings, **{key: sharding_lib.batch_sharding(mesh, rules, rank)
                                             for key, rank in (train_only_ranks or {}).items()})
  replicated = sharding_lib.replicated(mesh)
  options = dict(compiler_options) if compiler_options else None
  if takes_inputs:
    train_step = jax.jit(train_step, donate_argnums=0, out_shardings=(state_shardings, replicated),
                         compiler_options=options)
  else:
    train_step = jax.jit(train_step, in_shardings=(state_shardings, train_shardings),
                         out_shardings=(state_shardings, replicated), donate_argnums=0, compiler_options=options)
  eval_step = jax.jit(eval_step, in_shardings=(state_shardings.params, batch_shardings), out_shardings=replicated,
                      compiler_options=options)
  return CompiledSteps(train_step, eval_step, state_shardings, batch_sharding, mesh, rules, batch_shardings,
                       global_batch_size, options, train_shardings if train_only_ranks else None)
