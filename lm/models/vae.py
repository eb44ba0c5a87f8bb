"""A sentence VAE on the Transformer backbone (Bowman et al. 2016; Li et al. 2020, "Optimus").

  encoder:  tokens ─► bidirectional Transformer ─► pool (masked mean | first) ─► mu, logvar [batch, latent]
  latent:   z = mu + sigma * eps (training), z = mu (evaluation)
  decoder:  `TransformerLM` conditioned on z, as `VAEConfig.injection` says:
              "embedding": condition = Dense(z) is added to every token embedding (Li et al. 2020);
              "memory":    memory = Dense(z) -> [batch, num_layers, width], one extra key/value slot
                           per layer that every position attends to (Optimus' main scheme);
              "both":      the two together (Optimus' best setting).

The encoder has its own embeddings and blocks (Optimus pairs a BERT encoder
with a GPT-2 decoder), built like the decoder's (`transformer.apply_blocks`)
with causal masking off and padding hidden from every query.

`vae_loss` is the negative ELBO with the KL weight beta and free bits of
`lm.models.vae_objectives`; `generate_from_latent` decodes from a given z with
the decoder's KV cache, one jitted `lax.scan` as in `lm.inference.sample`.

The latent axis of the new parameters is the logical axis `latent`; meshes
without a rule for it keep it unsharded (it is small).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models.layers import Projection, add_learned_positions, make_norm, token_embedding
from lm.models.transformer import TransformerConfig, TransformerLM, apply_blocks
from lm.models.vae_objectives import gaussian_kl, kl_with_free_bits, reparameterize

INJECTIONS = ("both", "memory", "embedding")
POOLINGS = ("mean", "first")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Static hyperparameters of `SentenceVAE` beyond its backbone's `TransformerConfig`.

  latent_size: dimensions of z. injection: how z reaches the decoder (module
  doc). pooling: "mean" over the sentence's tokens, or the "first" token's
  state (a BOS/CLS token at position 0). encoder_layers: the encoder's depth,
  None for the decoder's.
  """

  latent_size: int = 32
  injection: str = "both"
  pooling: str = "mean"
  encoder_layers: int | None = None

  def __post_init__(self):
    if self.injection not in INJECTIONS:
      raise ValueError(f"vae.injection={self.injection!r} is not one of {INJECTIONS}.")
    if self.pooling not in POOLINGS:
      raise ValueError(f"vae.pooling={self.pooling!r} is not one of {POOLINGS}.")
    if self.latent_size < 1:
      raise ValueError(f"vae.latent_size={self.latent_size} must be >= 1 (Optimus uses 32).")
    if self.encoder_layers is not None and self.encoder_layers < 1:
      raise ValueError(f"vae.encoder_layers={self.encoder_layers} must be >= 1, or None for the decoder's depth.")

  def encoder_config(self, config: TransformerConfig) -> TransformerConfig:
    """The backbone config with the encoder's depth."""
    return dataclasses.replace(config, num_layers=self.encoder_layers or config.num_layers)


class Encoder(nn.Module):
  """Bidirectional Transformer encoder: tokens [batch, length] -> (mu, logvar) [batch, latent], float32."""

  config: TransformerConfig
  latent_size: int
  pooling: str = "mean"

  @nn.compact
  def __call__(self, tokens: jax.Array, pad_mask: jax.Array, *, deterministic: bool = True
              ) -> tuple[jax.Array, jax.Array]:
    """tokens, pad_mask: [batch, length]; pad_mask is True at the sentence's tokens, False at padding."""
    cfg = self.config
    batch, length = tokens.shape
    if pad_mask.shape != tokens.shape:
      raise ValueError(f"pad_mask has shape {pad_mask.shape} but the encoder tokens {tokens.shape}; pass one "
                       "bool per token, True for the sentence's tokens and False for padding.")
    if length > cfg.max_len:
      raise ValueError(f"The encoder got {length} tokens but model max_len is {cfg.max_len}; crop the sentences.")
    pad_mask = pad_mask.astype(bool)
    tokens = nn.with_logical_constraint(tokens, ("batch", "length"))
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    x = add_learned_positions(self, cfg, token_embedding(cfg)(tokens), positions)
    x = nn.Dropout(rate=cfg.dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    # Padding is hidden as a key in every layer and left out of the pooling,
    # so a sentence's posterior does not depend on how its batch is padded.
    x = apply_blocks(cfg, x, positions, decode=False, deterministic=deterministic, causal=False, key_mask=pad_mask)
    x = make_norm(cfg, "final_norm")(x).astype(jnp.float32)
    if self.pooling == "mean":
      weights = pad_mask.astype(jnp.float32)[:, :, None]
      pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    else:
      pooled = x[:, 0]
    pooled = nn.with_logical_constraint(pooled, ("batch", "embed"))

    # The heads run in float32 whatever the compute dtype: the KL is sensitive
    # to logvar, and they are tiny.
    def head(name):
      return Projection((self.latent_size,), ("embed", "latent"), std=cfg.init_std, dtype=jnp.float32,
                               param_dtype=cfg.weight_dtype, name=name)(pooled)

    mu, logvar = head("mu"), head("logvar")
    axes = ("batch", "latent")
    return nn.with_logical_constraint(mu, axes), nn.with_logical_constraint(logvar, axes)


class SentenceVAE(nn.Module):
  """Sentence VAE: `Encoder` -> z -> conditioned `TransformerLM` decoder.

  RNG streams: `latent` (the posterior sample, when sampling) and `dropout`
  (when not deterministic). The decoder's KV cache lives in the `cache`
  collection (create it with `init_cache`; `decode_step` reads and writes it).
  """

  config: TransformerConfig
  vae: VAEConfig = VAEConfig()

  def setup(self):
    cfg, vae = self.config, self.vae
    self.encoder = Encoder(vae.encoder_config(cfg), vae.latent_size, vae.pooling)
    self.decoder = TransformerLM(cfg)
    dense = functools.partial(Projection, std=cfg.init_std, dtype=cfg.compute_dtype,
                              param_dtype=cfg.weight_dtype)
    if vae.injection in ("embedding", "both"):
      self.latent_to_condition = dense((cfg.width,), ("latent", "embed"))
    if vae.injection in ("memory", "both"):
      self.latent_to_memory = dense((cfg.num_layers, cfg.width), ("latent", "layers", "embed"))

  def __call__(self, tokens: jax.Array, encoder_tokens: jax.Array, pad_mask: jax.Array, *,
               deterministic: bool = True, sample: bool | None = None,
               noise: jax.Array | None = None) -> dict[str, jax.Array]:
    """Encodes, draws z and decodes.

    Args:
      tokens: [batch, length] decoder inputs (e.g. BOS + sentence, shifted
        against the targets; word dropout, if any, is applied by the caller).
      encoder_tokens: [batch, enc_length] the sentence the encoder reads.
      pad_mask: [batch, enc_length] bool, True at encoder_tokens' real tokens.
      deterministic: no dropout.
      sample: z ~ q(z|x) (needs the `latent` rng, or `noise`) or z = mu; None
        (default) samples exactly when not deterministic.
      noise: [batch, latent] standard normal draws for the sample, z = mu +
        sigma * noise (e.g. drawn per row, so z does not depend on how the
        batch is split); None: drawn from the `latent` rng.
    Returns:
      dict(logits [batch, length, vocab] float32, mu, logvar, z [batch, latent] float32).
    """
    mu, logvar = self.encode(encoder_tokens, pad_mask, deterministic=deterministic)
    if sample is None:
      sample = not deterministic
    if not sample:
      z = mu
    elif noise is not None:
      z = mu + jnp.exp(0.5 * logvar) * noise.astype(mu.dtype)
    else:
      z = reparameterize(self.make_rng("latent"), mu, logvar)
    logits = self.decode(tokens, z, deterministic=deterministic)
    return dict(logits=logits, mu=mu, logvar=logvar, z=z)

  def encode(self, encoder_tokens: jax.Array, pad_mask: jax.Array, *, deterministic: bool = True
             ) -> tuple[jax.Array, jax.Array]:
    """encoder_tokens, pad_mask [batch, enc_length] -> (mu, logvar) [batch, latent], float32."""
    return self.encoder(encoder_tokens, pad_mask, deterministic=deterministic)

  def decode(self, tokens: jax.Array, z: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """tokens [batch, length], z [batch, latent] -> logits [batch, length, vocab] (full forward)."""
    return self.decoder(tokens, deterministic=deterministic, **self._conditioning(z))

  def decode_step(self, tokens: jax.Array, z: jax.Array) -> jax.Array:
    """Cached decoding: tokens [batch, new] continue the cached ones -> logits [batch, new, vocab].

    Apply with the `cache` collection mutable; pass the same z on every call
    (the memory slots are recomputed from it, not cached).
    """
    return self.decoder(tokens, decode=True, **self._conditioning(z))

  def _conditioning(self, z: jax.Array) -> dict[str, jax.Array | None]:
    """z [batch, latent] -> the decoder's condition [batch, width] and memory [batch, num_layers, width]."""
    cfg = self.config
    if z.shape[-1] != self.vae.latent_size:
      raise ValueError(f"z has shape {z.shape}; pass [batch, latent_size={self.vae.latent_size}].")
    z = nn.with_logical_constraint(z, ("batch", "latent"))
    condition = memory = None
    if self.vae.injection in ("embedding", "both"):
      condition = nn.with_logical_constraint(self.latent_to_condition(z), ("batch", "embed"))
    if self.vae.injection in ("memory", "both"):
      memory = self.latent_to_memory(z)
      memory = memory.reshape(z.shape[0], cfg.num_layers, cfg.width)
    return dict(condition=condition, memory=memory)

  def init_cache(self, batch_size: int) -> Any:
    """Empty decoder KV cache for `batch_size` sequences of up to `max_len` tokens."""
    tokens = jnp.zeros((batch_size, 1), jnp.int32)
    z = jnp.zeros((batch_size, self.vae.latent_size), jnp.float32)
    variables = jax.eval_shape(lambda: self.init(jax.random.key(0), tokens, z, method=SentenceVAE.decode_step))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])


def vae_loss_sums(outputs: dict[str, jax.Array], targets: jax.Array, target_mask: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """(the reconstruction NLL summed over the batch's target tokens, KL per example and dimension [batch, latent]).

  The parts of `vae_loss` that add up over examples, float32: a loss over
  several micro-batches normalizes their sums by the whole batch's counts.
  """
  logits = outputs["logits"].astype(jnp.float32)
  mask = target_mask.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  token_nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.sum(token_nll * mask), gaussian_kl(outputs["mu"], outputs["logvar"])


def vae_loss(outputs: dict[str, jax.Array], targets: jax.Array, target_mask: jax.Array, *, beta: float | jax.Array,
             free_bits: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss recon + beta * KL (free bits) and its metrics, float32.

  Args:
    outputs: `SentenceVAE.__call__`'s dict (logits [batch, length, vocab],
      mu, logvar [batch, latent]).
    targets: [batch, length] the next token at each decoder position.
    target_mask: [batch, length] True (or 1) where a target counts.
    beta: KL weight (`vae_objectives.kl_weight`), may be traced.
    free_bits: per-dimension KL floor in nats (`kl_with_free_bits`).
  Returns:
    (loss, metrics): recon is the NLL summed over each sentence and averaged
    over the batch; kl the batch-mean KL(q(z|x) || p(z)) without free bits;
    elbo = recon + kl (the negative ELBO: an upper bound on -log p(x) per
    sentence, lower is better); nll_per_token = summed NLL / target tokens,
    and elbo_per_token the bound per token (exp of it bounds the perplexity).
  """
  batch = outputs["logits"].shape[0]
  nll_sum, kl_per_dim = vae_loss_sums(outputs, targets, target_mask)
  num_tokens = jnp.maximum(jnp.sum(target_mask.astype(jnp.float32)), 1.0)
  recon = nll_sum / batch
  kl = jnp.sum(kl_per_dim) / batch
  loss = recon + jnp.asarray(beta, jnp.float32) * kl_with_free_bits(kl_per_dim, free_bits)
  metrics = dict(loss=loss, recon=recon, kl=kl, elbo=recon + kl, nll_per_token=nll_sum / num_tokens,
                 elbo_per_token=(recon + kl) * batch / num_tokens)
  return loss, metrics


def _choose(logits: jax.Array, rng: jax.Array, temperature: float) -> jax.Array:
  """Next token ids [batch] from logits [batch, vocab]; temperature 0 is greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature"))
def generate_from_latent(model: SentenceVAE, params: Any, z: jax.Array, prompt: jax.Array, rng: jax.Array, *,
                         max_new_tokens: int, temperature: float = 1.0) -> jax.Array:
  """Decodes from z [batch, latent] after `prompt` [batch, prompt_len] (e.g. BOS) -> [batch, max_new_tokens].

  The prompt is prefilled in one cached call, then each token is one step of
  a `lax.scan` (as `lm.inference.sample.generate`). temperature 0 is greedy, and the
  result then depends on z and the prompt only.
  """
  batch, prompt_len = prompt.shape
  if z.shape != (batch, model.vae.latent_size):
    raise ValueError(f"z has shape {z.shape}; pass one latent per prompt: {(batch, model.vae.latent_size)}.")
  if max_new_tokens < 1 or prompt_len + max_new_tokens - 1 > model.config.max_len:
    raise ValueError(f"prompt_len={prompt_len} + max_new_tokens={max_new_tokens} - 1 must be within the model's "
                     f"max_len={model.config.max_len} (and max_new_tokens >= 1); generate fewer tokens.")
  cache = model.init_cache(batch)
  decode_step = functools.partial(model.apply, method=SentenceVAE.decode_step, mutable=["cache"])
  logits, variables = decode_step({"params": params, "cache": cache}, prompt, z)
  first = _choose(logits[:, -1], jax.random.fold_in(rng, 0), temperature)

  def step(carry, index):
    cache, token = carry
    logits, variables = decode_step({"params": params, "cache": cache}, token[:, None], z)
    next_token = _choose(logits[:, -1], jax.random.fold_in(rng, index), temperature)
    return (variables["cache"], next_token), token

  (_, last), tokens = jax.lax.scan(step, (variables["cache"], first), jnp.arange(1, max_new_tokens))
  tokens = jnp.concatenate([tokens, last[None]], axis=0) if max_new_tokens > 1 else last[None]
  return tokens.T
