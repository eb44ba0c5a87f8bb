"""The optimizer from `config.optim`: AdamW (the default) and SGD with momentum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.train import optim

BASE = {"name": "sgd", "lr": 0.1, "min_lr": 0.1, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
        "decay_embeddings": True, "b1": 0.0, "b2": 0.95, "eps": 1e-8, "grad_clip": 0.0}


def params_and_grads():
  params = {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "norm": {"scale": jnp.ones(3)}}
  grads = [jax.tree.map(lambda p, i=i: jnp.full_like(p, 0.5 * (i + 1)) - 0.1 * p, params) for i in range(3)]
  return params, grads


def run(config, steps=3):
  params, grads = params_and_grads()
  tx, _ = optim.make_optimizer(config, total_steps=10)
  state = tx.init(params)
  for g in grads[:steps]:
    updates, state = tx.update(g, state, params)
    params = jax.tree.map(jnp.add, params, updates)
  return params


def test_sgd_without_momentum_is_the_plain_step():
  params, grads = params_and_grads()
  got = run(BASE, steps=1)
  jax.tree.map(lambda p, g, q: np.testing.assert_allclose(q, p - 0.1 * g, rtol=1e-6), params, grads[0], got)


def test_sgd_momentum_is_heavy_ball_and_decay_is_decoupled_and_masked():
  config = dict(BASE, b1=0.9, weight_decay=0.5)
  params, grads = params_and_grads()
  want, velocity = params, jax.tree.map(jnp.zeros_like, params)
  for g in grads:
    velocity = jax.tree.map(lambda v, x: 0.9 * v + x, velocity, g)
    want = {"dense": {"kernel": want["dense"]["kernel"] - 0.1 * (velocity["dense"]["kernel"]
                                                                 + 0.5 * want["dense"]["kernel"])},
            "norm": {"scale": want["norm"]["scale"] - 0.1 * velocity["norm"]["scale"]}}  # vectors: no decay
  jax.tree.map(lambda w, q: np.testing.assert_allclose(q, w, rtol=1e-5), want, run(config))


def test_direction_times_lr_is_the_optimizer_for_both():
  for name in optim.OPTIMIZERS:
    config = dict(BASE, name=name, b1=0.9, weight_decay=0.1, grad_clip=1.0)
    params, grads = params_and_grads()
    direction = optim.make_update_direction(config)
    state = direction.init(params)
    walked = params
    for g in grads:
      updates, state = direction.update(g, state, walked)
      walked = jax.tree.map(lambda p, u: p - 0.1 * u, walked, updates)
    jax.tree.map(lambda w, q: np.testing.assert_allclose(q, w, rtol=1e-5), walked, run(config))


def test_adamw_keeps_the_state_layout_of_earlier_checkpoints():
  import optax  # pylint: disable=g-import-not-at-top
  config = dict(BASE, name="adamw", grad_clip=1.0, weight_decay=0.1)
  params, _ = params_and_grads()
  tx, schedule = optim.make_optimizer(config, total_steps=10)
  before = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.0, b2=0.95, eps=1e-8,
                                                                   weight_decay=0.1, mask=optim.decay_mask))
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(before.init(params))


def test_unknown_optimizer_is_refused():
  with pytest.raises(ValueError, match="optim.name='lamb'"):
    optim.make_optimizer(dict(BASE, name="lamb"), total_steps=10)
