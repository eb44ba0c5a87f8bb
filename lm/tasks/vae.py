"""`config.head = "vae"`: train and evaluate a sentence VAE (`lm.models.vae`) with the shared engine.

Loss (the engine's `Update`; every draw is per row, from the step and the row's place in the global batch,
so a run resumes exactly and gradient accumulation changes nothing):
  beta  = kl_weight(step)            KL annealing: constant | linear | cyclical, after `vae.ae_steps` of beta = 0
  x_in  = word_dropout(BOS + x)      `vae.word_dropout` of the decoder's inputs become MASK (Bowman et al. 2016)
  z     = mu + sigma * eps           eps ~ N(0, I) per row
  loss  = recon(x | z) + beta * sum_d max(KL_d, free_bits)   per sentence (free bits: of each micro-batch's mean)

Eval step, per batch (each sentence's posterior samples come from its index
in the split, so the figures do not depend on batching or the mesh):
  k = `vae.iw_samples` samples z_i ~ q(z|x), decoded `vae.iw_chunk` at a time:
  recon (one sample), KL (closed form), ELBO, the importance-weighted NLL
  bound (Burda et al. 2016) and its perplexity, the mutual information
  I(x; z) (He et al. 2019, per batch then averaged) and, over the split,
  the active units (Cov_x E[z|x] > 0.01).
`eval/loss` is the IW bound per target token: comparable with a plain LM's
eval/loss on the same sentences (`head="lm"`, `data.format="sentences"`),
as `eval/nll_per_sentence` is with its per-sentence NLL.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ml_collections.config_dict import placeholder

from lm.core.configs import ConfigPart, require
from lm.core.errors import CheckpointError, ConfigError
from lm.data import sentences as sentences_lib
from lm.models import latent as latent_lib
from lm.models.vae import SentenceVAE, VAEConfig, generate_from_latent, vae_loss_sums
from lm.models.vae_objectives import gaussian_kl, kl_weight, kl_with_free_bits, word_dropout
from lm.tasks.base import Task
from lm.train import step as step_lib
from lm.train.evaluate import ROWS

EVAL_SEED = 0  # eval randomness is fixed: a checkpoint's figures are reproducible
LATENT_STREAM, WORD_STREAM = 0, 1  # per-row rng streams of the loss (StepContext.row_keys)
INJECTIONS = ("memory", "embedding", "both")
POOLINGS = ("mean", "first")
KL_SCHEDULES = ("constant", "linear", "monotonic", "cyclical")
# VAE fields that change parameter shapes (a head="vae" run, or the autoencoder of a latent GAN).
SHAPE_FIELDS = ("latent_size", "injection", "pooling", "encoder_layers")

FIELDS = {
    "vae.latent_size": 32,
    "vae.injection": "both",  # memory | embedding | both (Li et al. 2020)
    "vae.pooling": "mean",  # mean | first
    "vae.encoder_layers": placeholder(int),  # None: model.num_layers
    "vae.kl_schedule": "cyclical",  # constant | linear | cyclical (Fu et al. 2019)
    "vae.kl_warmup_steps": 1000,  # linear: steps for beta to rise from 0 to 1
    "vae.kl_cycles": 4,  # cyclical: number of cycles over the run
    "vae.kl_ratio": 0.5,  # cyclical: fraction of each cycle spent rising
    "vae.ae_steps": 0,  # autoencoder warm start: beta = 0 for these first steps
    "vae.free_bits": 0.0,  # per-dimension KL floor in nats (0: off)
    "vae.word_dropout": 0.0,  # rate of decoder input tokens replaced by <mask> (Bowman et al. 2016)
    "vae.iw_samples": 100,  # k of the importance-weighted NLL bound, every eval
    "vae.iw_chunk": 10,  # posterior samples decoded together (memory vs speed of the IW bound)
}


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  """The `vae` group (also read by a latent GAN's autoencoder)."""
  del mode
  vae = config.vae
  require(isinstance(vae.latent_size, int) and vae.latent_size > 0,
          f"config.vae.latent_size={vae.latent_size!r} must be a positive integer (32 in Optimus).")
  require(vae.injection in INJECTIONS, f"config.vae.injection={vae.injection!r} is not one of {INJECTIONS}.")
  require(vae.pooling in POOLINGS, f"config.vae.pooling={vae.pooling!r} is not one of {POOLINGS}.")
  require(vae.encoder_layers is None or vae.encoder_layers > 0, "config.vae.encoder_layers must be > 0 (or unset).")
  require(vae.kl_schedule in KL_SCHEDULES,
          f"config.vae.kl_schedule={vae.kl_schedule!r} is not one of ('constant', 'linear', 'cyclical').")
  require(vae.kl_warmup_steps >= 0 and vae.kl_cycles >= 1 and 0 < vae.kl_ratio <= 1 and vae.ae_steps >= 0,
          "config.vae.kl_warmup_steps and ae_steps must be >= 0, kl_cycles >= 1, kl_ratio in (0, 1].")
  require(vae.free_bits >= 0, f"config.vae.free_bits={vae.free_bits} must be >= 0 (nats per dimension).")
  require(0 <= vae.word_dropout < 1, f"config.vae.word_dropout={vae.word_dropout} must be in [0, 1).")
  require(vae.iw_samples >= 1 and vae.iw_chunk >= 1, "config.vae.iw_samples and iw_chunk must be >= 1.")


def sentence_vae(model_config: Any, vae: ml_collections.ConfigDict) -> SentenceVAE:
  """The SentenceVAE of config.vae on the backbone (a VAE run's model, a latent GAN's autoencoder)."""
  return SentenceVAE(model_config, VAEConfig(latent_size=vae.latent_size, injection=vae.injection,
                                             pooling=vae.pooling, encoder_layers=vae.encoder_layers))


def check_vae_fields(directory: str, metadata: Mapping[str, Any], vae: ml_collections.ConfigDict) -> None:
  """CheckpointError if the checkpoint's recorded config.vae shape fields differ from `vae`'s."""
  saved = metadata.get("config", {}).get("vae", {})
  differences = [f"vae.{key}: checkpoint {saved.get(key)!r}, config {vae[key]!r}"
                 for key in SHAPE_FIELDS if key in saved and saved.get(key) != vae[key]]
  if differences:
    raise CheckpointError(
        f"The checkpoint in {directory} was written for another VAE ({'; '.join(differences)}). Set those "
        "config.vae fields to the checkpoint's values, or use a new --workdir. Nothing was written.")


def _largest_divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


class VAETask(Task):
  """A sentence VAE on the backbone (module doc)."""

  name = "vae"
  CONFIG = ConfigPart("lm.tasks.vae", FIELDS, validate)
  init_from_tasks = ("vae",)
  sample_kinds = ("prior", "reconstruct", "interpolate")

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict, mode: str) -> None:
    del mode
    vae = config.vae
    if vae.kl_schedule == "cyclical":
      require(vae.ae_steps < config.steps, f"config.vae.ae_steps={vae.ae_steps} leaves no steps of the cyclical "
              f"KL schedule in config.steps={config.steps}; lower ae_steps.")

  def build_model(self) -> nn.Module:
    return sentence_vae(self.model_config, self.config.vae)

  def check_checkpoint(self, directory: str, metadata: Mapping[str, Any], written_by: str) -> None:
    del written_by
    check_vae_fields(directory, metadata, self.config.vae)

  def init_params(self, key: jax.Array) -> Any:
    batch = self.example_batch(self.config.batch_size)
    return self.model.init(key, batch["inputs"], batch["targets"], batch["mask"] > 0)["params"]

  def beta(self, step: jax.Array | int) -> jax.Array | float:
    """The KL weight at `step` (0-based)."""
    vae = self.config.vae
    return kl_weight(step, schedule=vae.kl_schedule, total_steps=int(self.config.steps),
                     warmup_steps=int(vae.kl_warmup_steps), cycles=int(vae.kl_cycles), ratio=float(vae.kl_ratio),
                     ae_steps=int(vae.ae_steps))

  def updates(self) -> Sequence[step_lib.Update]:
    model, vae, vocab = self.model, self.config.vae, self.vocab
    deterministic = self.model_config.dropout == 0.0
    rate, free_bits, latent = float(vae.word_dropout), float(vae.free_bits), int(vae.latent_size)

    def loss_fn(params, batch, ctx):
      beta = self.beta(ctx.step)
      inputs = batch["inputs"]
      if rate:
        inputs = word_dropout(ctx.row_keys(WORD_STREAM), inputs, rate, unk_id=vocab.mask)
      noise = jax.vmap(lambda key: jax.random.normal(key, (latent,), jnp.float32))(ctx.row_keys(LATENT_STREAM))
      outputs = model.apply({"params": params}, inputs, batch["targets"], batch["mask"] > 0,
                            deterministic=deterministic, sample=True, noise=noise, rngs={"dropout": ctx.rng})
      nll_sum, kl_per_dim = vae_loss_sums(outputs, batch["targets"], batch["mask"])
      kl_sum = jnp.sum(kl_per_dim)
      # Free bits floor each dimension's mean KL over this micro-batch; without them the term adds up exactly.
      kl_term = kl_with_free_bits(kl_per_dim, free_bits) * ctx.share if free_bits else ctx.mean(kl_sum)
      loss = ctx.mean(nll_sum) + jnp.asarray(beta, jnp.float32) * kl_term
      return loss, {"recon": ctx.mean(nll_sum), "kl": ctx.mean(kl_sum),
                    "elbo_per_token": ctx.mean(nll_sum + kl_sum, "tokens")}

    return (step_lib.Update(loss_fn),)

  def loss_totals(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {"tokens": jnp.sum(batch["mask"].astype(jnp.float32))}

  def step_metrics(self, step: jax.Array) -> dict[str, jax.Array]:
    return {"beta": jnp.asarray(self.beta(step), jnp.float32)}

  def make_eval_step(self) -> Callable:
    model, vae = self.model, self.config.vae
    k = int(vae.iw_samples)
    chunk = _largest_divisor_at_most(k, int(vae.iw_chunk))
    latent = int(vae.latent_size)

    def eval_step(params, batch):
      mask = batch["mask"]
      weights = mask.astype(jnp.float32)
      valid = jnp.any(mask > 0, axis=-1).astype(jnp.float32)
      variables = {"params": params}
      mu, logvar = model.apply(variables, batch["targets"], mask > 0, method=SentenceVAE.encode)
      row_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(EVAL_SEED), i))(batch["index"])

      def log_px_given_z(z):  # [batch, latent] -> [batch]: log p(x | z) summed over the sentence
        logits = model.apply(variables, batch["inputs"], z, method=SentenceVAE.decode)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return -jnp.sum(nll * weights, axis=-1)

      def samples(_, js):  # js [chunk]: sample numbers -> log densities [chunk, batch]
        eps = jax.vmap(lambda j: jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, j), (latent,)))(
            row_keys))(js)
        z = mu[None] + jnp.exp(0.5 * logvar)[None] * eps
        return None, (jax.vmap(log_px_given_z)(z), latent_lib.gaussian_log_density(z, mu, logvar),
                      latent_lib.standard_normal_log_density(z), z[0])

      _, (log_px, log_qz, log_pz, first_z) = jax.lax.scan(samples, None, jnp.arange(k).reshape(k // chunk, chunk))
      log_px, log_qz, log_pz = (x.reshape(k, -1) for x in (log_px, log_qz, log_pz))
      iw_nll = latent_lib.importance_weighted_nll(log_px, log_qz, log_pz)
      kl = jnp.sum(gaussian_kl(mu, logvar), axis=-1)
      informative = (jnp.sum(valid) > 1).astype(jnp.float32)
      mi = latent_lib.mutual_information_estimate(mu, logvar, first_z[0], valid)
      return {"recon_sum": jnp.sum(-log_px[0] * valid), "kl_sum": jnp.sum(kl * valid),
              "iw_nll_sum": jnp.sum(iw_nll * valid), "tokens": jnp.sum(weights), "sentences": jnp.sum(valid),
              "mi_sum": mi * informative, "mi_batches": informative,
              ROWS + "mu": mu, ROWS + "valid": valid}

    return eval_step

  def summarize(self, sums: Mapping[str, float], rows: Mapping[str, np.ndarray], chars_per_token: float
                ) -> dict[str, float]:
    sentences, tokens = max(sums["sentences"], 1.0), max(sums["tokens"], 1.0)
    recon, kl, iw = sums["recon_sum"] / sentences, sums["kl_sum"] / sentences, sums["iw_nll_sum"] / sentences
    loss = sums["iw_nll_sum"] / tokens
    mu = rows[ROWS + "mu"][rows[ROWS + "valid"] > 0]
    return {
        "eval/loss": loss,  # the IW bound per token
        "eval/perplexity": math.exp(min(loss, 50.0)),
        "eval/bits_per_char": loss / math.log(2) / chars_per_token,
        "eval/nll_per_sentence": iw,
        "eval/iw_nll": iw,
        "eval/recon": recon,
        "eval/kl": kl,
        "eval/elbo": recon + kl,  # the negative ELBO per sentence (>= the IW bound, in expectation)
        "eval/elbo_perplexity": math.exp(min((recon + kl) * sentences / tokens, 50.0)),
        "eval/mutual_info": sums["mi_sum"] / max(sums["mi_batches"], 1.0),
        "eval/active_units": float(latent_lib.active_units(mu)) if len(mu) >= 2 else 0.0,
        "eval/iw_samples": float(self.config.vae.iw_samples),
        "eval/tokens": sums["tokens"],
        "eval/sentences": sums["sentences"],
    }

  # -- generation ----------------------------------------------------------
  def encode_texts(self, params: Any, texts: list[str]) -> tuple[jax.Array, jax.Array]:
    """Posterior (mu, logvar) [len(texts), latent] of sentences; call under the mesh context."""
    examples = sentences_lib.examples_for_texts(self.tokenizer, self.config.seq_len, texts)
    return _encode(self.model, params, jnp.asarray(examples["targets"]), jnp.asarray(examples["mask"] > 0))

  def decode_latents(self, params: Any, z: jax.Array, *, temperature: float, seed: int = 0,
                     max_tokens: int | None = None) -> list[str]:
    """Sentences decoded from latents z [n, latent] (temperature 0: greedy), up to EOS."""
    z = jnp.asarray(z, jnp.float32)
    prompt = jnp.full((z.shape[0], 1), self.vocab.bos, jnp.int32)
    length = min(max_tokens or self.config.seq_len, self.config.seq_len)
    ids = generate_from_latent(self.model, params, z, prompt, jax.random.key(seed), max_new_tokens=length,
                               temperature=float(temperature))
    return [self.decode_text(row) for row in np.asarray(ids)]

  def interpolate(self, params: Any, first: str, second: str, steps: int, *, temperature: float = 0.0,
                  seed: int = 0) -> list[str]:
    """Sentences decoded along the line between two sentences' posterior means (both ends included)."""
    mu, _ = self.encode_texts(params, [first, second])
    weights = jnp.linspace(0.0, 1.0, steps)[:, None]
    return self.decode_latents(params, (1.0 - weights) * mu[0] + weights * mu[1], temperature=temperature,
                               seed=seed)

  def sample(self, params: Any, options: ml_collections.ConfigDict, prompt: str | None = None, *,
             prompts: Sequence[Any] | None = None) -> list[str]:
    """sample.kind: prior (z ~ N(0, I)) | reconstruct (sample.prompt) | interpolate (prompt -> prompt_b)."""
    del prompts
    kind, prompt = options.kind, options.prompt if prompt is None else prompt
    temperature, count = float(options.temperature), int(options.num_samples)
    max_tokens = int(options.max_tokens)
    if kind == "prior":
      z = jax.random.normal(jax.random.key(options.seed), (count, self.config.vae.latent_size), jnp.float32)
      return self.decode_latents(params, z, temperature=temperature, seed=options.seed + 1, max_tokens=max_tokens)
    if kind == "reconstruct":
      if not prompt.strip():
        raise ConfigError("config.sample.kind='reconstruct' encodes config.sample.prompt: set it to a sentence.")
      mu, logvar = self.encode_texts(params, [prompt.strip()])
      # The first reconstruction decodes the posterior mean; any others, samples of q(z|x).
      noise = jax.random.normal(jax.random.key(options.seed), (count, mu.shape[-1]), jnp.float32)
      z = mu + jnp.exp(0.5 * logvar) * noise * (jnp.arange(count) > 0)[:, None]
      return self.decode_latents(params, z, temperature=temperature, seed=options.seed + 1, max_tokens=max_tokens)
    if kind == "interpolate":
      return self.interpolate(params, prompt.strip(), options.prompt_b.strip(), int(options.interpolation_steps),
                              temperature=temperature, seed=options.seed)
    raise ConfigError(f"config.sample.kind={kind!r}: a VAE generates with kind prior, reconstruct or interpolate.")


@functools.partial(jax.jit, static_argnums=0)
def _encode(model: SentenceVAE, params: Any, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  # Jitted so the logical sharding constraints inside the encoder trace under the mesh; the module is
  # static, so repeated calls (notebooks, --mode sample) reuse one compilation per shape.
  return model.apply({"params": params}, targets, mask, method=SentenceVAE.encode)
