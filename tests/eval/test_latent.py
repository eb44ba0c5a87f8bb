"""Latent-variable LM evaluation: importance-weighted NLL on an exact Gaussian toy, MI, active units.

Toy model: z ~ N(0, 1), x | z ~ N(z, 1), so x ~ N(0, 2) and the true
posterior is p(z | x) = N(x / 2, 1 / 2).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.models.latent import (active_units, gaussian_log_density, importance_weighted_nll, mutual_information,
                            mutual_information_estimate, standard_normal_log_density)

X = np.array([-2.0, -0.5, 0.0, 0.7, 1.5, 3.0], np.float32)
EXACT_NLL = 0.5 * (math.log(2 * math.pi * 2.0) + X ** 2 / 2.0)  # -log N(x; 0, 2)
KS = (1, 10, 100, 1000)
REPEATS = 400
# A proposal that is not the posterior: its mean is off by Q_MEAN_SHIFT, so the importance weights are
# log-normal with variance exp(Q_MEAN_SHIFT^2 / 0.5) - 1 ~ 17, a bound gap of ~1.4 nats at k = 1 and clear
# gaps at k = 100 (~0.05), well above the Monte-Carlo noise of REPEATS averaged bounds (~0.005).
Q_MEAN_SCALE, Q_MEAN_SHIFT, Q_LOGVAR = 0.5, 1.2, math.log(0.5)


def log_weights_terms(q_mu, q_logvar, eps):
  """z = q_mu + sigma * eps; returns log p(x|z), log q(z|x), log p(z), each [..., batch]."""
  z = q_mu + jnp.exp(0.5 * q_logvar) * eps
  log_px = gaussian_log_density(X[..., None], z[..., None], jnp.zeros_like(z)[..., None])
  log_qz = gaussian_log_density(z[..., None], q_mu[..., None], q_logvar[..., None])
  log_pz = standard_normal_log_density(z[..., None])
  return log_px, log_qz, log_pz


@jax.jit
def iw_nll_by_k(q_mu, q_logvar):
  """Mean over REPEATS of the k-sample IW NLL per example ([batch] per k in KS), and the [1000, REPEATS, batch] terms.

  The k-sample bounds use the first k of the same 1000 samples (common random numbers), so their differences
  are far less noisy than the bounds themselves.
  """
  eps = jax.random.normal(jax.random.key(0), (max(KS), REPEATS, X.size))
  terms = log_weights_terms(q_mu, q_logvar, eps)
  per_k = {k: jnp.mean(jax.vmap(importance_weighted_nll, in_axes=(1, 1, 1))(*(t[:k] for t in terms)), axis=0)
           for k in KS}
  return per_k, terms


def test_densities_match_closed_forms():
  z = np.array([[0.3, -1.0], [2.0, 0.5]], np.float32)
  mu, logvar = np.array([0.1, -0.4], np.float32), np.array([0.2, -1.0], np.float32)
  expected = (-0.5 * (np.log(2 * np.pi) + logvar + (z - mu) ** 2 / np.exp(logvar))).sum(-1)
  np.testing.assert_allclose(gaussian_log_density(z, mu, logvar), expected, rtol=1e-6)
  np.testing.assert_allclose(standard_normal_log_density(z), gaussian_log_density(z, 0.0, 0.0), rtol=1e-6)
  assert gaussian_log_density(np.zeros((5, 3, 2)), np.zeros((3, 2)), np.zeros((3, 2))).shape == (5, 3)


def test_iw_nll_is_below_the_elbo_nll_and_tightens_with_k():
  q_mu = jnp.asarray(Q_MEAN_SCALE * X + Q_MEAN_SHIFT)
  q_logvar = jnp.full_like(q_mu, Q_LOGVAR)
  per_k, terms = iw_nll_by_k(q_mu, q_logvar)
  per_k = {k: np.asarray(v) for k, v in per_k.items()}
  log_px, log_qz, log_pz = (t[:, 0] for t in terms)  # one repeat: [1000, batch]
  iw = np.asarray(importance_weighted_nll(log_px, log_qz, log_pz))
  elbo_nll = np.asarray(-(log_px + log_pz - log_qz).mean(0))
  assert np.all(iw <= elbo_nll + 1e-6)  # Jensen, for every draw
  # k = 1 is the per-sample negative ELBO.
  np.testing.assert_allclose(importance_weighted_nll(log_px[:1], log_qz[:1], log_pz[:1]),
                             -(log_px[0] + log_pz[0] - log_qz[0]), rtol=1e-6)
  gaps = [per_k[k] - EXACT_NLL for k in KS]
  for looser, tighter in zip(gaps, gaps[1:]):
    assert np.all(tighter < looser), (looser, tighter)
  assert np.all(gaps[0] > 1.0)  # KL(q || posterior) = 1.44 nats
  assert np.all(gaps[-1] < 0.03) and np.all(gaps[-1] > -0.01)  # close to -log p(x), never clearly below it


def test_iw_nll_is_exact_with_the_true_posterior():
  q_mu = jnp.asarray(X / 2.0)
  q_logvar = jnp.full_like(q_mu, math.log(0.5))
  per_k, _ = iw_nll_by_k(q_mu, q_logvar)
  for k in KS:
    np.testing.assert_allclose(per_k[k], EXACT_NLL, atol=1e-4)


def test_iw_nll_is_stable_and_validates():
  big = jnp.full((4, 3), -5000.0)
  np.testing.assert_allclose(importance_weighted_nll(big, jnp.zeros((4, 3)), jnp.zeros((4, 3))), 5000.0)
  with pytest.raises(ValueError, match="shapes"):
    importance_weighted_nll(jnp.zeros((4, 3)), jnp.zeros((4, 2)), jnp.zeros((4, 3)))


def test_mutual_information_zero_at_prior_positive_when_separated():
  batch, latent = 2000, 4
  prior = mutual_information(jnp.zeros((batch, latent)), jnp.zeros((batch, latent)), rng=jax.random.key(0))
  assert abs(prior) < 0.1
  n = 64
  mu = jnp.stack([10.0 * jnp.arange(n), jnp.zeros(n)], axis=1)
  separated = mutual_information(mu, jnp.zeros((n, 2)), rng=jax.random.key(1))
  # Near the batch-mixture estimate's ceiling log(n), up to the noise of the 64 samples of log q(z|x).
  assert separated == pytest.approx(math.log(n), abs=0.3)
  z = jax.random.normal(jax.random.key(2), (n, 2)) + mu
  assert mutual_information(mu, jnp.zeros((n, 2)), z=z) == pytest.approx(
      float(jax.jit(mutual_information_estimate)(mu, jnp.zeros((n, 2)), z)), rel=1e-6)
  with pytest.raises(ValueError, match="rng"):
    mutual_information(mu, jnp.zeros((n, 2)))


def test_active_units_counts_varying_dims():
  rng = np.random.default_rng(0)
  mu = np.stack([rng.normal(0, 1.0, 100), rng.normal(0, 0.5, 100), np.full(100, 3.0)], axis=1)
  assert active_units(mu) == 2
  assert active_units([mu[:30], mu[30:70], mu[70:]]) == 2
  assert active_units(mu, threshold=0.5) == 1  # only the std-1 dim has variance above 0.5
  tiny = np.stack([np.linspace(-0.05, 0.05, 50), np.zeros(50)], axis=1)  # variance ~ 0.0009
  assert active_units(tiny) == 0
  with pytest.raises(ValueError, match="latent"):
    active_units([mu, mu[:, :2]])
