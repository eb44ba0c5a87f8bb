"""Pieces of two text GANs on the Transformer backbone: a latent-space GAN and Gumbel-softmax fine-tuning.

Text is discrete, so a discriminator's gradient cannot reach the generator
through sampled tokens. The two usual ways around that, both here as pure
modules and losses (the training loops live elsewhere):

1. A GAN in a continuous latent space: ARAE (Zhao et al. 2018,
   "Adversarially Regularized Autoencoders"). An autoencoder (e.g. the
   `SentenceVAE` of `lm.models.vae`, or its encoder's mean) maps sentences to
   codes z; a `LatentGenerator` maps noise to fake codes, and a `LatentCritic`
   tells real codes from fake ones. Training uses the Wasserstein GAN with
   gradient penalty (WGAN-GP, Gulrajani et al. 2017, "Improved Training of
   Wasserstein GANs"):

     critic:     min  E[D(fake)] - E[D(real)] + lambda * E[(||grad_x D(x_hat)||_2 - 1)^2],
                 x_hat = eps * real + (1 - eps) * fake,   eps ~ U[0, 1] per example
     generator:  min -E[D(fake)]

   (`gradient_penalty`, `wgan_critic_loss`, `wgan_generator_loss`;
   `wasserstein_estimate` is the critic's estimate E[D(real)] - E[D(fake)] of
   the Wasserstein-1 distance, the quantity to watch). Generated codes are
   decoded into sentences by the autoencoder's decoder. Everything the
   critic sees is continuous, so gradients are exact.

2. Adversarial fine-tuning of the language model itself with the
   Gumbel-softmax relaxation: RelGAN (Nie et al. 2019, "RelGAN: Relational
   Generative Adversarial Networks for Text Generation"; the relaxation is
   Jang et al. 2017 and Maddison et al. 2017). With Gumbel noise g the sample
   argmax(logits + g) is an exact draw from softmax(logits) (`gumbel_argmax`),
   and its relaxation softmax((logits + g) / T) (`gumbel_softmax`) is a point
   of the probability simplex that tends to the one-hot of that same token as
   the temperature T -> 0. A `SequenceDiscriminator` (a small bidirectional
   Transformer) reads these soft one-hots as a weighted mix of its embedding
   rows, so its score is differentiable in the generator's logits. RelGAN
   anneals the inverse temperature upwards (`temperature_schedule`; larger
   values give more exploration and more diverse samples) and trains with the
   relativistic standard GAN loss (Jolicoeur-Martineau 2019, "The
   relativistic discriminator: a key element missing from standard GAN";
   `relativistic_losses`).

   What is differentiable: the generator's tokens are chosen autoregressively
   with the hard `gumbel_argmax` (with the KV cache; the input of each step is
   a discrete token and carries no gradient). Draw the noise once, [batch,
   length, vocab], sample with it, then recompute the logits of the sampled
   sequence in one teacher-forced forward pass (the same logits as during
   sampling, since the inputs are the same hard tokens) and relax them with
   the SAME noise: argmax(gumbel_softmax(logits, noise, T)) equals the sampled
   tokens, and the generator's gradient flows through the soft one-hots into
   the logits at every position (and from there into every parameter of the
   LM). Real sentences enter the discriminator as exact one-hots
   (`one_hot_sequences`).

Scores and losses are float32 whatever the compute dtype. Every function is
pure and jit-friendly; the temperature may be a traced scalar.

The latent axis of the new parameters is the logical axis `latent` and the
hidden units are on `mlp` (hidden-to-hidden kernels have their input axis
replicated, None, so no mesh axis appears twice in one kernel).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.models.layers import Projection, add_learned_positions, make_norm, ones_init, param_init, zeros_init
from lm.models.transformer import TransformerConfig, apply_blocks

TEMPERATURE_SCHEDULES = ("exponential", "linear", "constant")
# Gulrajani et al. 2017 use lambda = 10 in every experiment.
DEFAULT_GP_WEIGHT = 10.0
EULER_MASCHERONI = 0.5772156649015329  # the mean of Gumbel(0, 1)


def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _is_python_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------------------------
# 1. Latent GAN (ARAE) with WGAN-GP.
# ---------------------------------------------------------------------------------------------------------------


def _mlp_dense(features: int, axes: tuple[str | None, ...], fan_in: int, param_dtype: Any, name: str) -> nn.Module:
  """A float32 `Projection` with LeCun-normal std 1/sqrt(fan_in) (the MLPs are small and not residual)."""
  return Projection((features,), axes, std=1.0 / math.sqrt(fan_in), dtype=jnp.float32,
                           param_dtype=param_dtype, name=name)


def _mlp_layer_norm(name: str, param_dtype: Any) -> nn.Module:
  """Per-example LayerNorm over the hidden units (never batch norm, which mixes the examples of a batch)."""
  return nn.LayerNorm(dtype=jnp.float32, param_dtype=param_dtype, scale_init=ones_init(("mlp",)),
                      bias_init=zeros_init(("mlp",)), name=name)


class LatentGenerator(nn.Module):
  """ARAE's code generator: noise [batch, noise_size] -> fake latent codes z [batch, latent_size], float32.

  An MLP of `num_layers` hidden layers of `hidden_size` units, each
  Projection -> LayerNorm -> ReLU (ARAE's generator is an MLP with ReLU;
  LayerNorm stands in for its batch norm so that each example's output
  depends on its own noise only), then a linear map to the latent space.
  The noise is typically N(0, I); its size is read from the input.

  Kernels: ("latent", "mlp") for the first layer, (None, "mlp") between hidden
  layers, ("mlp", "latent") for the output; biases take their kernel's output
  axis.
  """

  latent_size: int
  hidden_size: int = 256
  num_layers: int = 2
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, noise: jax.Array) -> jax.Array:
    """noise: [batch, noise_size] -> z: [batch, latent_size] float32."""
    if self.latent_size < 1 or self.hidden_size < 1 or self.num_layers < 1:
      raise ValueError(f"LatentGenerator needs latent_size={self.latent_size}, hidden_size={self.hidden_size} and "
                       f"num_layers={self.num_layers} all >= 1; latent_size must match the autoencoder's codes.")
    noise = jnp.asarray(noise)
    if noise.ndim != 2:
      raise ValueError(f"noise has shape {noise.shape}; pass [batch, noise_size], e.g. "
                       "jax.random.normal(rng, (batch, noise_size)).")
    x = _f32(noise)
    for i in range(self.num_layers):
      axes = ("latent", "mlp") if i == 0 else (None, "mlp")
      x = _mlp_dense(self.hidden_size, axes, x.shape[-1], self.param_dtype, f"hidden_{i}")(x)
      x = nn.relu(_mlp_layer_norm(f"norm_{i}", self.param_dtype)(x))
      x = nn.with_logical_constraint(x, ("batch", "mlp"))
    z = _mlp_dense(self.latent_size, ("mlp", "latent"), x.shape[-1], self.param_dtype, "out")(x)
    return nn.with_logical_constraint(z.astype(jnp.float32), ("batch", "latent"))


class LatentCritic(nn.Module):
  """The WGAN critic on latent codes: z [batch, latent] -> score [batch], float32 (unbounded, no sigmoid).

  An MLP of `num_layers` hidden layers of `hidden_size` units, each
  Projection -> [LayerNorm] -> LeakyReLU(0.2) (ARAE's critic uses LeakyReLU
  0.2), then a linear map to one score. Nothing mixes the examples of a
  batch: the gradient penalty needs each score to depend on its own input
  only, which is why Gulrajani et al. 2017 replace batch norm by layer norm in
  the critic (`use_layer_norm`, default on; off gives a plain MLP).
  """

  hidden_size: int = 256
  num_layers: int = 2
  use_layer_norm: bool = True
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """z: [batch, latent] -> scores [batch] float32."""
    if self.hidden_size < 1 or self.num_layers < 1:
      raise ValueError(f"LatentCritic needs hidden_size={self.hidden_size} and num_layers={self.num_layers} >= 1.")
    z = jnp.asarray(z)
    if z.ndim != 2:
      raise ValueError(f"z has shape {z.shape}; pass latent codes as [batch, latent].")
    x = _f32(z)
    for i in range(self.num_layers):
      axes = ("latent", "mlp") if i == 0 else (None, "mlp")
      x = _mlp_dense(self.hidden_size, axes, x.shape[-1], self.param_dtype, f"hidden_{i}")(x)
      if self.use_layer_norm:
        x = _mlp_layer_norm(f"norm_{i}", self.param_dtype)(x)
      x = nn.leaky_relu(x, negative_slope=0.2)
      x = nn.with_logical_constraint(x, ("batch", "mlp"))
    score = _mlp_dense(1, ("mlp", None), x.shape[-1], self.param_dtype, "out")(x)
    return score[:, 0].astype(jnp.float32)


def gradient_penalty(critic_fn: Callable[[jax.Array], jax.Array], real: jax.Array, fake: jax.Array,
                     rng: jax.Array | None = None, *, eps: jax.Array | None = None) -> jax.Array:
  """WGAN-GP's penalty E[(||grad_x critic(x_hat)||_2 - 1)^2], a float32 scalar (Gulrajani et al. 2017).

  x_hat = eps * real + (1 - eps) * fake with one eps ~ U[0, 1] per example,
  drawn as `jax.random.uniform(rng, (batch,), jnp.float32)`, or given
  explicitly as `eps` [batch] (then pass no rng), e.g. to reproduce a draw.
  The gradient of example i is taken over all of its non-batch axes and
  normalized with the Euclidean norm over them; the penalty is the batch mean.

  Args:
    critic_fn: maps x [batch, ...] to scores [batch]; it must treat the
      examples independently (no batch norm), so the gradient of the summed
      scores w.r.t. x is exactly each example's own gradient. Close over the
      critic's parameters (`lambda x: critic.apply(params, x)`): the penalty
      is differentiable in them (double backprop), which is how it
      regularizes the critic.
    real, fake: [batch, ...] samples of the same shape (e.g. latent codes
      [batch, latent], or soft one-hots [batch, length, vocab]). They are
      held constant (stop_gradient): the penalty regularizes the critic only
      and sends no gradient into the encoder or generator that made them.
    rng: key for eps; exactly one of rng and eps.
    eps: [batch] interpolation weights in [0, 1] (eps = 1 is the real sample).
  Returns:
    The mean over the batch of (||grad||_2 - 1)^2, float32.
  """
  real, fake = jnp.asarray(real), jnp.asarray(fake)
  if real.shape != fake.shape or real.ndim < 1:
    raise ValueError(f"real has shape {real.shape} but fake has shape {fake.shape}; pass two batches of the same "
                     "shape [batch, ...] (the interpolates x_hat pair real i with fake i).")
  batch = real.shape[0]
  if (rng is None) == (eps is None):
    raise ValueError("gradient_penalty needs exactly one of rng (draws eps ~ U[0, 1] per example) and eps "
                     "(explicit interpolation weights [batch]).")
  if eps is None:
    eps = jax.random.uniform(rng, (batch,), jnp.float32)
  eps = _f32(eps)
  if eps.shape != (batch,):
    raise ValueError(f"eps has shape {eps.shape}; pass one interpolation weight per example, shape {(batch,)}.")
  eps = eps.reshape((batch,) + (1,) * (real.ndim - 1))
  real, fake = jax.lax.stop_gradient(_f32(real)), jax.lax.stop_gradient(_f32(fake))
  x_hat = eps * real + (1.0 - eps) * fake

  def total_score(x):
    scores = jnp.asarray(critic_fn(x))
    if scores.shape != (batch,):
      raise ValueError(f"critic_fn returned shape {scores.shape}; it must map [batch, ...] to one score per "
                       f"example, shape {(batch,)} (squeeze a trailing axis of size 1).")
    return jnp.sum(scores.astype(jnp.float32))

  grads = jax.grad(total_score)(x_hat).reshape(batch, -1)
  squared = jnp.sum(jnp.square(grads), axis=-1)
  # sqrt has an infinite derivative at 0; the double where keeps the penalty's
  # own gradient finite for a critic that is flat at some x_hat.
  positive = squared > 0.0
  norms = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
  return jnp.mean(jnp.square(norms - 1.0))


def _check_scores(name: str, scores: jax.Array) -> jax.Array:
  scores = jnp.asarray(scores)
  if scores.ndim != 1:
    raise ValueError(f"{name} has shape {scores.shape}; pass one score per example, shape [batch] "
                     "(e.g. LatentCritic's output).")
  return _f32(scores)


def wasserstein_estimate(real_scores: jax.Array, fake_scores: jax.Array) -> jax.Array:
  """The critic's estimate of the Wasserstein-1 distance, mean(real) - mean(fake): a float32 scalar.

  real_scores, fake_scores: [batch] critic scores (the two batches may differ
  in size). A well-trained 1-Lipschitz critic makes it a lower bound on
  W1(real, fake); it should shrink as the generator improves.
  """
  return jnp.mean(_check_scores("real_scores", real_scores)) - jnp.mean(_check_scores("fake_scores", fake_scores))


def wgan_critic_loss(real_scores: jax.Array, fake_scores: jax.Array, penalty: jax.Array,
                     gp_weight: float | jax.Array = DEFAULT_GP_WEIGHT) -> jax.Array:
  """WGAN-GP's critic loss mean(fake) - mean(real) + gp_weight * penalty, a float32 scalar.

  real_scores, fake_scores: [batch] critic scores; penalty: `gradient_penalty`
  of the same critic; gp_weight: lambda, 10 in Gulrajani et al. 2017 (a
  static value must be >= 0; it may be traced). Minimizing it maximizes
  `wasserstein_estimate` under the soft 1-Lipschitz constraint.
  """
  if _is_python_number(gp_weight) and gp_weight < 0:
    raise ValueError(f"gp_weight={gp_weight} is negative; it weighs a penalty, use >= 0 (10 in Gulrajani et al. "
                     "2017, 0 turns the penalty off).")
  return -wasserstein_estimate(real_scores, fake_scores) + _f32(gp_weight) * _f32(penalty)


def wgan_generator_loss(fake_scores: jax.Array) -> jax.Array:
  """The WGAN generator loss -mean(critic(fake)), a float32 scalar (differentiate it w.r.t. the generator)."""
  return -jnp.mean(_check_scores("fake_scores", fake_scores))


# ---------------------------------------------------------------------------------------------------------------
# 2. Gumbel-softmax adversarial fine-tuning of the LM (RelGAN).
# ---------------------------------------------------------------------------------------------------------------


def gumbel_noise(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Gumbel(0, 1) samples -log(-log(U)), U ~ U(0, 1), float32 of `shape`.

  U is kept within [tiny, 1 - 2^-24] (the float32 numbers strictly between 0
  and 1), so every sample is finite: between about -4.5 and 16.6.
  """
  u = jax.random.uniform(rng, tuple(shape), jnp.float32)
  u = jnp.clip(u, jnp.finfo(jnp.float32).tiny, 1.0 - 2.0 ** -24)
  return -jnp.log(-jnp.log(u))


def _check_logits_and_noise(logits: jax.Array, noise: jax.Array) -> tuple[jax.Array, jax.Array]:
  logits, noise = jnp.asarray(logits), jnp.asarray(noise)
  if logits.shape != noise.shape:
    raise ValueError(f"logits have shape {logits.shape} but noise has shape {noise.shape}; draw the noise with "
                     "gumbel_noise(rng, logits.shape), one value per logit.")
  if logits.ndim < 1:
    raise ValueError("logits is a scalar; pass [..., vocab] logits.")
  return _f32(logits), _f32(noise)


def gumbel_argmax(logits: jax.Array, noise: jax.Array) -> jax.Array:
  """The hard Gumbel-max sample argmax(logits + noise) over the last axis, int32 [...].

  logits, noise: [..., vocab] (noise from `gumbel_noise`). A draw from
  softmax(logits), and the argmax of `gumbel_softmax` with the same noise at
  any temperature.
  """
  logits, noise = _check_logits_and_noise(logits, noise)
  return jnp.argmax(logits + noise, axis=-1).astype(jnp.int32)


def gumbel_softmax(logits: jax.Array, noise: jax.Array, temperature: float | jax.Array) -> jax.Array:
  """The Gumbel-softmax relaxation softmax((logits + noise) / temperature), float32 [..., vocab].

  Args:
    logits: [..., vocab] the generator's logits (any float dtype; computed in
      float32). The result is differentiable in them.
    noise: [..., vocab] Gumbel(0, 1) noise (`gumbel_noise`); pass the noise
      the hard tokens were drawn with, so argmax of the result equals
      `gumbel_argmax(logits, noise)`.
    temperature: tau > 0, a Python number (validated) or a traced scalar.
      RelGAN's "inverse temperature" beta is used as the divisor's inverse:
      pass temperature = 1 / beta (`temperature_schedule` returns beta).
  Returns:
    Soft one-hots [..., vocab]: each row is on the simplex (sums to 1) and
    tends to one_hot(gumbel_argmax(logits, noise)) as temperature -> 0.
  """
  if _is_python_number(temperature) and not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0; small values give nearly one-hot rows, large values "
                     "nearly uniform ones.")
  logits, noise = _check_logits_and_noise(logits, noise)
  return jax.nn.softmax((logits + noise) / _f32(temperature), axis=-1)


def temperature_schedule(step: int | jax.Array, *, total_steps: int, max_temperature: float,
                         kind: str = "exponential") -> float | jax.Array:
  """RelGAN's inverse temperature beta at `step`: annealed from 1 to `max_temperature` over `total_steps`.

  With s = clip(step, 0, total_steps) / total_steps in [0, 1] (Nie et al. 2019):
    * "exponential": beta = max_temperature ** s (RelGAN's default; it
      stays small for long, then rises fast);
    * "linear":      beta = 1 + (max_temperature - 1) * s;
    * "constant":    beta = max_temperature.
  RelGAN calls beta the inverse temperature and feeds the relaxation
  softmax(beta * (logits + noise)) (its code names beta "temperature", hence
  the argument's name); `gumbel_softmax` takes the divisor, so pass it
  temperature = 1 / beta. Larger beta (RelGAN tries 100 and 1000)
  gives sharper soft one-hots, a larger gradient variance, and more diverse
  samples.

  `step` may be a Python int (returns a Python float) or a jnp scalar, traced
  under jit (returns a float32 scalar), as `vae_objectives.kl_weight`. The
  other arguments are static Python values.
  """
  if kind not in TEMPERATURE_SCHEDULES:
    raise ValueError(f"Unknown temperature schedule {kind!r}; use one of {TEMPERATURE_SCHEDULES}.")
  if not isinstance(total_steps, (int, np.integer)) or isinstance(total_steps, bool) or total_steps < 1:
    raise ValueError(f"total_steps={total_steps!r} must be an integer >= 1 (the number of adversarial training "
                     "steps over which the temperature is annealed).")
  if not _is_python_number(max_temperature) or not max_temperature >= 1.0:
    raise ValueError(f"max_temperature={max_temperature!r} must be a number >= 1: the schedule rises from 1 to it "
                     "(RelGAN uses 100 or 1000; 1 keeps it constant).")
  python_step = _is_python_number(step)
  s = jnp.clip(_f32(step), 0.0, float(total_steps)) / float(total_steps)
  if kind == "exponential":
    beta = jnp.exp(s * math.log(max_temperature))
  elif kind == "linear":
    beta = 1.0 + (float(max_temperature) - 1.0) * s
  else:
    beta = jnp.full_like(s, float(max_temperature))
  beta = beta.astype(jnp.float32)
  return float(beta) if python_step else beta


def one_hot_sequences(tokens: jax.Array, vocab_size: int, dtype: Any = jnp.float32) -> jax.Array:
  """Real sentences as exact one-hots: tokens [batch, length] int -> [batch, length, vocab_size] of `dtype`.

  The `SequenceDiscriminator` input for real data, on the same footing as the
  generator's soft one-hots.
  """
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens has shape {tokens.shape} and dtype {tokens.dtype}; pass integer token ids "
                     "[batch, length].")
  if vocab_size < 1:
    raise ValueError(f"vocab_size={vocab_size} must be >= 1 (the discriminator's config.vocab_size).")
  return jax.nn.one_hot(tokens, vocab_size, dtype=dtype)


class SoftEmbedding(nn.Module):
  """Embedding of (soft) one-hot rows: [..., vocab] @ table [vocab, width] -> [..., width].

  The table is the parameter "embedding" [vocab, width] with logical axes
  ("vocab", "embed"), Normal(0, init_std), like `nn.Embed`'s (so the path
  "embed/embedding" matches the LM's): a hard one-hot row gives exactly the
  table's row, a soft one a convex mix of rows.
  """

  vocab_size: int
  width: int
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, soft_tokens: jax.Array) -> jax.Array:
    """soft_tokens: [..., vocab] -> [..., width] in `dtype`."""
    table = self.param("embedding", param_init(self.init_std, ("vocab", "embed")),
                       (self.vocab_size, self.width), self.param_dtype)
    # HIGHEST keeps the float32 matmul exact on accelerators (no TF32 / bf16
    # passes), so a hard one-hot is exactly a table lookup.
    return jnp.einsum("...v,vw->...w", soft_tokens.astype(self.dtype), table.astype(self.dtype),
                      precision=jax.lax.Precision.HIGHEST)


class SequenceDiscriminator(nn.Module):
  """RelGAN's discriminator on a Transformer: soft one-hots [batch, length, vocab] -> logits [batch], float32.

  A bidirectional Transformer (its own small backbone, `config`; vocab_size
  must be the generator's) in the style of the VAE's encoder:
  `SoftEmbedding` of the (soft) one-hot rows + learned positions (or RoPE,
  as config.position says) -> dropout -> `apply_blocks(causal=False)` with
  padding hidden as keys -> final norm -> mean over the real positions -> a
  float32 linear head to one logit. Padding is neither attended to nor
  pooled, so a sentence's logit does not depend on its padding. A row with no
  real position pools to zeros (its logit is the head's bias).

  RNG stream `dropout` when not deterministic.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, soft_tokens: jax.Array, mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """soft_tokens: [batch, length, vocab] float, mask: [batch, length] bool (True at real tokens) -> [batch]."""
    cfg = self.config
    soft_tokens = jnp.asarray(soft_tokens)
    if soft_tokens.ndim != 3:
      raise ValueError(f"soft_tokens has shape {soft_tokens.shape}; pass [batch, length, vocab] (soft) one-hots: "
                       "gumbel_softmax of the generator's logits, or one_hot_sequences of real tokens.")
    batch, length, vocab = soft_tokens.shape
    if vocab != cfg.vocab_size:
      raise ValueError(f"soft_tokens has {vocab} entries per row but the discriminator's vocab_size is "
                       f"{cfg.vocab_size}; build its TransformerConfig with the generator's vocab_size.")
    if jnp.shape(mask) != (batch, length):
      raise ValueError(f"mask has shape {jnp.shape(mask)}; pass one bool per position, {(batch, length)}, True at "
                       "the sentence's tokens and False at padding.")
    if length > cfg.max_len:
      raise ValueError(f"The discriminator got {length} positions but its max_len is {cfg.max_len}; crop the "
                       "sentences or raise the discriminator's max_len.")
    mask = jnp.asarray(mask).astype(bool)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    embed = SoftEmbedding(cfg.vocab_size, cfg.width, cfg.init_std, dtype=cfg.compute_dtype,
                          param_dtype=cfg.weight_dtype, name="embed")
    x = add_learned_positions(self, cfg, embed(soft_tokens), positions)
    x = nn.Dropout(rate=cfg.dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = apply_blocks(cfg, x, positions, decode=False, deterministic=deterministic, causal=False, key_mask=mask)
    x = make_norm(cfg, "final_norm")(x).astype(jnp.float32)
    weights = mask.astype(jnp.float32)[:, :, None]
    pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    pooled = nn.with_logical_constraint(pooled, ("batch", "embed"))
    logits = Projection((1,), ("embed", None), std=cfg.init_std, dtype=jnp.float32,
                               param_dtype=cfg.weight_dtype, name="head")(pooled)
    return logits[:, 0]


def relativistic_losses(real_logits: jax.Array, fake_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """RelGAN's relativistic standard GAN losses (RSGAN, Jolicoeur-Martineau 2019): (d_loss, g_loss), float32.

  Real sentence i is paired with fake sentence i:
    d_loss = mean(softplus(-(real - fake))) = -mean(log sigmoid(real - fake)),
    g_loss = mean(softplus(-(fake - real))) = -mean(log sigmoid(fake - real)).
  The discriminator learns how much more real a real sentence looks than a
  fake one; the generator's loss depends on the real logits too (they are
  constants for it). real_logits, fake_logits: [batch].
  """
  real, fake = jnp.asarray(real_logits), jnp.asarray(fake_logits)
  if real.shape != fake.shape or real.ndim != 1:
    raise ValueError(f"real_logits has shape {real.shape} and fake_logits {fake.shape}; pass two [batch] vectors of "
                     "the same size (RSGAN pairs real i with fake i).")
  difference = _f32(real) - _f32(fake)
  return jnp.mean(jax.nn.softplus(-difference)), jnp.mean(jax.nn.softplus(difference))
