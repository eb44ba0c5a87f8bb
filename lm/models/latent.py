"""Evaluation of a latent-variable LM (a sentence VAE): likelihood bounds and latent usage.

A VAE's exact likelihood log p(x) = log E_p(z)[p(x|z)] is intractable, and its
ELBO can be far below it, so perplexities computed from the ELBO flatter the
plain LM in comparisons. The standard remedy is the importance-weighted
estimate with the encoder as proposal (Burda et al. 2016, "Importance
Weighted Autoencoders"):

  log p(x) >= log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x),   z_i ~ q(z|x),

a bound that tightens monotonically (in expectation) with k and equals the
ELBO at k = 1; papers report it with k in the hundreds (e.g. k = 500 in He et
al. 2019, "Lagging Inference Networks and Posterior Collapse in Variational
Autoencoders"; Li et al. 2020, "Optimus").

Whether z is used at all is measured by
  * the mutual information I(x; z) under q, estimated as in He et al. 2019
    (their code, also used by Optimus): E_x[-H(q(z|x))] - E_z[log q(z)], with
    the aggregate posterior q(z) approximated by the mixture of the batch's
    posteriors, so the estimate is at most about log(batch size);
  * the number of active units (Burda et al. 2016): latent dimensions whose
    posterior mean varies across examples, Cov_x(E_q(z|x)[z_d]) > 0.01.

Densities are float32 nats and pure jit-friendly JAX, except
`mutual_information` and `active_units`, which return Python numbers for
logging (`mutual_information_estimate` is the jit-friendly core).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LOG_2PI = math.log(2.0 * math.pi)
# Burda et al. 2016: a unit is active when Cov_x(E[z_d | x]) exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def importance_weighted_nll(log_px_given_z: jax.Array, log_qz_given_x: jax.Array, log_pz: jax.Array) -> jax.Array:
  """-log (1/k) sum_i exp(log p(x|z_i) + log p(z_i) - log q(z_i|x)) per example, float32 [batch].

  All inputs: [k, batch], for k samples z_i ~ q(z|x) per example (log p(x|z)
  summed over the sentence's tokens). Computed with logsumexp, so it is stable
  for log weights in the thousands of nats. With k = 1 it is the negative ELBO
  of that sample; it never exceeds the mean over i of the per-sample negative
  ELBOs (Jensen), and upper-bounds -log p(x) in expectation. Divide by the
  number of tokens for a per-token NLL (and exp for a perplexity bound).
  """
  shapes = {jnp.shape(log_px_given_z), jnp.shape(log_qz_given_x), jnp.shape(log_pz)}
  if len(shapes) != 1:
    raise ValueError(f"log_px_given_z, log_qz_given_x and log_pz have shapes {jnp.shape(log_px_given_z)}, "
                     f"{jnp.shape(log_qz_given_x)}, {jnp.shape(log_pz)}; pass all three as [k, batch] for the "
                     "same k samples (sum log densities over tokens and latent dims first).")
  if len(jnp.shape(log_pz)) < 1 or jnp.shape(log_pz)[0] < 1:
    raise ValueError("The inputs need a leading sample axis with k >= 1: shape [k, batch]; add one with "
                     "x[None] for a single sample.")
  log_w = _f32(log_px_given_z) + _f32(log_pz) - _f32(log_qz_given_x)
  k = jnp.shape(log_w)[0]
  return -(jax.scipy.special.logsumexp(log_w, axis=0) - math.log(k))


def gaussian_log_density(z: jax.Array, mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """log N(z; mu, diag exp(logvar)) summed over the last (latent) axis, float32.

  z, mu, logvar broadcast together, e.g. z [k, batch, latent] against mu,
  logvar [batch, latent] gives [k, batch]; z [batch, 1, latent] against
  [1, batch, latent] gives every sample's density under every posterior.
  """
  z, mu, logvar = _f32(z), _f32(mu), _f32(logvar)
  return -0.5 * jnp.sum(LOG_2PI + logvar + jnp.square(z - mu) * jnp.exp(-logvar), axis=-1)


def standard_normal_log_density(z: jax.Array) -> jax.Array:
  """log N(z; 0, I) summed over the last (latent) axis, float32: [..., latent] -> [...]."""
  z = _f32(z)
  return -0.5 * jnp.sum(LOG_2PI + jnp.square(z), axis=-1)


def mutual_information_estimate(mu: jax.Array, logvar: jax.Array, z: jax.Array,
                                valid: jax.Array | None = None) -> jax.Array:
  """The jit-friendly core of `mutual_information`: a float32 scalar, in nats.

  mu, logvar, z: [batch, latent], z[j] one sample of q(z | x_j).
  E_q(z|x) log q(z|x) = -H(q(z|x)) is exact for a Gaussian; log q(z_j) =
  logsumexp_i log q(z_j | x_i) - log(batch). valid: [batch] (1 for real
  examples, 0 for padding rows, which then count neither as x nor as z);
  None: all rows.
  """
  mu, logvar, z = _f32(mu), _f32(logvar), _f32(z)
  batch, latent = mu.shape
  weights = jnp.ones((batch,), jnp.float32) if valid is None else _f32(valid)
  count = jnp.maximum(jnp.sum(weights), 1.0)
  neg_entropy_each = -0.5 * latent * LOG_2PI - 0.5 * jnp.sum(1.0 + logvar, axis=-1)
  neg_entropy = jnp.sum(weights * neg_entropy_each) / count
  # [batch_z, batch_x]: log q(z_j | x_i).
  log_density = gaussian_log_density(z[:, None, :], mu[None, :, :], logvar[None, :, :])
  log_density = jnp.where(weights[None, :] > 0, log_density, -jnp.inf)
  log_qz = jax.scipy.special.logsumexp(log_density, axis=1) - jnp.log(count)
  return neg_entropy - jnp.sum(weights * jnp.where(weights > 0, log_qz, 0.0)) / count


def mutual_information(mu: jax.Array,
                       logvar: jax.Array,
                       z: jax.Array | None = None,
                       rng: jax.Array | None = None) -> float:
  """I(x; z) under q, estimated on one batch as in He et al. 2019: a Python float, in nats.

  mu, logvar: [batch, latent], the posteriors of the batch's examples. z:
  [batch, latent], one sample per example; if None, drawn from q with rng.
  The aggregate posterior q(z) is the mixture of the batch's posteriors, so
  the estimate is roughly within [0, log(batch)] (Monte-Carlo noise can make
  it slightly negative) and grows with the batch; compare values at one batch
  size, and average over batches for a smoother number.
  """
  mu, logvar = jnp.asarray(mu), jnp.asarray(logvar)
  if mu.ndim != 2 or mu.shape != logvar.shape:
    raise ValueError(f"mu {mu.shape} and logvar {logvar.shape} must both be [batch, latent]; pass the "
                     "encoder's outputs for one batch.")
  if mu.shape[0] < 2:
    raise ValueError("mutual_information needs a batch of at least 2 examples to approximate q(z) by their "
                     "mixture; pass a larger batch.")
  if z is None:
    if rng is None:
      raise ValueError("mutual_information needs either z (one sample per example, [batch, latent]) or rng "
                       "to draw it; pass rng=jax.random.key(0) for instance.")
    z = _f32(mu) + jnp.exp(0.5 * _f32(logvar)) * jax.random.normal(rng, mu.shape, jnp.float32)
  z = jnp.asarray(z)
  if z.shape != mu.shape:
    raise ValueError(f"z has shape {z.shape} but mu has {mu.shape}; pass one sample per example, "
                     "[batch, latent].")
  return float(_jit_mutual_information(mu, logvar, z))


_jit_mutual_information = jax.jit(mutual_information_estimate)


def active_units(mu_batches: Sequence[np.ndarray] | np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
  """Number of latent dims d with Cov_x(E_q(z|x)[z_d]) > threshold (Burda et al. 2016).

  mu_batches: the posterior means of all evaluation examples, either one
  [n, latent] array or a sequence of [batch_i, latent] arrays (stacked to
  [n, latent]). The variance over examples is unbiased (ddof=1), as in the
  code of He et al. 2019.
  """
  if isinstance(mu_batches, (np.ndarray, jax.Array)):
    batches = [np.asarray(mu_batches)]
  else:
    batches = [np.asarray(b) for b in mu_batches]
  if not batches or any(b.ndim != 2 for b in batches) or len({b.shape[1] for b in batches}) != 1:
    raise ValueError(f"mu_batches has shapes {[b.shape for b in batches]}; pass posterior means as [n, latent] "
                     "or a non-empty list of [batch, latent] arrays with the same latent size.")
  mu = np.concatenate(batches, axis=0).astype(np.float64)
  if mu.shape[0] < 2:
    raise ValueError(f"active_units needs at least 2 examples to measure a variance, got {mu.shape[0]}; "
                     "pass the means of the whole evaluation set.")
  return int(np.sum(np.var(mu, axis=0, ddof=1) > threshold))
