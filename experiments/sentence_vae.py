"""A sentence VAE on SST-2, and the plain LM it is measured against (`--config experiments/sentence_vae.py:lm`).

Data: the sentences of SST-2 (`../shared/data/sst2/`, the `sentence` column):
train.tsv to train (67k phrases and sentences), dev.tsv to evaluate (872
sentences), one example per sentence (data.format="sentences": BOS + tokens
+ EOS, at most 63 tokens), a SentencePiece vocabulary of 2,000 pieces trained on
the training split (the same bytes for both runs, so the NLLs compare).

Backbone (both runs): 4 layers, 4 heads, width 256, learned positions, no
dropout. The VAE adds a bidirectional encoder of the same shape, z of 32
dims injected as a memory slot in every layer and added to every embedding
(Optimus), and against posterior collapse: 4 KL-annealing cycles (Fu et al.
2019), free bits 0.25 nats per dimension (Li et al. 2019) and 25 % word
dropout on the decoder's inputs (Bowman et al. 2016). The LM trains with the
same steps, batch, learning rate and data order.

Metrics (every eval, on all 872 dev sentences): the LM's NLL per sentence;
the VAE's reconstruction, KL, ELBO, the importance-weighted NLL bound with
k = 100 posterior samples, mutual information I(x; z) and active units.
Targets: KL >= 2 nats, >= 4 active units, IW NLL within 2 % of the LM's NLL.
Measured figures: BENCHMARKS.md, "Sentence VAE vs plain LM on SST-2".

Commands:
  python -m lm.main --config experiments/sentence_vae.py --workdir runs/sentence_vae
  python -m lm.main --config experiments/sentence_vae.py:lm --workdir runs/sentence_lm
  python -m lm.main --config experiments/sentence_vae.py --workdir runs/sentence_vae --mode sample \\
      --config.sample.kind=interpolate --config.sample.prompt="a gorgeous film ." \\
      --config.sample.prompt_b="the plot is a mess ."
"""

import os

from lm.config import base_config

SST2 = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "sst2"))
VARIANTS = ("vae", "lm")


def get_config(variant: str = "vae"):
  if variant not in VARIANTS:
    raise ValueError(f"experiments/sentence_vae.py:{variant}: the variant must be one of {VARIANTS}.")
  config = base_config()
  config.head = variant
  config.seed = 0
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
  config.model.dropout = 0.0

  config.optim.lr = 1e-3
  config.optim.min_lr = 1e-4
  config.optim.warmup_steps = 200
  config.optim.weight_decay = 0.1

  config.vae.latent_size = 32
  config.vae.injection = "both"
  config.vae.kl_schedule = "cyclical"
  config.vae.kl_cycles = 4
  config.vae.kl_ratio = 0.5
  config.vae.free_bits = 0.25
  config.vae.word_dropout = 0.25
  config.vae.iw_samples = 100
  config.vae.iw_chunk = 10

  config.sample.kind = "prior" if variant == "vae" else "continue"
  config.sample.prompt = "" if variant == "lm" else "a gorgeous , witty , seductive movie ."
  config.sample.max_tokens = 64
  config.sample.num_samples = 5
  config.sample.temperature = 1.0
  return config
