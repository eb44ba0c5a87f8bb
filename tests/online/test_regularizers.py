"""Regularizers against forgetting: L2-init, EWC, diagonal Fisher, distillation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.online import regularizers as reg

LEARNING_RATE = 0.1
WEIGHT = 5.0

ANCHOR = {"w": jnp.array([1.0, -2.0, 0.5, 3.0]), "b": jnp.array(0.5)}


def new_data_loss(params, batch=None):
  """Mean squared error of a linear model on 'new' data whose best fit is far from ANCHOR."""
  if batch is None:
    x = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    y = jnp.array([5.0, 4.0, -3.0, 2.0])
  else:
    x, y = batch
  return jnp.mean(jnp.square(x @ params["w"] + params["b"] - y))


def sgd_step(loss_fn, params):
  grads = jax.grad(loss_fn)(params)
  return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)


def distance(params, anchor):
  return float(jnp.sqrt(2.0 * reg.l2_init_penalty(params, anchor)))


def test_penalties_are_zero_at_the_anchor_and_match_hand_computation():
  params = {"w": jnp.array([2.0, -2.0, 0.5, 1.0]), "b": jnp.array(1.5)}
  fisher = {"w": jnp.array([1.0, 7.0, 2.0, 3.0]), "b": jnp.array(4.0)}
  assert float(reg.l2_init_penalty(ANCHOR, ANCHOR)) == 0.0
  assert float(reg.ewc_penalty(ANCHOR, ANCHOR, fisher)) == 0.0
  np.testing.assert_allclose(reg.l2_init_penalty(params, ANCHOR), 0.5 * (1 + 0 + 0 + 4 + 1))
  np.testing.assert_allclose(reg.ewc_penalty(params, ANCHOR, fisher), 0.5 * (1 * 1 + 3 * 4 + 4 * 1))
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert reg.l2_init_penalty(half, ANCHOR).dtype == jnp.float32
  assert jax.jit(reg.ewc_penalty)(params, ANCHOR, fisher).shape == ()


def test_l2_init_keeps_the_step_closer_to_the_anchor():
  plain = sgd_step(new_data_loss, ANCHOR)
  # Start away from the anchor (as after some steps on the chunk), where the pull acts.
  start = plain
  free = sgd_step(new_data_loss, start)
  pulled = sgd_step(lambda p: new_data_loss(p) + WEIGHT * reg.l2_init_penalty(p, ANCHOR), start)
  assert distance(pulled, ANCHOR) < distance(free, ANCHOR) - 0.1


def test_ewc_holds_the_important_coordinate_and_frees_the_other():
  fisher = {"w": jnp.array([100.0, 0.0, 0.0, 0.0]), "b": jnp.array(0.0)}
  start = sgd_step(new_data_loss, ANCHOR)  # away from the anchor, so the penalty's gradient is not 0
  free = sgd_step(new_data_loss, start)
  held = sgd_step(lambda p: new_data_loss(p) + 0.05 * reg.ewc_penalty(p, ANCHOR, fisher), start)
  moved_free = jnp.abs(free["w"] - ANCHOR["w"])
  moved_held = jnp.abs(held["w"] - ANCHOR["w"])
  assert moved_held[0] < moved_free[0] - 0.05  # the weight the old data needs stays put
  np.testing.assert_allclose(moved_held[1:], moved_free[1:], rtol=1e-6)  # the others move as freely
  np.testing.assert_allclose(held["b"], free["b"], rtol=1e-6)


def test_diagonal_fisher_is_the_mean_squared_gradient():
  rng = np.random.default_rng(0)
  batches = [(jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), jnp.asarray(rng.normal(size=8), jnp.float32))
             for _ in range(3)]
  params = {"w": jnp.array([0.3, -0.2, 0.1, 0.0]), "b": jnp.array(0.2)}
  fisher = reg.diagonal_fisher(new_data_loss, params, iter(batches))
  # By hand: d/dw mean((xw + b - y)^2) = 2/n * x^T r, d/db = 2/n * sum r.
  expected_w, expected_b = np.zeros(4), 0.0
  for x, y in batches:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    r = x @ np.asarray(params["w"]) + float(params["b"]) - y
    expected_w += (2 / len(y) * x.T @ r) ** 2 / len(batches)
    expected_b += (2 / len(y) * r.sum()) ** 2 / len(batches)
  np.testing.assert_allclose(fisher["w"], expected_w, rtol=1e-5)
  np.testing.assert_allclose(fisher["b"], expected_b, rtol=1e-5)
  assert fisher["w"].dtype == jnp.float32
  with pytest.raises(ValueError, match="no batches"):
    reg.diagonal_fisher(new_data_loss, params, [])


def test_normalized_fisher_has_mean_one_and_keeps_proportions():
  fisher = {"w": jnp.array([1e-6, 3e-6, 0.0, 0.0]), "b": jnp.array(1e-6)}
  normalized = reg.normalize_fisher(fisher)
  leaves = np.concatenate([np.ravel(x) for x in jax.tree.leaves(normalized)])
  np.testing.assert_allclose(leaves.mean(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(normalized["w"][1] / normalized["w"][0], 3.0, rtol=1e-5)
  zeros = reg.normalize_fisher(jax.tree.map(jnp.zeros_like, fisher))
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(zeros))


def logits(seed, shape=(2, 3, 7)):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * 2, jnp.float32)


def test_distillation_is_zero_for_identical_logits_and_positive_otherwise():
  teacher = logits(0)
  for temperature in (1.0, 2.0):
    assert abs(float(reg.distillation_loss(teacher, teacher, temperature=temperature))) < 1e-6
    assert float(reg.distillation_loss(logits(1), teacher, temperature=temperature)) > 0.1
  # Shifting all logits of a token by a constant leaves its distribution unchanged.
  assert abs(float(reg.distillation_loss(teacher + 3.0, teacher))) < 1e-5


@pytest.mark.parametrize("seed", range(8))
def test_distillation_of_nearly_equal_models_is_never_negative(seed):
  """A student that has barely moved (what the online loop sees on its first steps after an anchor): the
  per-token KL rounds around 0, and a sum of roundings went below it (half of such seeds did) before each
  token's KL was clamped; the loss is >= 0 exactly, and exactly 0 for identical logits."""
  key = jax.random.key(seed)
  teacher = 3.0 * jax.random.normal(key, (4, 8, 64))
  student = teacher + 1e-6 * jax.random.normal(jax.random.fold_in(key, 1), teacher.shape)
  assert float(reg.distillation_loss(student, teacher)) >= 0.0
  assert float(reg.distillation_loss(student, teacher, temperature=2.0)) >= 0.0
  assert float(reg.distillation_loss(teacher, teacher)) == 0.0


def test_distillation_matches_the_kl_definition():
  student, teacher, temperature = logits(1), logits(0), 2.0
  p = jax.nn.softmax(teacher / temperature)
  kl = jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(student / temperature)), -1)
  np.testing.assert_allclose(reg.distillation_loss(student, teacher, temperature=temperature),
                             kl.mean() * temperature**2, rtol=1e-5)


def test_a_distillation_step_moves_the_student_towards_the_teacher_only():
  student, teacher = logits(1), logits(0)
  loss_fn = lambda s, t: reg.distillation_loss(s, t, temperature=2.0)
  grad_student, grad_teacher = jax.grad(loss_fn, argnums=(0, 1))(student, teacher)
  assert float(jnp.abs(grad_teacher).max()) == 0.0  # the teacher gets a stop_gradient
  before = float(loss_fn(student, teacher))
  after = float(loss_fn(student - 5.0 * grad_student, teacher))  # gradients are per-token means: small
  assert after < before * 0.8


def test_mask_excludes_rows():
  teacher = logits(0)
  student = teacher.at[1].set(logits(5)[1])  # row 0 agrees with the teacher, row 1 does not
  row_mask = jnp.array([True, False])
  assert abs(float(reg.distillation_loss(student, teacher, mask=row_mask))) < 1e-6
  token_mask = jnp.broadcast_to(row_mask[:, None], (2, 3)).astype(jnp.float32)
  assert abs(float(reg.distillation_loss(student, teacher, mask=token_mask))) < 1e-6
  only_row_1 = float(reg.distillation_loss(student, teacher, mask=jnp.array([0, 1])))
  np.testing.assert_allclose(only_row_1, 2 * float(reg.distillation_loss(student, teacher)), rtol=1e-5)
  assert float(reg.distillation_loss(student, teacher, mask=jnp.zeros(2))) == 0.0
  # Masked rows get no gradient.
  grad = jax.grad(lambda s: reg.distillation_loss(s, teacher, mask=jnp.array([0, 1])))(logits(1))
  assert float(jnp.abs(grad[0]).max()) == 0.0 and float(jnp.abs(grad[1]).max()) > 0.0
  with pytest.raises(ValueError, match="temperature > 0"):
    reg.distillation_loss(student, teacher, temperature=0.0)
