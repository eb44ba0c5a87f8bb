"""A denoising sentence LM on SST-2 (`head="denoise"`) and the plain LM it is the control of (`:lm`).

What it measures: how much NLL word dropout alone costs a language model.
The sentence VAE (experiments/sentence_vae.py) lost about 5 nats of IW NLL
per sentence with vae.word_dropout=0.25; the same corruption without a latent
variable says how much of that is the dropout's, not the VAE's.
Data: the sentences of SST-2 (`../shared/data/sst2/`): train.tsv to train,
dev.tsv (872 sentences) to evaluate, one example per sentence, BOS + tokens +
EOS in at most 64 positions, a 2,000-piece SentencePiece vocabulary trained on
the training split (the same file for both runs, so their NLLs compare).
Model (both): 2 layers, 4 heads, width 128, dropout 0; 1,000 steps of batch
64, AdamW 1e-3 with cosine decay to 1e-4. The denoising LM replaces each
input token by <mask> with probability denoise.rate = 0.25 (per row; BOS
kept) and predicts the clean sentence; both are evaluated on clean inputs.
Expected result (2-core AMD EPYC CPU, dev, at step 1,000; the three commands below):
  plain LM (:lm)   NLL 152.45 nats per sentence (eval/loss 4.5216 per token)
  denoising LM     NLL 155.48 nats per sentence (eval/loss 4.6114 per token): +3.0 nats, +2.0 %
  A/B (--mode ab, 872 sentences, each sentence's mean token loss): B - A = +0.092 nats
  [0.086, 0.098], p < 0.002 (none of 1,000 paired resamples), relative change +2.1 %.
So word dropout at 0.25 costs a plain LM of this size about 3 nats per sentence here; the VAE's 5
(a larger model, a longer run) includes it.
Runtime: 6.5 to 7 minutes each on the 2-core CPU.
Command:
  python -m lm.main --config experiments/sentence_denoise.py:lm --workdir runs/sentence_denoise_lm
  python -m lm.main --config experiments/sentence_denoise.py --workdir runs/sentence_denoise \\
      --config.data.tokenizer_model=runs/sentence_denoise_lm/tokenizer/spm.model
  python -m lm.main --config experiments/sentence_denoise.py --workdir runs/sentence_denoise_ab --mode ab \\
      --config.ab.a=runs/sentence_denoise_lm --config.ab.b=runs/sentence_denoise
"""

import os

from lm.config import base_config

SST2 = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "sst2"))
VARIANTS = ("denoise", "lm")


def get_config(variant: str = "denoise"):
  if variant not in VARIANTS:
    raise ValueError(f"experiments/sentence_denoise.py:{variant}: the variant must be one of {VARIANTS}.")
  config = base_config()
  config.head = variant
  config.steps = 1000
  config.batch_size = 64
  config.seq_len = 64
  config.log_every = 50
  config.eval_every = 250
  config.eval_batches = 0  # every dev sentence
  config.checkpoint_every = 250
  config.data.source = SST2
  config.data.text_field = "sentence"
  config.data.train_split = "train"
  config.data.eval_split = "dev"
  config.data.format = "sentences"
  config.data.tokenizer = "sentencepiece"
  config.data.tokenizer_vocab_size = 2000
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.width = 128
  config.model.dropout = 0.0
  config.optim.lr = 1e-3
  config.optim.min_lr = 1e-4
  config.optim.warmup_steps = 100
  config.denoise.rate = 0.25
  config.sample.prompt = ""
  config.sample.max_tokens = 64
  config.sample.temperature = 1.0
  return config
