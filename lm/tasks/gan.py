"""`config.head = "gan"`: a text GAN on the backbone (`lm.models.gan`), with the shared engine.

Both kinds start from an MLE-trained model (`config.init_from`) and keep the
players' parameters and optimizers side by side in the one train state
(params {player: ...}, opt_state {player: Adam state}; `MultiOptimizer`), so
Orbax checkpoints and exact resumes work as for the LM. A step is the
engine's: `gan.critic_steps` updates of the critic/discriminator, then one of
the generator (`lm.train.step.Update`), each with gradient accumulation; all
noise is drawn per row of the global batch.

gan.kind = "latent" (ARAE-style, Zhao et al. 2018), from a head="vae" run:
  params = {autoencoder (the VAE, frozen), generator (noise -> z), critic (z -> score)}
  per step: `gan.critic_steps` WGAN-GP critic updates (Gulrajani et al. 2017)
  against the posterior means of the batch's sentences, then one generator
  update. Sentences: generated codes decoded greedily by the VAE's decoder.

gan.kind = "relgan" (Nie et al. 2019), from a head="lm" run (sentences):
  params = {generator (the LM), discriminator (a small bidirectional Transformer)}
  per step: sample a batch of sentences with Gumbel-max noise g (KV cache),
  recompute their logits in one teacher-forced pass and relax them to soft
  one-hots softmax(beta * (logits + g)) (beta annealed 1 -> gan.max_temperature);
  `gan.critic_steps` discriminator updates on (real one-hots, soft fakes) with
  the relativistic standard loss, then one generator update through the soft
  one-hots (plus `gan.mle_weight` x the MLE loss on the real batch).
  Simplification: each position's relaxation is differentiable in its own
  logits, while the prefix it conditions on is the hard sampled one (RelGAN
  feeds the soft sample back into an LSTM); a Transformer's teacher-forced
  pass makes this one parallel pass instead of `seq_len` sequential ones.

Evaluation every eval: relgan, the generator's NLL on the eval sentences
(how far adversarial training moved it from the MLE model); latent, the
Fréchet distance between Gaussians fitted to the generated codes and to the
eval sentences' posterior means (lower: the generator covers the codes).
After training (and with --mode eval), `quality_diversity_report` writes the
quality-diversity comparison with the MLE model's temperature sweep
(lm.stats.generation) into the workdir: generation.json,
quality_diversity.png and samples.jsonl. The MLE model and the judge are
other runs, handed in by the report's context (`ReportContext.load_run`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lm.core.configs import ConfigPart, require
from lm.core.errors import ConfigError
from lm.models import gan as gan_lib
from lm.models.losses import cross_entropy
from lm.models.transformer import TransformerLM
from lm.models.vae import SentenceVAE, generate_from_latent
from lm.stats import generation
from lm.tasks.base import ReportContext, RunView, Task
from lm.tasks.lm import LMTask, sample_sentences, summarize_loss
from lm.tasks.lm import make_eval_step as lm_eval_step
from lm.tasks.vae import check_vae_fields, sentence_vae
from lm.train import step as step_lib
from lm.train.evaluate import ROWS
from lm.train.optim import MultiOptimizer

EVAL_SEED = 0
# Per-row rng streams of the step (StepContext.row_keys).
CRITIC_NOISE, PENALTY, GENERATOR_NOISE, GUMBEL = 0, 1, 2, 3
KINDS = ("latent", "relgan")
TEMPERATURE_SCHEDULES = ("exponential", "linear", "constant")

FIELDS = {
    "gan.kind": "relgan",  # latent: ARAE-style WGAN-GP in the VAE's latent space | relgan: Gumbel-softmax LM
    "gan.lr": 1e-4,  # Adam for the generator and the critic/discriminator (b1 0.5, b2 0.9: WGAN-GP's)
    "gan.critic_steps": 5,  # critic/discriminator updates per generator update
    "gan.noise_size": 64,  # latent: generator input size
    "gan.hidden_size": 256,  # latent: generator and critic MLP width
    "gan.mlp_layers": 2,  # latent: hidden layers of each
    "gan.gp_weight": 10.0,  # latent: WGAN-GP gradient penalty weight (Gulrajani et al. 2017)
    "gan.discriminator_layers": 2,  # relgan: the Transformer discriminator's depth
    "gan.discriminator_width": 64,  # relgan: its width (heads: model.num_heads)
    "gan.max_temperature": 100.0,  # relgan: Gumbel-softmax temperature annealed from 1 to this
    "gan.temperature_schedule": "exponential",  # exponential | linear | constant (Nie et al. 2019)
    "gan.mle_weight": 0.0,  # relgan: weight of the MLE loss kept beside the adversarial one
    "gan.eval_samples": 500,  # sentences generated per point of the quality-diversity report
    "gan.temperatures": (0.5, 0.7, 0.85, 1.0, 1.2),  # the MLE model's sweep in that report
    "gan.baseline": "",  # head="lm" workdir whose temperature sweep is the MLE curve; empty: relgan's init_from
    "gan.judge": "",  # workdir of a separately trained head="lm" model: NLL of the samples under it
}


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  del mode
  gan = config.gan
  require(gan.kind in KINDS, f"config.gan.kind={gan.kind!r} is not one of {KINDS}.")
  require(gan.lr > 0 and gan.critic_steps >= 1 and gan.gp_weight >= 0 and gan.mle_weight >= 0,
          "config.gan.lr must be > 0, critic_steps >= 1, gp_weight and mle_weight >= 0.")
  require(gan.noise_size >= 1 and gan.hidden_size >= 1 and gan.mlp_layers >= 1 and gan.discriminator_layers >= 1
          and gan.discriminator_width >= 1, "config.gan sizes (noise_size, hidden_size, mlp_layers, "
          "discriminator_layers, discriminator_width) must be >= 1.")
  require(gan.max_temperature >= 1 and gan.temperature_schedule in TEMPERATURE_SCHEDULES,
          "config.gan.max_temperature must be >= 1 and temperature_schedule one of exponential, linear, constant.")
  require(gan.eval_samples >= 2 and all(t > 0 for t in gan.temperatures),
          "config.gan.eval_samples must be >= 2 and every config.gan.temperatures entry > 0.")


def _adam(lr: float) -> optax.GradientTransformation:
  # WGAN-GP's Adam (b1 0.5, b2 0.9); RelGAN uses Adam too. Clipped for safety against critic spikes.
  return optax.chain(optax.clip_by_global_norm(10.0), optax.adam(lr, b1=0.5, b2=0.9))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to two samples [n, d] (as FID, here in latent space)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mean_a, mean_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  # tr sqrt(cov_a cov_b) = sum sqrt(eig(sqrt(cov_a) cov_b sqrt(cov_a))), all of them real and >= 0.
  values, vectors = np.linalg.eigh(cov_a)
  root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
  middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
  trace_root = np.sum(np.sqrt(np.clip(middle, 0, None)))
  return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


class GANTask(Task):
  """A text GAN (module doc)."""

  name = "gan"
  CONFIG = ConfigPart("lm.tasks.gan", FIELDS, validate)

  def __init__(self, config, model_config, tokenizer, **kwargs):
    self.kind = config.gan.kind
    self.init_from_tasks = ("vae", "gan") if self.kind == "latent" else ("lm", "gan")
    self.requires_init_from = (
        "config.head='gan' starts from an MLE-trained model: set config.init_from to the workdir of a "
        + ("head='vae' run (gan.kind=latent)." if self.kind == "latent" else
           "head='lm' run on sentences (gan.kind=relgan)."))
    super().__init__(config, model_config, tokenizer, **kwargs)
    gan = config.gan
    if self.kind == "latent":
      self.generator = gan_lib.LatentGenerator(config.vae.latent_size, gan.hidden_size, gan.mlp_layers)
      self.critic = gan_lib.LatentCritic(gan.hidden_size, gan.mlp_layers)
      self.players = ("generator", "critic")
    else:
      disc_config = dataclasses.replace(model_config, num_layers=gan.discriminator_layers,
                                        width=gan.discriminator_width, mlp_dim=None, num_kv_heads=None,
                                        position="learned", scan_layers=False, remat_policy="none")
      self.discriminator = gan_lib.SequenceDiscriminator(disc_config)
      self.players = ("generator", "discriminator")
    self.optimizer = MultiOptimizer({player: _adam(gan.lr) for player in self.players})

  # -- model and state -----------------------------------------------------
  def build_model(self) -> nn.Module:
    """The model that writes sentences: the VAE (latent) or the LM (relgan)."""
    if self.config.gan.kind == "latent":
      return sentence_vae(self.model_config, self.config.vae)
    return TransformerLM(self.model_config)

  def init_params(self, key: jax.Array) -> Any:
    batch = self.example_batch(self.config.batch_size)
    keys = jax.random.split(key, 3)
    if self.kind == "latent":
      noise = jnp.zeros((self.config.batch_size, self.config.gan.noise_size), jnp.float32)
      z = jnp.zeros((self.config.batch_size, self.config.vae.latent_size), jnp.float32)
      return {"autoencoder": self.model.init(keys[0], batch["inputs"], batch["targets"], batch["mask"] > 0)["params"],
              "generator": self.generator.init(keys[1], noise)["params"],
              "critic": self.critic.init(keys[2], z)["params"]}
    soft = jnp.zeros(batch["inputs"].shape + (self.model_config.vocab_size,), jnp.float32)
    return {"generator": self.model.init(keys[0], batch["inputs"])["params"],
            "discriminator": self.discriminator.init(keys[1], soft, batch["mask"] > 0)["params"]}

  def make_optimizer(self) -> tuple[MultiOptimizer, optax.Schedule]:
    return self.optimizer, optax.constant_schedule(self.config.gan.lr)

  def init_from_target(self, abstract_params: Any, source_task: str) -> tuple[Any, Callable[[Any, Any], Any]]:
    if source_task == self.name:
      return abstract_params, lambda params, restored: restored
    part = "autoencoder" if self.kind == "latent" else "generator"
    return abstract_params[part], lambda params, restored: dict(params, **{part: restored})

  def check_checkpoint(self, directory: str, metadata: Mapping[str, Any], written_by: str) -> None:
    del written_by
    if self.kind == "latent":  # the autoencoder is a VAE of config.vae's shape
      check_vae_fields(directory, metadata, self.config.vae)

  def writer(self, params: Any) -> Any:
    """The params of the model that writes sentences (the VAE or the LM)."""
    return params["autoencoder" if self.kind == "latent" else "generator"]

  # -- the step: critic/discriminator updates, then the generator's ---------------------------------------
  def updates(self) -> Sequence[step_lib.Update]:
    return self._latent_updates() if self.kind == "latent" else self._relgan_updates()

  def prepare(self, params: Any, batch: Mapping[str, jax.Array], ctx: step_lib.StepContext) -> dict[str, jax.Array]:
    """Once per step, before the updates: the real codes (latent), or the generated sentences (relgan)."""
    if self.kind == "latent":
      real, _ = self.model.apply({"params": params["autoencoder"]}, batch["targets"], batch["mask"] > 0,
                                 method=SentenceVAE.encode)
      return {"real": real}
    noise = self._gumbel(ctx)
    fake_tokens = sample_with_noise(self.model, params["generator"], noise, self.vocab.bos)
    fake_inputs = jnp.concatenate([jnp.full((fake_tokens.shape[0], 1), self.vocab.bos, jnp.int32),
                                   fake_tokens[:, :-1]], axis=1)
    fake = self._soft_fakes(params["generator"], fake_inputs, noise, ctx.step)
    return {"fake_inputs": fake_inputs, "fake_mask": sentence_mask(fake_tokens, self.vocab.eos), "fake": fake}

  def loss_totals(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {"tokens": jnp.sum(batch["mask"].astype(jnp.float32))} if "mask" in batch else {}

  def step_metrics(self, step: jax.Array) -> dict[str, jax.Array]:
    if self.kind == "latent":
      return {}
    return {"inverse_temperature": jnp.asarray(self._beta(step), jnp.float32)}

  def _latent_updates(self) -> Sequence[step_lib.Update]:
    gan, generator, critic = self.config.gan, self.generator, self.critic
    weight, noise_size = float(gan.gp_weight), int(gan.noise_size)

    def noise(ctx, stream):
      return jax.vmap(lambda key: jax.random.normal(key, (noise_size,)))(ctx.row_keys(stream))

    def critic_loss(critic_params, batch, ctx):
      fake = generator.apply({"params": ctx.params["generator"]}, noise(ctx, CRITIC_NOISE))
      score = lambda x: critic.apply({"params": critic_params}, x)  # noqa: E731
      real_scores, fake_scores = score(batch["real"]), score(fake)
      eps = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(ctx.row_keys(PENALTY))
      penalty = gan_lib.gradient_penalty(score, batch["real"], fake, eps=eps)
      loss = gan_lib.wgan_critic_loss(real_scores, fake_scores, penalty, weight)
      # Each of these is a mean over the micro-batch's rows: its share of the global batch's mean.
      return loss * ctx.share, {"wasserstein": gan_lib.wasserstein_estimate(real_scores, fake_scores) * ctx.share,
                                "gradient_penalty": penalty * ctx.share}

    def generator_loss(generator_params, batch, ctx):
      del batch
      fake = generator.apply({"params": generator_params}, noise(ctx, GENERATOR_NOISE))
      return gan_lib.wgan_generator_loss(critic.apply({"params": ctx.params["critic"]}, fake)) * ctx.share, {}

    return (step_lib.Update(critic_loss, part="critic", repeats=int(gan.critic_steps),
                            grad_norm_name="critic_grad_norm"),
            step_lib.Update(generator_loss, part="generator", loss_name="generator_loss"))

  def _beta(self, step: jax.Array) -> jax.Array:
    gan = self.config.gan
    return gan_lib.temperature_schedule(step, total_steps=int(self.config.steps),
                                        max_temperature=float(gan.max_temperature), kind=gan.temperature_schedule)

  def _gumbel(self, ctx: step_lib.StepContext) -> jax.Array:
    """Gumbel noise [micro, length, vocab], per row, the same in `prepare` and the generator's update."""
    shape = (self.config.seq_len, self.model_config.vocab_size)
    return jax.vmap(lambda key: gan_lib.gumbel_noise(key, shape))(ctx.row_keys(GUMBEL))

  def _soft_fakes(self, generator_params, fake_inputs, noise, step):
    logits = self.model.apply({"params": generator_params}, fake_inputs)
    return gan_lib.gumbel_softmax(logits, noise, 1.0 / self._beta(step))

  def _relgan_updates(self) -> Sequence[step_lib.Update]:
    gan, model, discriminator = self.config.gan, self.model, self.discriminator
    mle_weight, vocab_size = float(gan.mle_weight), self.model_config.vocab_size

    def discriminator_loss(disc_params, batch, ctx):
      real = gan_lib.one_hot_sequences(batch["targets"], vocab_size)
      real_logits = discriminator.apply({"params": disc_params}, real, batch["mask"] > 0)
      fake_logits = discriminator.apply({"params": disc_params}, batch["fake"], batch["fake_mask"])
      d_loss, _ = gan_lib.relativistic_losses(real_logits, fake_logits)
      accuracy = jnp.mean((real_logits > fake_logits).astype(jnp.float32))
      return d_loss * ctx.share, {"discriminator_accuracy": accuracy * ctx.share}

    def generator_loss(generator_params, batch, ctx):
      disc_params = ctx.params["discriminator"]
      real = gan_lib.one_hot_sequences(batch["targets"], vocab_size)
      real_logits = discriminator.apply({"params": disc_params}, real, batch["mask"] > 0)
      soft = self._soft_fakes(generator_params, batch["fake_inputs"], self._gumbel(ctx), ctx.step)
      fake_logits = discriminator.apply({"params": disc_params}, soft, batch["fake_mask"])
      _, g_loss = gan_lib.relativistic_losses(real_logits, fake_logits)
      fake_length = jnp.mean(jnp.sum(batch["fake_mask"], axis=-1).astype(jnp.float32))
      metrics = {"generator_loss": g_loss * ctx.share, "fake_length": fake_length * ctx.share}
      loss = g_loss * ctx.share
      if mle_weight:
        logits = model.apply({"params": generator_params}, batch["inputs"])
        nll_sum, _ = cross_entropy(logits, batch["targets"], batch["mask"])
        loss = loss + mle_weight * ctx.mean(nll_sum, "tokens")
      return loss, metrics

    return (step_lib.Update(discriminator_loss, part="discriminator", repeats=int(gan.critic_steps),
                            grad_norm_name="discriminator_grad_norm"),
            step_lib.Update(generator_loss, part="generator", loss_name="generator_total_loss"))

  # -- evaluation ----------------------------------------------------------
  def make_eval_step(self) -> Callable:
    if self.kind == "relgan":
      lm_eval = lm_eval_step(self.model)
      return lambda params, batch: lm_eval(params["generator"], batch)
    model, generator, noise_size = self.model, self.generator, int(self.config.gan.noise_size)

    def eval_step(params, batch):
      mu, _ = model.apply({"params": params["autoencoder"]}, batch["targets"], batch["mask"] > 0,
                          method=SentenceVAE.encode)
      keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(EVAL_SEED), i))(batch["index"])
      noise = jax.vmap(lambda key: jax.random.normal(key, (noise_size,)))(keys)
      fake = generator.apply({"params": params["generator"]}, noise)
      valid = jnp.any(batch["mask"] > 0, axis=-1).astype(jnp.float32)
      return {"sentences": jnp.sum(valid), ROWS + "real": mu, ROWS + "fake": fake, ROWS + "valid": valid}

    return eval_step

  def summarize(self, sums: Mapping[str, float], rows: Mapping[str, np.ndarray], chars_per_token: float
                ) -> dict[str, float]:
    if self.kind == "relgan":
      return summarize_loss(sums, chars_per_token)
    valid = rows[ROWS + "valid"] > 0
    distance = frechet_distance(rows[ROWS + "real"][valid], rows[ROWS + "fake"][valid])
    return {"eval/loss": distance, "eval/latent_frechet": distance, "eval/sentences": sums["sentences"]}

  # -- generation ----------------------------------------------------------
  def generate(self, params: Any, count: int, *, seed: int = 0, temperature: float | None = None) -> list[str]:
    """`count` sentences from the GAN: decoded generated codes (greedy), or the generator LM's samples
    (temperature 1 unless given). Call under the mesh context."""
    length = self.config.seq_len
    if self.kind == "latent":
      noise = jax.random.normal(jax.random.key(seed), (count, self.config.gan.noise_size), jnp.float32)
      z = _apply(self.generator, params["generator"], noise)
      prompt = jnp.full((count, 1), self.vocab.bos, jnp.int32)
      ids = generate_from_latent(self.model, params["autoencoder"], z, prompt, jax.random.key(seed + 1),
                                 max_new_tokens=length, temperature=0.0 if temperature is None else temperature)
      return [self.decode_text(row) for row in np.asarray(ids)]
    return sample_sentences(self.model, params["generator"], self.vocab, self.tokenizer, count, length=length,
                            seed=seed, temperature=1.0 if temperature is None else temperature)

  def final_report(self, context: ReportContext) -> dict[str, Any]:
    return quality_diversity_report(self, context)

  def sample(self, params: Any, options, prompt: str | None = None, *, prompts: Sequence[Any] | None = None
             ) -> list[str]:
    del prompt, prompts  # a GAN writes from noise
    temperature = None if self.kind == "latent" else float(options.temperature)
    return self.generate(params, int(options.num_samples), seed=int(options.seed), temperature=temperature)


def sentence_mask(tokens: jax.Array, eos: int) -> jax.Array:
  """True at every generated token up to and including the first EOS: [batch, length] bool."""
  is_eos = tokens == eos
  before = jnp.cumsum(is_eos.astype(jnp.int32), axis=-1) - is_eos.astype(jnp.int32)
  return before == 0


def sample_with_noise(model: TransformerLM, params: Any, noise: jax.Array, bos: int) -> jax.Array:
  """Gumbel-max sampling after BOS with given noise [batch, length, vocab] -> tokens [batch, length] (KV cache)."""
  batch, length, _ = noise.shape
  cache = model.init_cache(batch)

  def step(carry, index):
    cache, token = carry
    logits, variables = model.apply({"params": params, "cache": cache}, token[:, None], decode=True,
                                    mutable=["cache"])
    chosen = gan_lib.gumbel_argmax(logits[:, -1], noise[:, index])
    return (variables["cache"], chosen), chosen

  first = jnp.full((batch,), bos, jnp.int32)
  _, tokens = jax.lax.scan(step, (cache, first), jnp.arange(length))
  return tokens.T


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: nn.Module, params: Any, inputs: jax.Array) -> jax.Array:
  """module(inputs), jitted once per module and shape (under the mesh context: logical constraints trace)."""
  return module.apply({"params": params}, inputs)


# -- the quality-diversity report ------------------------------------------
QD_PLOT = "quality_diversity.png"
SAMPLES = "samples.jsonl"  # {"label", "text"} per line: every sample scored in the report


def _sentence_lm(run: RunView, role: str) -> RunView:
  """`run`, checked to be a language model on sentences (what the MLE curve and the judge must be)."""
  if not isinstance(run.task, LMTask) or not run.task.sentences:
    raise ConfigError(f"{run.workdir} is a head={run.task.name!r} run on data.format={run.task.config.data.format!r}; "
                      f"the {role} must be a head='lm' run on sentences.")
  return run


def quality_diversity_report(task: GANTask, context: ReportContext) -> dict[str, Any]:
  """Samples of the GAN and of the MLE model's temperature sweep, scored and drawn into the workdir.

  Quality: BLEU-2..5 of `gan.eval_samples` sentences against the eval
  split's sentences; diversity: self-BLEU-2..5 (lm.stats.generation, sacrebleu);
  with `gan.judge`, the samples' mean NLL per sentence under that separately
  trained LM. The MLE model is `gan.baseline`, else the relgan's init_from LM.
  Writes generation.json, quality_diversity.png and samples.jsonl (process 0).
  """
  config = task.config
  gan, count = config.gan, int(config.gan.eval_samples)
  references = [text for text in context.open_split(config.data.eval_split) if text.strip()]
  baseline_dir = gan.baseline or (config.init_from if task.kind == "relgan" else "")
  loaded: dict[str, RunView] = {}

  def load(workdir: str, role: str) -> RunView:  # the baseline is often the judge too: build and restore it once
    if workdir not in loaded:
      loaded[workdir] = _sentence_lm(context.load_run(workdir), role)
    return loaded[workdir]

  judge = load(gan.judge, "judge") if gan.judge else None

  def judged(texts):
    if judge is None:
      return None
    with judge.context():
      nll = judge.task.mean_sentence_nll(judge.params, texts)
    return None if math.isnan(nll) else nll

  curve, written = [], []
  if baseline_dir:
    baseline = load(baseline_dir, "MLE baseline")
    for index, temperature in enumerate(gan.temperatures):
      with baseline.context():
        texts = baseline.task.sample_sentences(baseline.params, count, seed=index + 1, temperature=float(temperature))
      curve.append(generation.evaluate_samples(f"MLE T={temperature:g}", texts, references,
                                               temperature=float(temperature), nll=judged(texts)))
      written.extend((curve[-1].label, text) for text in texts)
  with context.run.context():
    texts = task.generate(context.run.params, count, seed=0)
  label = "ARAE latent GAN" if task.kind == "latent" else "RelGAN fine-tuned LM"
  point = generation.evaluate_samples(label, texts, references, nll=judged(texts))
  written.extend((label, text) for text in texts)
  summary = {f"gan/bleu{n}": point.bleu[n] for n in sorted(point.bleu)}
  summary.update({f"gan/self_bleu{n}": point.self_bleu[n] for n in sorted(point.self_bleu)})
  if point.nll is not None:
    summary["gan/judge_nll"] = point.nll
  if curve:
    summary["gan/dominated"] = float(generation.dominated(point, curve))
    summary["gan/tied"] = float(bool(generation.tied_with(point, curve)))
  if jax.process_index() == 0:
    workdir = context.workdir
    generation.write_report(curve, [point], workdir)
    generation.plot_quality_diversity(curve, [point], os.path.join(workdir, QD_PLOT))
    with open(os.path.join(workdir, SAMPLES), "w") as f:
      f.writelines(json.dumps({"label": label, "text": text}) + "\n" for label, text in written)
  return summary
