"""Text GANs on SST-2 sentences against the MLE LM's temperature sweep (Caccia et al. 2020).

Two GANs on the backbone of experiments/sentence_vae.py, each started from a
model trained there by maximum likelihood:

  relgan (default): the plain LM (runs/sentence_lm) fine-tuned adversarially with the Gumbel-softmax
          relaxation (RelGAN, Nie et al. 2019) against a 2-layer Transformer discriminator on soft one-hots,
          inverse temperature annealed 1 -> 100 (exponential), relativistic standard loss, Adam 1e-4.
  latent: an ARAE-style GAN (Zhao et al. 2018) in the sentence VAE's latent space (runs/sentence_vae):
          an MLP generator against an MLP critic on posterior means, WGAN-GP (Gulrajani et al. 2017);
          sentences are its codes decoded greedily by the (frozen) VAE decoder.

After training, the run writes into its workdir (lm.tasks.gan.quality_diversity_report):
  generation.json         BLEU-2..5 vs the 872 dev sentences (quality) and self-BLEU-2..5 (diversity) of
                          500 samples of the GAN and of the MLE LM at temperatures 0.5 .. 1.2, and
                          their NLL under the judge LM (runs/sentence_judge, another seed)
  quality_diversity.png   the MLE curve and the GAN point (hollow when the curve dominates it)
  samples.jsonl           every scored sample with its label (the GAN's and each temperature's)
Expected result (measured on one H100; BENCHMARKS.md "Text GANs vs the MLE temperature curve", with the
figure and the analysis), BLEU-4 / self-BLEU-4 of 500 samples:
  MLE LM, T = 0.2 .. 1.2     best quality 0.217 / 0.313 at T = 0.5; 0.091 / 0.000 at T = 1.0
  relgan (this config)       0.089 / 0.053: dominated (by T = 1.0); at BLEU-2 it lies on the curve
  relgan, gan.mle_weight=0   0.000 / 0.000: collapsed (1-2-word or broken sentences, no 4-gram in common), dominated
  latent                     0.240 / 0.999: not dominated at BLEU-4, but 500 samples are 27 sentences (mode collapse)
Runtime: about 1 minute each on an H100 (500 / 3,000 steps), plus the report.

Command:
  # first the three runs of experiments/sentence_vae.py (vae, lm, judge), then
  python -m lm.main --config experiments/text_gan.py --workdir runs/text_relgan
  python -m lm.main --config experiments/text_gan.py:latent --workdir runs/text_latent_gan
"""

import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("relgan", "latent")


def _sentence_config(variant):
  spec = importlib.util.spec_from_file_location("sentence_vae", os.path.join(_HERE, "sentence_vae.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def get_config(variant: str = "relgan"):
  if variant not in VARIANTS:
    raise ValueError(f"experiments/text_gan.py:{variant}: the variant must be one of {VARIANTS}.")
  # The same tokenizer, backbone and (for latent) VAE as the model it starts from.
  config = _sentence_config("lm" if variant == "relgan" else "vae")
  config.head = "gan"
  config.gan.kind = variant
  config.gan.lr = 1e-4
  config.gan.eval_samples = 500
  config.gan.temperatures = (0.2, 0.3, 0.4, 0.5, 0.7, 0.85, 1.0, 1.2)
  config.gan.baseline = "runs/sentence_lm"
  config.gan.judge = "runs/sentence_judge"
  config.model.dropout = 0.0
  if variant == "relgan":
    config.init_from = "runs/sentence_lm"
    config.steps = 500
    config.gan.critic_steps = 3
    config.gan.mle_weight = 1.0
    config.gan.discriminator_layers = 2
    config.gan.discriminator_width = 64
    config.gan.max_temperature = 100.0
    config.gan.temperature_schedule = "exponential"
  else:
    config.init_from = "runs/sentence_vae"
    config.steps = 3000
    config.gan.critic_steps = 5
    config.gan.gp_weight = 10.0
    config.gan.noise_size = 64
    config.gan.hidden_size = 256
    config.gan.mlp_layers = 2
  config.eval_every = config.steps
  config.checkpoint_every = config.steps
  config.log_every = 50
  config.sample.kind = "continue"
  config.sample.num_samples = 10
  return config
