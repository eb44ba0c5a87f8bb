"""The train state: a plain pytree that Orbax saves and jit shards."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lm.train import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes.

  `rng` holds raw key data (uint32) so checkpoints stay plain arrays; each step
  derives its randomness as `fold_in(rng, step)`, which makes resumed runs
  draw the same dropout masks as uninterrupted ones.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array

  @property
  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


InitParams = Callable[[jax.Array], Any]  # rng key -> params (boxed with logical axis names)


def lm_init_params(model: nn.Module, example_tokens: jax.Array) -> InitParams:
  """The plain LM's initializer: `model.init(key, example_tokens)["params"]`."""
  return lambda key: model.init(key, example_tokens)["params"]


def boxed_state(init_params: InitParams, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """State whose params/opt_state leaves still carry their logical axis names.

  `init_params(key)` builds the parameters (a task's: `lm.tasks.base.Task.init_params`).
  """
  root = jax.random.key(seed)
  params_key, train_key = jax.random.split(root)
  params = init_params(params_key)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=jax.random.key_data(train_key),
  )


def abstract_state(init_params: InitParams, tx: optax.GradientTransformation, seed: int) -> Any:
  """Shapes/dtypes of the boxed state, without allocating anything."""
  return jax.eval_shape(lambda: boxed_state(init_params, tx, seed))


def state_shardings(init_params: InitParams, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: sharding_lib.Rules, seed: int = 0) -> TrainState:
  """NamedSharding for every leaf of the (unboxed) train state."""
  boxed = abstract_state(init_params, tx, seed)
  return sharding_lib.logical_shardings(boxed, mesh, rules)


def create_state(init_params: InitParams, tx: optax.GradientTransformation, mesh: Mesh,
                 rules: sharding_lib.Rules, seed: int,
                 shardings: TrainState | None = None) -> tuple[TrainState, TrainState]:
  """Initializes the state directly in its sharded layout.

  Returns (state, shardings); pass `shardings` when already computed, to skip
  tracing the initializer again. Initialization is jitted with the output
  shardings, so no device ever holds an unsharded copy of the parameters.
  """
  if shardings is None:
    shardings = state_shardings(init_params, tx, mesh, rules, seed)
  init: Callable[[], TrainState] = lambda: nn.meta.unbox(boxed_state(init_params, tx, seed))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(init, out_shardings=shardings)()
  return state, shardings


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
