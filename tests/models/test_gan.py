"""Text GAN pieces: Gumbel-softmax relaxation, RelGAN's discriminator and losses, the latent WGAN-GP of ARAE."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm.models import TransformerConfig, TransformerLM
from lm.models.gan import (EULER_MASCHERONI, LatentCritic, LatentGenerator, SequenceDiscriminator, gradient_penalty,
                           gumbel_argmax, gumbel_noise, gumbel_softmax, one_hot_sequences, relativistic_losses,
                           temperature_schedule, wasserstein_estimate, wgan_critic_loss, wgan_generator_loss)
from lm.train.sharding import PRESETS

VOCAB, LENGTH, BATCH = 11, 8, 3


def tiny_config(**options) -> TransformerConfig:
  fields = dict(vocab_size=VOCAB, num_layers=1, num_heads=2, width=16, max_len=LENGTH)
  return TransformerConfig(**{**fields, **options})


def init_params(module: nn.Module, seed: int, *inputs) -> dict:
  """The module's unboxed params, from one jitted init.

  Op by op, every parameter's initializer would compile on its own; and an
  "unsafe_rbg" key compiles a few times faster on CPU than the default
  threefry (the values differ, the distribution does not).
  """
  key = jax.random.key(seed, impl="unsafe_rbg")
  return nn.meta.unbox(jax.jit(module.init)(key, *inputs)["params"])


def make_discriminator(**options) -> tuple[SequenceDiscriminator, dict]:
  model = SequenceDiscriminator(tiny_config(**options))
  soft = jnp.zeros((BATCH, LENGTH, VOCAB), jnp.float32)
  return model, init_params(model, 0, soft, jnp.ones((BATCH, LENGTH), bool))


def random_tokens(seed: int = 1, batch: int = BATCH) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, LENGTH)), jnp.int32)


# --- Gumbel-softmax ----------------------------------------------------------------------------------------------


def test_gumbel_softmax_gradients_reach_every_part_of_the_generator():
  generator = TransformerLM(tiny_config(num_layers=2))
  tokens, real_tokens = random_tokens(1), random_tokens(3)
  gen_params = init_params(generator, 0, tokens)
  discriminator, disc_params = make_discriminator()
  mask = jnp.ones((BATCH, LENGTH), bool)

  def generator_loss(params, rng):
    logits = generator.apply({"params": params}, tokens)
    noise = gumbel_noise(rng, logits.shape)
    soft = gumbel_softmax(logits, noise, 0.5)
    real_logits = discriminator.apply({"params": disc_params}, one_hot_sequences(real_tokens, VOCAB), mask)
    fake_logits = discriminator.apply({"params": disc_params}, soft, mask)
    return relativistic_losses(real_logits, fake_logits)[1], (soft, gumbel_argmax(logits, noise))

  grads, (soft, hard) = jax.jit(jax.grad(generator_loss, has_aux=True))(gen_params, jax.random.key(2))
  assert set(grads) == {"embed", "position_embedding", "layer_0", "layer_1", "final_norm"}
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(leaf)), name
    assert np.linalg.norm(np.asarray(leaf)) > 0, f"no gradient reaches {name}"
  np.testing.assert_array_equal(np.argmax(np.asarray(soft), axis=-1), hard)
  assert soft.dtype == jnp.float32


def test_soft_one_hots_are_on_the_simplex_and_tend_to_the_hard_sample():
  logits = 2.0 * jax.random.normal(jax.random.key(0), (4, LENGTH, VOCAB))
  noise = gumbel_noise(jax.random.key(1), logits.shape)
  hard = gumbel_argmax(logits, noise)
  assert hard.shape == (4, LENGTH) and hard.dtype == jnp.int32
  target = np.asarray(one_hot_sequences(hard, VOCAB))
  errors = []
  for temperature in (10.0, 1.0, 0.1, 1e-5):
    soft = np.asarray(gumbel_softmax(logits, noise, temperature))
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(soft.argmax(-1), hard)
    errors.append(np.abs(soft - target).max())
  assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3
  # A traced temperature works too.
  traced = jax.jit(gumbel_softmax)(logits, noise, jnp.float32(0.1))
  np.testing.assert_allclose(traced, gumbel_softmax(logits, noise, 0.1), rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="temperature"):
    gumbel_softmax(logits, noise, 0.0)
  with pytest.raises(ValueError, match="gumbel_noise"):
    gumbel_softmax(logits, noise[..., :-1], 1.0)


def test_hard_one_hots_embed_as_a_table_lookup():
  model, params = make_discriminator()
  tokens = random_tokens()
  one_hot = one_hot_sequences(tokens, VOCAB)
  assert one_hot.shape == (BATCH, LENGTH, VOCAB) and one_hot.dtype == jnp.float32
  _, state = model.apply({"params": params}, one_hot, jnp.ones((BATCH, LENGTH), bool),
                         capture_intermediates=True)
  embedded = state["intermediates"]["embed"]["__call__"][0]
  np.testing.assert_array_equal(embedded, params["embed"]["embedding"][tokens])
  # The soft one-hot at a tiny temperature is the real sentence's one-hot, so both score the same.
  noise = gumbel_noise(jax.random.key(4), (BATCH, LENGTH, VOCAB))
  logits = 30.0 * (one_hot - 0.5)  # the tokens win over any Gumbel noise
  soft = gumbel_softmax(logits, noise, 1e-3)
  np.testing.assert_array_equal(gumbel_argmax(logits, noise), tokens)
  mask = jnp.ones((BATCH, LENGTH), bool)
  np.testing.assert_allclose(model.apply({"params": params}, soft, mask),
                             model.apply({"params": params}, one_hot, mask), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="integer token ids"):
    one_hot_sequences(one_hot, VOCAB)


def test_gumbel_noise_statistics():
  noise = gumbel_noise(jax.random.key(0), (1_000_000,))
  assert noise.dtype == jnp.float32
  noise = np.asarray(noise, np.float64)
  assert np.all(np.isfinite(noise))
  np.testing.assert_allclose(noise.mean(), EULER_MASCHERONI, atol=0.01)
  np.testing.assert_allclose(noise.var(), math.pi ** 2 / 6, rtol=0.02)
  # Gumbel-max: argmax(logits + noise) is a draw from softmax(logits).
  samples = 20_000
  logits = jnp.array([1.0, 0.0, -1.0, 2.0, 0.5])
  noise = gumbel_noise(jax.random.key(1), (samples, logits.shape[0]))
  draws = np.asarray(gumbel_argmax(jnp.broadcast_to(logits, noise.shape), noise))
  counts = np.bincount(draws, minlength=logits.shape[0])
  expected = samples * np.asarray(jax.nn.softmax(logits))
  chi_square = np.sum((counts - expected) ** 2 / expected)
  assert chi_square < 20.0, (counts, expected)  # 4 degrees of freedom: p < 0.001


def test_gumbel_noise_is_finite_at_the_ends_of_the_uniform(monkeypatch):
  # U = 0 or 1 exactly would give -inf or inf: the clip keeps both ends finite.
  monkeypatch.setattr(jax.random, "uniform", lambda rng, shape, dtype: jnp.array([0.0, 1.0, 0.5], dtype))
  noise = np.asarray(gumbel_noise(jax.random.key(0), (3,)))
  assert np.all(np.isfinite(noise)) and noise[0] < -4.0 and noise[1] > 16.0
  np.testing.assert_allclose(noise[2], -math.log(math.log(2.0)), rtol=1e-6)


# --- RelGAN: temperature, losses, discriminator --------------------------------------------------------------------


@pytest.mark.parametrize("kind,expected", [
    ("exponential", {0: 1.0, 25: 1000 ** 0.25, 50: 1000 ** 0.5, 100: 1000.0}),
    ("linear", {0: 1.0, 25: 250.75, 50: 500.5, 100: 1000.0}),
    ("constant", {0: 1000.0, 25: 1000.0, 50: 1000.0, 100: 1000.0}),
])
def test_temperature_schedule_hand_values_and_jit(kind, expected):
  schedule = lambda step: temperature_schedule(step, total_steps=100, max_temperature=1000.0, kind=kind)
  jitted = jax.jit(schedule)
  for step, value in expected.items():
    python = schedule(step)
    assert isinstance(python, float)
    np.testing.assert_allclose(python, value, rtol=1e-5)
    traced = jitted(jnp.int32(step))
    assert traced.dtype == jnp.float32
    np.testing.assert_allclose(traced, python, rtol=1e-6)
  # Steps outside [0, total_steps] are clamped.
  assert schedule(-5) == schedule(0) and schedule(150) == schedule(100)


def test_temperature_schedule_rejects_bad_inputs():
  with pytest.raises(ValueError, match="Unknown temperature schedule"):
    temperature_schedule(0, total_steps=10, max_temperature=100.0, kind="cosine")
  with pytest.raises(ValueError, match="total_steps"):
    temperature_schedule(0, total_steps=0, max_temperature=100.0)
  with pytest.raises(ValueError, match="max_temperature"):
    temperature_schedule(0, total_steps=10, max_temperature=0.5)
  assert temperature_schedule(3, total_steps=10, max_temperature=1.0) == 1.0


def test_relativistic_losses_hand_values():
  real, fake = jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0])
  softplus = lambda x: math.log1p(math.exp(x))
  d_loss, g_loss = relativistic_losses(real, fake)
  np.testing.assert_allclose(d_loss, (softplus(-1.0) + softplus(2.0)) / 2, rtol=1e-6)
  np.testing.assert_allclose(g_loss, (softplus(1.0) + softplus(-2.0)) / 2, rtol=1e-6)
  assert d_loss.dtype == g_loss.dtype == jnp.float32
  # Equal logits: both players are at log 2.
  np.testing.assert_allclose(relativistic_losses(real, real), (math.log(2), math.log(2)), rtol=1e-6)
  with pytest.raises(ValueError, match="pairs real i with fake i"):
    relativistic_losses(real, jnp.zeros(3))


@pytest.mark.parametrize("options", [{}, {"variant": "llama", "position": "rope", "norm": "rmsnorm",
                                          "mlp": "swiglu", "use_bias": False}])
def test_discriminator_ignores_padding(options):
  model, params = make_discriminator(**options)
  tokens = random_tokens()
  lengths = jnp.array([LENGTH, 5, 1])
  mask = jnp.arange(LENGTH)[None, :] < lengths[:, None]
  score = lambda t: model.apply({"params": params}, one_hot_sequences(t, VOCAB), mask)
  base = np.asarray(score(tokens))
  assert base.shape == (BATCH,) and base.dtype == jnp.float32
  changed = jnp.where(mask, tokens, (tokens + 3) % VOCAB)
  np.testing.assert_allclose(score(changed), base, rtol=1e-6, atol=1e-7)
  # A change at a real position does change that sentence's score, and only its.
  visible = tokens.at[1, 2].set((tokens[1, 2] + 1) % VOCAB)
  moved = np.asarray(score(visible))
  assert not np.isclose(moved[1], base[1])
  np.testing.assert_allclose(moved[[0, 2]], base[[0, 2]], rtol=1e-6, atol=1e-7)


def test_discriminator_validates_its_inputs():
  model, params = make_discriminator()
  variables = {"params": params}
  mask = jnp.ones((BATCH, LENGTH), bool)
  with pytest.raises(ValueError, match="generator's vocab_size"):
    model.apply(variables, jnp.zeros((BATCH, LENGTH, VOCAB + 1)), mask)
  with pytest.raises(ValueError, match="mask has shape"):
    model.apply(variables, jnp.zeros((BATCH, LENGTH, VOCAB)), mask[:, :-1])
  with pytest.raises(ValueError, match="max_len"):
    model.apply(variables, jnp.zeros((BATCH, LENGTH + 1, VOCAB)), jnp.ones((BATCH, LENGTH + 1), bool))
  # Dropout needs its rng only when not deterministic.
  dropout_model = SequenceDiscriminator(tiny_config(dropout=0.5))
  soft = one_hot_sequences(random_tokens(), VOCAB)
  a = dropout_model.apply(variables, soft, mask, deterministic=False, rngs={"dropout": jax.random.key(0)})
  assert np.all(np.isfinite(a)) and not np.allclose(a, dropout_model.apply(variables, soft, mask))


# --- Latent GAN (ARAE, WGAN-GP) ----------------------------------------------------------------------------------


def test_gradient_penalty_of_a_linear_critic_is_exact():
  w = jnp.array([0.6, -2.0, 1.5])
  critic = lambda x: x @ w
  expected = (float(jnp.linalg.norm(w)) - 1.0) ** 2
  for seed in range(3):
    real = jax.random.normal(jax.random.key(seed), (5, 3))
    fake = 3.0 * jax.random.normal(jax.random.key(seed + 10), (5, 3))
    penalty = gradient_penalty(critic, real, fake, jax.random.key(seed + 20))
    assert penalty.shape == () and penalty.dtype == jnp.float32
    np.testing.assert_allclose(penalty, expected, rtol=1e-6)
  # The penalty is differentiable in the critic's parameters: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||.
  grad = jax.grad(lambda v: gradient_penalty(lambda x: x @ v, real, fake, jax.random.key(0)))(w)
  norm = jnp.linalg.norm(w)
  np.testing.assert_allclose(grad, 2.0 * (norm - 1.0) * w / norm, rtol=1e-5)
  # Inputs with more than one non-batch axis are flattened per example.
  w2 = jnp.arange(6.0).reshape(2, 3) / 4.0
  penalty = gradient_penalty(lambda x: jnp.einsum("bij,ij->b", x, w2), jnp.ones((4, 2, 3)), jnp.zeros((4, 2, 3)),
                             jax.random.key(0))
  np.testing.assert_allclose(penalty, (float(jnp.linalg.norm(w2)) - 1.0) ** 2, rtol=1e-6)


def test_gradient_penalty_of_a_quadratic_critic_matches_the_hand_computation():
  critic = lambda x: 0.5 * jnp.sum(jnp.square(x), axis=-1)  # grad = x_hat
  real = jax.random.normal(jax.random.key(0), (6, 4))
  fake = 2.0 + jax.random.normal(jax.random.key(1), (6, 4))
  rng = jax.random.key(2)
  eps = jax.random.uniform(rng, (6,), jnp.float32)  # the draw gradient_penalty makes
  x_hat = eps[:, None] * real + (1.0 - eps[:, None]) * fake
  expected = np.mean((np.linalg.norm(np.asarray(x_hat), axis=-1) - 1.0) ** 2)
  np.testing.assert_allclose(gradient_penalty(critic, real, fake, rng), expected, rtol=1e-5)
  np.testing.assert_allclose(gradient_penalty(critic, real, fake, eps=eps), expected, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(lambda r, f: gradient_penalty(critic, r, f, rng))(real, fake), expected,
                             rtol=1e-5)
  # eps = 1 puts x_hat on the real samples.
  ones = jnp.ones((6,))
  np.testing.assert_allclose(gradient_penalty(critic, real, fake, eps=ones),
                             np.mean((np.linalg.norm(np.asarray(real), axis=-1) - 1.0) ** 2), rtol=1e-5)
  # A flat critic has penalty 1 and a finite gradient (no sqrt(0) blow-up).
  grad = jax.grad(lambda s: gradient_penalty(lambda x: s * jnp.sum(x, -1) * 0.0, real, fake, rng))(1.0)
  assert np.isfinite(grad)
  with pytest.raises(ValueError, match="exactly one of rng"):
    gradient_penalty(critic, real, fake)
  with pytest.raises(ValueError, match="same shape"):
    gradient_penalty(critic, real, fake[:, :2], rng)
  with pytest.raises(ValueError, match="one score per"):
    gradient_penalty(lambda x: x, real, fake, rng)


def test_wgan_losses_hand_values():
  real, fake = jnp.array([2.0, 1.0, 0.0]), jnp.array([-1.0, 0.5])
  np.testing.assert_allclose(wasserstein_estimate(real, fake), 1.0 - (-0.25), rtol=1e-6)
  np.testing.assert_allclose(wgan_critic_loss(real, fake, 0.5), -0.25 - 1.0 + 10.0 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(wgan_critic_loss(real, fake, 0.5, gp_weight=0.0), -1.25, rtol=1e-6)
  np.testing.assert_allclose(wgan_generator_loss(fake), 0.25, rtol=1e-6)
  with pytest.raises(ValueError, match="gp_weight"):
    wgan_critic_loss(real, fake, 0.5, gp_weight=-1.0)
  with pytest.raises(ValueError, match="one score per example"):
    wgan_generator_loss(fake[:, None])


def test_latent_generator_and_critic_shapes_dtypes_and_independence():
  generator = LatentGenerator(latent_size=5, hidden_size=16, num_layers=3)
  noise = jax.random.normal(jax.random.key(0), (4, 7))
  gen_params = {"params": init_params(generator, 1, noise)}
  z = generator.apply(gen_params, noise)
  assert z.shape == (4, 5) and z.dtype == jnp.float32
  critic = LatentCritic(hidden_size=16, num_layers=2)
  critic_params = {"params": init_params(critic, 2, z)}
  scores = np.asarray(critic.apply(critic_params, z))
  assert scores.shape == (4,) and scores.dtype == jnp.float32
  # Changing one example changes neither the other examples' codes nor their scores.
  other_noise = noise.at[2].set(noise[2] + 1.0)
  other_z = np.asarray(generator.apply(gen_params, other_noise))
  np.testing.assert_array_equal(other_z[[0, 1, 3]], np.asarray(z)[[0, 1, 3]])
  other_scores = np.asarray(critic.apply(critic_params, z.at[2].set(z[2] + 1.0)))
  np.testing.assert_array_equal(other_scores[[0, 1, 3]], scores[[0, 1, 3]])
  assert not np.isclose(other_scores[2], scores[2])
  with pytest.raises(ValueError, match="batch, noise_size"):
    generator.apply(gen_params, noise[0])
  with pytest.raises(ValueError, match="batch, latent"):
    critic.apply(critic_params, z[None])


def test_parameters_carry_logical_axes_that_map_onto_a_tensor_parallel_mesh():
  _, rules = PRESETS["fsdp_tp"]
  def abstract_init(module, *inputs):  # shapes and logical axes only, nothing computed
    return jax.eval_shape(module.init, jax.random.key(0), *inputs)

  generator_params = abstract_init(LatentGenerator(latent_size=4, hidden_size=8), jnp.zeros((2, 3)))
  critic_params = abstract_init(LatentCritic(hidden_size=8), jnp.zeros((2, 4)))
  disc_params = abstract_init(SequenceDiscriminator(tiny_config()), jnp.zeros((2, LENGTH, VOCAB)),
                              jnp.ones((2, LENGTH), bool))
  assert nn.get_partition_spec(generator_params)["params"]["hidden_1"]["kernel"] == jax.sharding.PartitionSpec(
      None, "mlp")
  for variables in (generator_params, critic_params, disc_params):
    for spec in jax.tree.leaves(nn.get_partition_spec(variables),
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
      mesh_axes = [axis for axis in nn.logical_to_mesh_axes(tuple(spec), rules) if axis is not None]
      assert len(mesh_axes) == len(set(mesh_axes)), spec
  assert nn.get_partition_spec(disc_params)["params"]["embed"]["embedding"] == jax.sharding.PartitionSpec(
      "vocab", "embed")


def test_toy_wgan_gp_moves_the_generated_codes_toward_the_data():
  # 100 generator steps, each after 5 critic steps (n_critic = 5 and Adam(b1=0.5, b2=0.9) as Gulrajani et al.
  # 2017); the generator starts near 0 and the real codes are N([3, -2], 0.3^2 I).
  real_mean = jnp.array([3.0, -2.0])
  generator = LatentGenerator(latent_size=2, hidden_size=16, num_layers=1)
  critic = LatentCritic(hidden_size=16, num_layers=1)
  gen_params = {"params": init_params(generator, 0, jnp.zeros((1, 4)))}
  critic_params = {"params": init_params(critic, 1, jnp.zeros((1, 2)))}
  critic_optimizer = optax.adam(1e-2, b1=0.5, b2=0.9)
  generator_optimizer = optax.adam(3e-3, b1=0.5, b2=0.9)
  batch, critic_steps = 64, 5

  def critic_loss(c_params, g_params, rng):
    noise_rng, real_rng, gp_rng = jax.random.split(rng, 3)
    real = real_mean + 0.3 * jax.random.normal(real_rng, (batch, 2))
    fake = generator.apply(g_params, jax.random.normal(noise_rng, (batch, 4)))
    critic_fn = lambda x: critic.apply(c_params, x)
    penalty = gradient_penalty(critic_fn, real, fake, gp_rng)
    return wgan_critic_loss(critic_fn(real), critic_fn(fake), penalty)

  def generator_loss(g_params, c_params, rng):
    fake = generator.apply(g_params, jax.random.normal(rng, (batch, 4)))
    return wgan_generator_loss(critic.apply(c_params, fake))

  def step(state, rng):
    g_params, c_params, g_opt, c_opt = state
    rngs = jax.random.split(rng, critic_steps + 1)

    def critic_step(critic_state, critic_rng):
      c_params, c_opt = critic_state
      updates, c_opt = critic_optimizer.update(jax.grad(critic_loss)(c_params, g_params, critic_rng), c_opt)
      return (optax.apply_updates(c_params, updates), c_opt), None

    (c_params, c_opt), _ = jax.lax.scan(critic_step, (c_params, c_opt), rngs[:-1])
    updates, g_opt = generator_optimizer.update(jax.grad(generator_loss)(g_params, c_params, rngs[-1]), g_opt)
    return (optax.apply_updates(g_params, updates), c_params, g_opt, c_opt), None

  def fake_mean(g_params):
    return jnp.mean(generator.apply(g_params, jax.random.normal(jax.random.key(99), (1024, 4))), axis=0)

  state = (gen_params, critic_params, generator_optimizer.init(gen_params), critic_optimizer.init(critic_params))
  state, _ = jax.jit(lambda s: jax.lax.scan(step, s, jax.random.split(jax.random.key(5), 100)))(state)
  before = float(jnp.linalg.norm(fake_mean(gen_params) - real_mean))
  after = float(jnp.linalg.norm(fake_mean(state[0]) - real_mean))
  assert after < 0.5 * before, (before, after)
