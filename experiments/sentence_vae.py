"""A sentence VAE on SST-2, and the plain LM it is measured against (`--config experiments/sentence_vae.py:lm`).

Data: the sentences of SST-2 (`../shared/data/sst2/`, the `sentence` column):
train.tsv to train (67k phrases and sentences), dev.tsv to evaluate (872
sentences), one example per sentence (data.format="sentences": BOS + tokens
+ EOS, at most 63 tokens), a SentencePiece vocabulary of 2,000 pieces trained on
the training split (the same bytes for both runs, so the NLLs compare).

Backbone (both runs): 4 layers, 4 heads, width 256, learned positions,
dropout 0.1; 3,000 steps of batch 64, AdamW 1e-3 with cosine decay to 1e-4.
The VAE adds a bidirectional encoder of the same shape, z of 32 dims
injected as a memory slot in every layer and added to every embedding
(Optimus), and against posterior collapse 4 KL-annealing cycles (Fu et al.
2019) and free bits of 0.1 nats per dimension (Li et al. 2019). Word dropout
(Bowman et al. 2016) is available (vae.word_dropout) but off: at 0.25 it cost
5 nats of IW NLL here (BENCHMARKS.md).

Metrics (every eval, on all 872 dev sentences): the LM's NLL per sentence;
the VAE's reconstruction, KL, ELBO, the importance-weighted NLL bound with
k = 100 posterior samples, mutual information I(x; z) and active units.

Expected result (measured on one H100, BENCHMARKS.md "Sentence VAE vs plain LM on SST-2"), dev, per sentence:
  plain LM (:lm)   NLL 138.50 nats (eval/loss 3.742 per token)
  VAE              IW NLL (k=100) 142.74 (+3.1 %), recon 140.00, KL 5.30, ELBO 145.30, MI 0.83, active units 32/32
Targets: KL >= 2 and >= 4 active units (met); IW NLL within 2 % of the LM
(not met at this budget: +3.1 %; at 6,000 steps the VAE ends 2.5 % below the
then over-fitted LM, best-vs-best +0.3 %). Runtime: about 1.5 minutes each on
an H100; on a 2-core CPU about 0.9 s (LM) and 1.9 s (VAE) per step.

Command:
  python -m lm.main --config experiments/sentence_vae.py --workdir runs/sentence_vae
  python -m lm.main --config experiments/sentence_vae.py:lm --workdir runs/sentence_lm
  python -m lm.main --config experiments/sentence_vae.py:judge --workdir runs/sentence_judge  # for text_gan.py
  python -m lm.main --config experiments/sentence_vae.py --workdir runs/sentence_vae --mode sample \\
      --config.sample.kind=interpolate --config.sample.prompt="a gorgeous film ." \\
      --config.sample.prompt_b="the plot is a mess ."
"""

import os

from lm.config import base_config

SST2 = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "sst2"))
VARIANTS = ("vae", "lm", "judge")


def get_config(variant: str = "vae"):
  if variant not in VARIANTS:
    raise ValueError(f"experiments/sentence_vae.py:{variant}: the variant must be one of {VARIANTS}.")
  config = base_config()
  config.head = "vae" if variant == "vae" else "lm"
  # The judge (experiments/text_gan.py) is the plain LM trained again with another seed: other
  # initial weights and data order, so it does not share the MLE model's particular errors.
  config.seed = 1 if variant == "judge" else 0
  config.steps = 3000
  config.batch_size = 64
  config.seq_len = 64
  config.log_every = 50
  config.eval_every = 1000
  config.eval_batches = 0  # every dev sentence
  config.checkpoint_every = 1000

  config.data.source = SST2
  config.data.text_field = "sentence"
  config.data.train_split = "train"
  config.data.eval_split = "dev"
  config.data.format = "sentences"
  config.data.tokenizer = "sentencepiece"
  config.data.tokenizer_vocab_size = 2000

  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.width = 256
  config.model.dropout = 0.1

  config.optim.lr = 1e-3
  config.optim.min_lr = 1e-4
  config.optim.warmup_steps = 200
  config.optim.weight_decay = 0.1

  config.vae.latent_size = 32
  config.vae.injection = "both"
  config.vae.kl_schedule = "cyclical"
  config.vae.kl_cycles = 4
  config.vae.kl_ratio = 0.5
  config.vae.free_bits = 0.1
  config.vae.word_dropout = 0.0
  config.vae.iw_samples = 100
  config.vae.iw_chunk = 10

  config.sample.kind = "prior" if variant == "vae" else "continue"
  config.sample.prompt = "a gorgeous , witty , seductive movie ." if variant == "vae" else ""
  config.sample.max_tokens = 64
  config.sample.num_samples = 5
  config.sample.temperature = 1.0
  return config
