"""`config.head = "gan"`: a text GAN on the backbone (`lm.models.gan`), in the shared sharded loop.

Both kinds start from an MLE-trained model (`config.init_from`) and keep the
players' parameters and optimizers side by side in the one train state
(params {player: ...}, opt_state {player: Adam state}; `MultiOptimizer`), so
Orbax checkpoints and exact resumes work as for the LM.

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
quality_diversity.png and samples.jsonl.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lm.heads import ROWS, Head, MultiOptimizer
from lm.models import TransformerLM
from lm.models import gan as gan_lib
from lm.models import losses
from lm.models.vae import SentenceVAE, VAEConfig, generate_from_latent
from lm.train import step as step_lib

EVAL_SEED = 0


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


class GANHead(Head):
  """A text GAN (module doc)."""

  name = "gan"
  counts_lm_flops = False  # several players and steps per update

  def __init__(self, config, model_config, tokenizer):
    self.kind = config.gan.kind
    self.init_from_heads = ("vae", "gan") if self.kind == "latent" else ("lm", "gan")
    self.requires_init_from = (
        "config.head='gan' starts from an MLE-trained model: set config.init_from to the workdir of a "
        + ("head='vae' run (gan.kind=latent)." if self.kind == "latent" else
           "head='lm' run on sentences (gan.kind=relgan)."))
    super().__init__(config, model_config, tokenizer)
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
      vae = self.config.vae
      return SentenceVAE(self.model_config, VAEConfig(latent_size=vae.latent_size, injection=vae.injection,
                                                      pooling=vae.pooling, encoder_layers=vae.encoder_layers))
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

  def make_optimizer(self) -> tuple[optax.GradientTransformation, optax.Schedule]:
    return self.optimizer.as_transformation(), optax.constant_schedule(self.config.gan.lr)

  def init_from_target(self, abstract_params: Any, source_head: str) -> tuple[Any, Callable[[Any, Any], Any]]:
    if source_head == "gan":
      return abstract_params, lambda params, restored: restored
    part = "autoencoder" if self.kind == "latent" else "generator"
    return abstract_params[part], lambda params, restored: dict(params, **{part: restored})

  def writer(self, params: Any) -> Any:
    """The params of the model that writes sentences (the VAE or the LM)."""
    return params["autoencoder" if self.kind == "latent" else "generator"]

  # -- steps ---------------------------------------------------------------
  def make_train_step(self, tx: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
    del tx, schedule
    return self._latent_train_step() if self.kind == "latent" else self._relgan_train_step()

  def _latent_train_step(self) -> Callable:
    gan, model, generator, critic = self.config.gan, self.model, self.generator, self.critic
    multi, steps, weight = self.optimizer, int(gan.critic_steps), float(gan.gp_weight)

    def train_step(state, batch):
      rng = jax.random.fold_in(state.key, state.step)
      params = state.params
      real, _ = model.apply({"params": params["autoencoder"]}, batch["targets"], batch["mask"] > 0,
                            method=SentenceVAE.encode)
      real = jax.lax.stop_gradient(real)
      size = (real.shape[0], int(gan.noise_size))

      def critic_update(carry, index):
        params, opt_state = carry
        noise_key, penalty_key = jax.random.split(jax.random.fold_in(rng, index))
        fake = generator.apply({"params": params["generator"]}, jax.random.normal(noise_key, size))

        def loss_fn(critic_params):
          score = lambda x: critic.apply({"params": critic_params}, x)  # noqa: E731
          real_scores, fake_scores = score(real), score(fake)
          penalty = gan_lib.gradient_penalty(score, real, fake, penalty_key)
          loss = gan_lib.wgan_critic_loss(real_scores, fake_scores, penalty, weight)
          return loss, (gan_lib.wasserstein_estimate(real_scores, fake_scores), penalty)

        (loss, (distance, penalty)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params["critic"])
        params, opt_state = multi.update("critic", grads, opt_state, params)
        return (params, opt_state), (loss, distance, penalty, optax.global_norm(grads))

      (params, opt_state), (critic_loss, distance, penalty, critic_norm) = jax.lax.scan(
          critic_update, (params, state.opt_state), jnp.arange(steps))
      noise = jax.random.normal(jax.random.fold_in(rng, steps), size)

      def generator_loss(generator_params):
        fake = generator.apply({"params": generator_params}, noise)
        return gan_lib.wgan_generator_loss(critic.apply({"params": params["critic"]}, fake))

      g_loss, grads = jax.value_and_grad(generator_loss)(params["generator"])
      params, opt_state = multi.update("generator", grads, opt_state, params)
      metrics = {"train/loss": critic_loss[-1], "train/generator_loss": g_loss, "train/wasserstein": distance[-1],
                 "train/gradient_penalty": penalty[-1], "train/critic_grad_norm": critic_norm[-1],
                 "train/grad_norm": optax.global_norm(grads), "train/lr": jnp.asarray(gan.lr, jnp.float32)}
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step

  def _relgan_train_step(self) -> Callable:
    gan, model, discriminator, vocab = self.config.gan, self.model, self.discriminator, self.vocab
    multi, steps, mle_weight = self.optimizer, int(gan.critic_steps), float(gan.mle_weight)
    total = int(self.config.steps)
    vocab_size = self.model_config.vocab_size

    def train_step(state, batch):
      rng = jax.random.fold_in(state.key, state.step)
      params = state.params
      batch_size, length = batch["inputs"].shape
      noise = gan_lib.gumbel_noise(rng, (batch_size, length, vocab_size))
      fake_tokens = jax.lax.stop_gradient(sample_with_noise(model, params["generator"], noise, vocab.bos))
      fake_inputs = jnp.concatenate([jnp.full((batch_size, 1), vocab.bos, jnp.int32), fake_tokens[:, :-1]], axis=1)
      fake_mask = sentence_mask(fake_tokens, vocab.eos)
      real_mask = batch["mask"] > 0
      real = gan_lib.one_hot_sequences(batch["targets"], vocab_size)
      beta = gan_lib.temperature_schedule(state.step, total_steps=total, max_temperature=float(gan.max_temperature),
                                          kind=gan.temperature_schedule)

      def soft_fakes(generator_params):
        logits = model.apply({"params": generator_params}, fake_inputs)
        return gan_lib.gumbel_softmax(logits, noise, 1.0 / beta)

      fake = jax.lax.stop_gradient(soft_fakes(params["generator"]))

      def discriminator_update(carry, _):
        params, opt_state = carry

        def loss_fn(disc_params):
          real_logits = discriminator.apply({"params": disc_params}, real, real_mask)
          fake_logits = discriminator.apply({"params": disc_params}, fake, fake_mask)
          d_loss, _ = gan_lib.relativistic_losses(real_logits, fake_logits)
          return d_loss, jnp.mean((real_logits > fake_logits).astype(jnp.float32))

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params["discriminator"])
        params, opt_state = multi.update("discriminator", grads, opt_state, params)
        return (params, opt_state), (loss, accuracy)

      (params, opt_state), (d_loss, d_accuracy) = jax.lax.scan(discriminator_update, (params, state.opt_state),
                                                               None, length=steps)

      def generator_loss(generator_params):
        real_logits = discriminator.apply({"params": params["discriminator"]}, real, real_mask)
        fake_logits = discriminator.apply({"params": params["discriminator"]}, soft_fakes(generator_params),
                                          fake_mask)
        _, g_loss = gan_lib.relativistic_losses(real_logits, fake_logits)
        if not mle_weight:
          return g_loss, g_loss
        logits = model.apply({"params": generator_params}, batch["inputs"])
        nll_sum, count = losses.cross_entropy(logits, batch["targets"], batch["mask"])
        return g_loss + mle_weight * nll_sum / jnp.maximum(count, 1.0), g_loss

      (_, g_loss), grads = jax.value_and_grad(generator_loss, has_aux=True)(params["generator"])
      params, opt_state = multi.update("generator", grads, opt_state, params)
      metrics = {"train/loss": d_loss[-1], "train/generator_loss": g_loss, "train/discriminator_accuracy":
                 d_accuracy[-1], "train/inverse_temperature": jnp.asarray(beta, jnp.float32),
                 "train/fake_length": jnp.mean(jnp.sum(fake_mask, axis=-1).astype(jnp.float32)),
                 "train/grad_norm": optax.global_norm(grads), "train/lr": jnp.asarray(gan.lr, jnp.float32)}
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step

  def make_eval_step(self) -> Callable:
    if self.kind == "relgan":
      lm_eval = step_lib.make_eval_step(self.model)
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
      return super().summarize(sums, rows, chars_per_token)
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

  def final_report(self, experiment: Any, params: Any) -> dict[str, Any]:
    return quality_diversity_report(experiment, params)

  def sample(self, params: Any, options, prompt: str | None = None) -> list[str]:
    del prompt  # a GAN writes from noise
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


def sample_sentences(model: TransformerLM, params: Any, vocab, tokenizer, count: int, *, length: int, seed: int,
                     temperature: float, batch_size: int = 256) -> list[str]:
  """`count` sentences sampled after BOS at `temperature` (0: greedy), cut at EOS. Call under the mesh context."""
  from lm import sample as sample_lib  # pylint: disable=g-import-not-at-top
  texts = []
  for start in range(0, count, batch_size):
    rows = min(batch_size, count - start)
    prompt = jnp.full((rows, 1), vocab.bos, jnp.int32)
    ids = sample_lib.generate(model, params, prompt, jax.random.key(seed * 100_003 + start),
                              max_new_tokens=length, temperature=float(temperature))
    texts.extend(vocab.decode(tokenizer, row) for row in np.asarray(ids))
  return texts


def mean_sentence_nll(experiment: Any, params: Any, texts: list[str]) -> float:
  """Mean NLL per sentence (nats, EOS included) of texts under a head="lm" sentence model."""
  from lm.data import sentences as sentences_lib  # pylint: disable=g-import-not-at-top
  kept = [text for text in texts if text.strip() and len(experiment.tokenizer.encode(text))]
  if not kept:
    return math.nan
  examples = sentences_lib.examples_for_texts(experiment.tokenizer, experiment.config.seq_len, kept)
  total = 0.0
  for start in range(0, len(kept), 256):
    chunk = {key: jnp.asarray(value[start:start + 256]) for key, value in examples.items() if key != "index"}
    total += float(_nll_sum(experiment.model, params, chunk))
  return total / len(kept)


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: nn.Module, params: Any, inputs: jax.Array) -> jax.Array:
  """module(inputs), jitted once per module and shape (under the mesh context: logical constraints trace)."""
  return module.apply({"params": params}, inputs)


@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(model: TransformerLM, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """Summed NLL of a sentence batch's targets (mask) under an LM."""
  logits = model.apply({"params": params}, batch["inputs"])
  return losses.cross_entropy(logits, batch["targets"], batch["mask"])[0]


# -- the quality-diversity report ------------------------------------------
QD_PLOT = "quality_diversity.png"
SAMPLES = "samples.jsonl"  # {"label", "text"} per line: every sample scored in the report


def load_run(workdir: str, like: Any) -> tuple[Any, Any]:
  """(experiment, params) of another run's latest checkpoint, on the mesh of the config `like`."""
  from lm import run_modes  # pylint: disable=g-import-not-at-top
  from lm.config import ConfigError, config_from_saved  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{workdir} has no config.json: point config.gan.baseline / config.gan.judge at the workdir "
                      "of a finished head='lm' run on sentences.")
  with open(path) as f:
    saved = json.load(f)["config"]
  # On today's schema: keys added since that run keep their defaults, JSON lists become the tuples it holds.
  config = config_from_saved(saved)
  config.mesh = ml_collections.ConfigDict(like.mesh.to_dict())
  config.distributed = ml_collections.ConfigDict(like.distributed.to_dict())
  config.lock()
  if config.head != "lm" or config.data.format != "sentences":
    raise ConfigError(f"{workdir} is a head={config.head!r} run on data.format={config.data.format!r}; the MLE "
                      "baseline and the judge must be head='lm' runs on sentences.")
  experiment, params, _ = run_modes.load_trained(config, workdir, "eval")
  return experiment, params


def quality_diversity_report(experiment: Any, params: Any) -> dict[str, Any]:
  """Samples of the GAN and of the MLE model's temperature sweep, scored and drawn into the workdir.

  Quality: BLEU-2..5 of `gan.eval_samples` sentences against the eval
  split's sentences; diversity: self-BLEU-2..5 (lm.stats.generation, sacrebleu);
  with `gan.judge`, the samples' mean NLL per sentence under that separately
  trained LM. The MLE model is `gan.baseline`, else the relgan's init_from LM.
  Writes generation.json, quality_diversity.png and samples.jsonl (process 0).
  """
  from lm.stats import generation  # pylint: disable=g-import-not-at-top
  from lm.train.experiment import open_eval_split  # pylint: disable=g-import-not-at-top
  config, head = experiment.config, experiment.head
  gan, count = config.gan, int(config.gan.eval_samples)
  references = [text for text in open_eval_split(config) if text.strip()]
  baseline_dir = gan.baseline or (config.init_from if head.kind == "relgan" else "")
  loaded: dict[str, tuple[Any, Any]] = {}

  def load(workdir: str) -> tuple[Any, Any]:  # the baseline is often the judge too: build and restore it once
    if workdir not in loaded:
      loaded[workdir] = load_run(workdir, config)
    return loaded[workdir]

  judge = load(gan.judge) if gan.judge else None

  def judged(texts):
    if judge is None:
      return None
    with judge[0].steps.context():
      nll = mean_sentence_nll(judge[0], judge[1], texts)
    return None if math.isnan(nll) else nll

  curve, written = [], []
  if baseline_dir:
    baseline, baseline_params = load(baseline_dir)
    for index, temperature in enumerate(gan.temperatures):
      with baseline.steps.context():
        texts = sample_sentences(baseline.model, baseline_params, baseline.head.vocab, baseline.tokenizer, count,
                                 length=config.seq_len, seed=index + 1, temperature=float(temperature))
      curve.append(generation.evaluate_samples(f"MLE T={temperature:g}", texts, references,
                                               temperature=float(temperature), nll=judged(texts)))
      written.extend((curve[-1].label, text) for text in texts)
  with experiment.steps.context():
    texts = head.generate(params, count, seed=0)
  label = "ARAE latent GAN" if head.kind == "latent" else "RelGAN fine-tuned LM"
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
    workdir = experiment.workdir
    generation.write_report(curve, [point], workdir)
    generation.plot_quality_diversity(curve, [point], os.path.join(workdir, QD_PLOT))
    with open(os.path.join(workdir, SAMPLES), "w") as f:
      f.writelines(json.dumps({"label": label, "text": text}) + "\n" for label, text in written)
  return summary
