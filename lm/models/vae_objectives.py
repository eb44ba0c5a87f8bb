"""Pieces of the training objective of a sentence VAE: ELBO terms and the tricks against posterior collapse.

A sentence VAE (Bowman et al. 2016, "Generating Sentences from a Continuous
Space") encodes a sentence x to a diagonal Gaussian q(z|x) = N(mu, exp(logvar))
and trains a decoder p(x|z) with the evidence lower bound

  ELBO = E_q[log p(x|z)] - beta * KL(q(z|x) || p(z)),   p(z) = N(0, I).

With a strong autoregressive decoder the KL term quickly goes to zero and the
decoder ignores z ("posterior collapse"). The remedies here, all pure and
jit-friendly JAX functions:

- `reparameterize`: z = mu + sigma * eps, so gradients flow into mu, logvar
  (Kingma & Welling 2014, "Auto-Encoding Variational Bayes").
- `gaussian_kl`: the closed-form KL to the standard normal, per dimension.
- `kl_with_free_bits`: KL thresholding per dimension, so the model is not
  pushed to spend less than `free_bits` nats in any latent dimension (Kingma
  et al. 2016, "Improved Variational Inference with Inverse Autoregressive
  Flow"; the per-dimension, batch-mean form of Li et al. 2019, "A
  Surprisingly Effective Fix for Deep Latent Variable Modeling of Text", used
  by Optimus, Li et al. 2020).
- `kl_weight`: the beta schedule: KL annealing (Bowman et al. 2016), the
  cyclical schedule (Fu et al. 2019, "Cyclical Annealing Schedule: A Simple
  Approach to Mitigating KL Vanishing"), and an autoencoder warm start (beta
  = 0 first, Li et al. 2019).
- `word_dropout`: weakens the decoder by hiding some of its input tokens, so it
  must rely on z (Bowman et al. 2016).

KL values are float32 nats whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("constant", "linear", "monotonic", "cyclical")
# Defaults of Fu et al. 2019: 4 cycles, beta rises over the first half of each.
DEFAULT_CYCLES = 4
DEFAULT_RATIO = 0.5


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def reparameterize(rng: jax.Array, mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """One sample z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I), differentiable in mu, logvar.

  mu, logvar: [batch, latent] (any matching shape works, e.g. [k, batch,
  latent] for k samples per example). Returns z with mu's shape and dtype.
  """
  if jnp.shape(mu) != jnp.shape(logvar):
    raise ValueError(f"mu has shape {jnp.shape(mu)} but logvar has shape {jnp.shape(logvar)}; pass the two "
                     "outputs of the same encoder head (broadcast them to one shape first).")
  mu, logvar = jnp.asarray(mu), jnp.asarray(logvar)
  dtype = mu.dtype if jnp.issubdtype(mu.dtype, jnp.floating) else jnp.float32
  eps = jax.random.normal(rng, mu.shape, dtype)
  return (mu + jnp.exp(0.5 * logvar) * eps).astype(dtype)


def gaussian_kl(mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mu, diag exp(logvar)) || N(0, I)) per example and dimension, float32 nats.

  mu, logvar: [batch, latent]. Returns [batch, latent], each entry
  0.5 * (mu^2 + exp(logvar) - 1 - logvar) >= 0; sum over the last axis for
  the KL of one example.
  """
  mu, logvar = _f32(mu), _f32(logvar)
  return 0.5 * (jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar)


def kl_with_free_bits(kl_per_dim: jax.Array, free_bits: float) -> jax.Array:
  """sum_d max(mean over the batch of KL_d, free_bits): a float32 scalar.

  kl_per_dim: [batch, latent] (e.g. `gaussian_kl`); any leading axes are
  averaged. A dimension whose batch-mean KL is below `free_bits` nats counts as
  exactly `free_bits` and gets no gradient, so the optimizer gains nothing by
  collapsing it further. free_bits = 0 gives the plain batch-mean KL summed
  over dimensions (KL >= 0).
  """
  if isinstance(free_bits, (int, float, np.floating, np.integer)) and free_bits < 0:
    raise ValueError(f"free_bits={free_bits} is negative; it is a per-dimension KL floor in nats, "
                     "pass 0 to turn it off or a small positive value such as 0.1 to 0.5.")
  kl = _f32(kl_per_dim)
  if kl.ndim < 1:
    raise ValueError("kl_per_dim is a scalar; pass the per-dimension KL of shape [batch, latent], "
                     "e.g. gaussian_kl(mu, logvar), not its sum.")
  mean_per_dim = jnp.mean(kl.reshape(-1, kl.shape[-1]), axis=0)
  return jnp.sum(jnp.maximum(mean_per_dim, _f32(free_bits)))


def kl_weight(step: int | jax.Array,
              *,
              schedule: str,
              total_steps: int,
              warmup_steps: int = 0,
              cycles: int = DEFAULT_CYCLES,
              ratio: float = DEFAULT_RATIO,
              ae_steps: int = 0) -> float | jax.Array:
  """The KL weight beta in [0, 1] at `step` (0-based).

  Schedules, after an autoencoder warm start of `ae_steps` steps with beta = 0
  (s = step - ae_steps is the step within the schedule):
    * "constant": beta = 1.
    * "linear" (alias "monotonic"): beta = min(1, s / warmup_steps), 1 at once
      when warmup_steps = 0.
    * "cyclical" (Fu et al. 2019): the remaining total_steps - ae_steps steps
      are split into `cycles` cycles of length P; at position t = s mod P in
      its cycle, beta = min(1, t / (ratio * P)): a linear rise from 0 over
      the first `ratio` of the cycle, then 1. Steps at or past total_steps
      get beta = 1 (the schedule ends at full KL).

  `step` may be a Python int (returns a Python float) or a jnp scalar, traced
  under jit (returns a float32 scalar). Other arguments are static Python
  values.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"Unknown KL schedule {schedule!r}; use one of {SCHEDULES} "
                     "(the autoencoder warm start is the ae_steps argument, not a schedule).")
  if not isinstance(cycles, (int, np.integer)) or cycles < 1:
    raise ValueError(f"cycles={cycles!r} must be an integer >= 1; pass cycles=1 for a single ramp.")
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f"ratio={ratio} must satisfy 0 < ratio <= 1 (the fraction of each cycle spent "
                     "rising from 0 to 1); Fu et al. 2019 use 0.5.")
  if warmup_steps < 0 or ae_steps < 0:
    raise ValueError(f"warmup_steps={warmup_steps} and ae_steps={ae_steps} must be >= 0; pass 0 to "
                     "turn the warmup or the autoencoder phase off.")
  if schedule == "cyclical" and total_steps <= ae_steps:
    raise ValueError(f"The cyclical schedule needs total_steps ({total_steps}) > ae_steps ({ae_steps}) so "
                     "that cycles remain after the autoencoder phase; raise total_steps or lower ae_steps.")

  python_step = isinstance(step, (int, np.integer)) and not isinstance(step, bool)
  s = _f32(step) - float(ae_steps)
  if schedule == "constant":
    beta = jnp.ones_like(s)
  elif schedule in ("linear", "monotonic"):
    beta = jnp.ones_like(s) if warmup_steps == 0 else jnp.clip(s / float(warmup_steps), 0.0, 1.0)
  else:
    period = (float(total_steps) - float(ae_steps)) / float(cycles)
    position = jnp.mod(jnp.maximum(s, 0.0), period)
    beta = jnp.minimum(position / (ratio * period), 1.0)
    beta = jnp.where(_f32(step) >= float(total_steps), 1.0, beta)
  beta = jnp.where(s < 0.0, 0.0, beta).astype(jnp.float32)
  return float(beta) if python_step else beta


def word_dropout(rng: jax.Array, tokens: jax.Array, rate: float, *, unk_id: int, keep_first: bool = True) -> jax.Array:
  """Replaces each decoder input token by unk_id with probability `rate` (Bowman et al. 2016).

  rng: one key, or [batch] typed keys (`jax.random.key`), one per row (the
  draws of a row then do not depend on the other rows). tokens: [batch, length] integer ids (the
  decoder's input, not its targets).
  With keep_first, position 0 (e.g. BOS) is never replaced. rate = 0 returns
  tokens unchanged; rate = 1 replaces every (droppable) token. Returns
  [batch, length] with tokens' dtype. rate is a static Python float.
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"Word dropout rate={rate} must be in [0, 1]; Bowman et al. 2016 find values around "
                     "0.25 to 0.5 useful, 0 turns it off.")
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens has shape {tokens.shape}; pass the decoder inputs as [batch, length].")
  if rate == 0.0:
    return tokens
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim == 1:  # a typed key per row
    drop = jax.vmap(lambda key: jax.random.bernoulli(key, rate, tokens.shape[1:]))(rng)
  else:
    drop = jax.random.bernoulli(rng, rate, tokens.shape)
  if keep_first:
    drop = drop.at[:, 0].set(False)
  return jnp.where(drop, jnp.asarray(unk_id, tokens.dtype), tokens)
