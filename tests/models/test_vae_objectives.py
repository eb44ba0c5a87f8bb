"""VAE objective pieces: KL closed form vs Monte Carlo, free bits, beta schedules, word dropout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.models.vae_objectives import gaussian_kl, kl_weight, kl_with_free_bits, reparameterize, word_dropout

MU = np.array([[0.0, 1.0, -1.5, 0.3], [0.5, -0.2, 2.0, 0.0], [1.0, 0.0, 0.0, -0.7]], np.float32)
LOGVAR = np.array([[0.0, -1.0, 0.5, 1.0], [-0.5, 0.2, -2.0, 0.0], [0.3, 1.0, -0.3, 0.0]], np.float32)
MC_SAMPLES = 200_000
UNK, VOCAB = 1, 100


def per_dim_log_normal(z, mu, logvar):
  return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / np.exp(logvar))


def test_reparameterize_moments_and_determinism():
  mu, logvar = jnp.broadcast_to(MU, (MC_SAMPLES,) + MU.shape), jnp.broadcast_to(LOGVAR, (MC_SAMPLES,) + MU.shape)
  z = np.asarray(reparameterize(jax.random.key(0), mu, logvar))
  assert z.shape == (MC_SAMPLES,) + MU.shape
  np.testing.assert_allclose(z.mean(0), MU, atol=0.02)
  np.testing.assert_allclose(z.var(0), np.exp(LOGVAR), rtol=0.02)
  np.testing.assert_array_equal(reparameterize(jax.random.key(3), MU, LOGVAR),
                                reparameterize(jax.random.key(3), MU, LOGVAR))
  grad = jax.grad(lambda m: jnp.sum(reparameterize(jax.random.key(1), m, jnp.asarray(LOGVAR))))(jnp.asarray(MU))
  np.testing.assert_allclose(grad, np.ones_like(MU))
  with pytest.raises(ValueError, match="shape"):
    reparameterize(jax.random.key(0), MU, LOGVAR[:, :2])


def test_gaussian_kl_closed_form_and_zero_at_prior():
  kl = np.asarray(gaussian_kl(MU, LOGVAR))
  assert kl.shape == MU.shape and kl.dtype == np.float32
  np.testing.assert_allclose(kl, 0.5 * (MU ** 2 + np.exp(LOGVAR) - 1 - LOGVAR), rtol=1e-6, atol=1e-7)
  assert np.all(kl >= 0)
  np.testing.assert_array_equal(gaussian_kl(jnp.zeros((2, 3)), jnp.zeros((2, 3))), np.zeros((2, 3)))


def test_gaussian_kl_matches_monte_carlo():
  shape = (MC_SAMPLES,) + MU.shape
  z = np.asarray(reparameterize(jax.random.key(7), jnp.broadcast_to(MU, shape), jnp.broadcast_to(LOGVAR, shape)),
                 np.float64)
  log_q = per_dim_log_normal(z, MU, LOGVAR)
  log_p = per_dim_log_normal(z, 0.0, 0.0)
  mc = (log_q - log_p).mean(0)
  np.testing.assert_allclose(mc, gaussian_kl(MU, LOGVAR), atol=0.02)


def test_free_bits_clamps_small_dims_only():
  # Batch-mean KL per dim: [0.05, 0.5, 0.2, 1.0]; threshold 0.25 lifts dims 0 and 2.
  kl = jnp.array([[0.0, 0.4, 0.1, 1.5], [0.1, 0.6, 0.3, 0.5]])
  np.testing.assert_allclose(kl_with_free_bits(kl, 0.25), 0.25 + 0.5 + 0.25 + 1.0, rtol=1e-6)
  np.testing.assert_allclose(kl_with_free_bits(kl, 0.0), 0.05 + 0.5 + 0.2 + 1.0, rtol=1e-6)
  # Clamped dims get no gradient; the others get 1 / batch per example.
  grad = jax.grad(lambda k: kl_with_free_bits(k, 0.25))(kl)
  np.testing.assert_allclose(grad, [[0.0, 0.5, 0.0, 0.5]] * 2)
  with pytest.raises(ValueError, match="negative"):
    kl_with_free_bits(kl, -0.1)


@pytest.mark.parametrize("schedule, options, expected", [
    ("constant", {}, {0: 1.0, 50: 1.0, 1000: 1.0}),
    ("constant", {"ae_steps": 10}, {0: 0.0, 9: 0.0, 10: 1.0}),
    ("linear", {"warmup_steps": 10}, {0: 0.0, 5: 0.5, 10: 1.0, 500: 1.0}),
    ("monotonic", {"warmup_steps": 10, "ae_steps": 5}, {0: 0.0, 4: 0.0, 5: 0.0, 10: 0.5, 15: 1.0, 99: 1.0}),
    ("linear", {}, {0: 1.0, 3: 1.0}),
    # Period 25, rise over 12.5 steps.
    ("cyclical", {}, {0: 0.0, 6: 0.48, 12: 0.96, 13: 1.0, 24: 1.0, 25: 0.0, 30: 0.4, 99: 1.0, 100: 1.0, 200: 1.0}),
    # 80 steps after the ae phase: period 20, rise over 10 steps.
    ("cyclical", {"ae_steps": 20}, {0: 0.0, 19: 0.0, 20: 0.0, 25: 0.5, 30: 1.0, 39: 1.0, 40: 0.0, 45: 0.5}),
    ("cyclical", {"cycles": 1, "ratio": 1.0}, {0: 0.0, 50: 0.5, 99: 0.99}),
])
def test_kl_weight_hand_computed(schedule, options, expected):
  for step, beta in expected.items():
    got = kl_weight(step, schedule=schedule, total_steps=100, **options)
    assert isinstance(got, float)
    assert got == pytest.approx(beta, abs=1e-6), (schedule, options, step)


def test_kl_weight_traced_step_matches_python():
  steps = [0, 6, 12, 25, 30, 99]
  fn = jax.jit(lambda s: kl_weight(s, schedule="cyclical", total_steps=100, cycles=4, ratio=0.5))
  traced = [float(fn(jnp.int32(s))) for s in steps]
  np.testing.assert_allclose(traced, [0.0, 0.48, 0.96, 0.0, 0.4, 1.0], atol=1e-6)
  linear = jax.vmap(lambda s: kl_weight(s, schedule="linear", total_steps=100, warmup_steps=10, ae_steps=5))
  np.testing.assert_allclose(linear(jnp.arange(0, 20, 5)), [0.0, 0.0, 0.5, 1.0], atol=1e-6)


@pytest.mark.parametrize("options, match", [
    ({"schedule": "cosine"}, "Unknown KL schedule"),
    ({"schedule": "cyclical", "cycles": 0}, "cycles"),
    ({"schedule": "cyclical", "ratio": 0.0}, "ratio"),
    ({"schedule": "cyclical", "ratio": 1.5}, "ratio"),
    ({"schedule": "cyclical", "ae_steps": 100}, "total_steps"),
    ({"schedule": "linear", "warmup_steps": -1}, ">= 0"),
])
def test_kl_weight_validation(options, match):
  with pytest.raises(ValueError, match=match):
    kl_weight(0, total_steps=100, **options)


def random_tokens(batch: int = 512, length: int = 64) -> jax.Array:
  return jax.random.randint(jax.random.key(11), (batch, length), 2, VOCAB, jnp.int32)


def test_word_dropout_rate_and_first_token():
  tokens = random_tokens()
  out = word_dropout(jax.random.key(0), tokens, 0.3, unk_id=UNK)
  assert out.shape == tokens.shape and out.dtype == tokens.dtype
  np.testing.assert_array_equal(out[:, 0], tokens[:, 0])
  dropped = np.asarray(out[:, 1:] == UNK)
  assert abs(dropped.mean() - 0.3) < 0.01
  kept = ~dropped
  np.testing.assert_array_equal(np.asarray(out[:, 1:])[kept], np.asarray(tokens[:, 1:])[kept])
  no_keep = word_dropout(jax.random.key(0), tokens, 0.3, unk_id=UNK, keep_first=False)
  assert abs(float(jnp.mean(no_keep[:, 0] == UNK)) - 0.3) < 0.07
  assert bool(jnp.all(word_dropout(jax.random.key(0), tokens, 1.0, unk_id=UNK)[:, 1:] == UNK))


def test_word_dropout_identity_and_determinism():
  tokens = random_tokens(8, 16)
  np.testing.assert_array_equal(word_dropout(jax.random.key(0), tokens, 0.0, unk_id=UNK), tokens)
  a = word_dropout(jax.random.key(5), tokens, 0.5, unk_id=UNK)
  np.testing.assert_array_equal(a, word_dropout(jax.random.key(5), tokens, 0.5, unk_id=UNK))
  assert not np.array_equal(a, word_dropout(jax.random.key(6), tokens, 0.5, unk_id=UNK))
  jitted = jax.jit(lambda r, t: word_dropout(r, t, 0.5, unk_id=UNK))
  np.testing.assert_array_equal(jitted(jax.random.key(5), tokens), a)
  with pytest.raises(ValueError, match="rate"):
    word_dropout(jax.random.key(0), tokens, 1.5, unk_id=UNK)
