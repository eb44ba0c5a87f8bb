"""SST-2 with differential privacy: the from-scratch classifier of sst2_classifier.py trained with DP-SGD.

Variants (`experiments/sst2_private.py:EPSILON`): the target epsilon, e.g. `:1`, `:3`, `:8`, or `:none` for
the same run without privacy (same batch, steps and optimizer: the gap is the price of privacy alone).
DP-SGD (lm.train.privacy, docs/privacy.md): each sentence's gradient clipped to norm 1, Gaussian noise once
per batch of 2,048 (64 micro-batches of 32: per-example gradients take batch x parameters of memory), the noise
multiplier the smallest that keeps the run within the target epsilon at delta = 1 / 67,349 (the training
sentences), for shuffled fixed-size batches (each sentence at most once per epoch; replace-one neighbours; RDP
accountant). 4 epochs (128 steps), AdamW 1e-3, no dropout or label smoothing, and a 1,000-piece SentencePiece
vocabulary (8,000 in sst2_classifier.py): each example's gradient is dense over the embedding table, so its
size sets DP-SGD's cost on a CPU.

Expected result (measured, BENCHMARKS.md, "Privacy: DP-SGD, two first attempts"): `:none` dev 0.749, test 0.765;
`:8` (noise multiplier 2.514) does not learn: dev 0.509, test 0.499 (the majority class). The privacy-utility
figures are not measured yet: this setting is the baseline for the next attempt (SGD, Poisson sampling).
Runtime: 12 min 22 s (`:8`) and 7 min 3 s (`:none`) on a 2-core CPU.

Command:
  python -m lm.main --config experiments/sst2_private.py:8 --workdir runs/sst2_private_eps8
  python benchmarks/privacy.py --sst2 8,none --lm ""    # the two runs measured, into one table
"""

import os

from lm.config import load_config


def get_config(variant: str = "8"):
  config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sst2_classifier.py"))
  config.batch_size = 2048
  config.grad_accum_steps = 64
  config.steps = 4 * (67_349 // 2048)  # 4 epochs of the private pipeline's 32 batches
  config.eval_every = 32
  config.log_every = 8
  config.checkpoint_every = 32
  config.data.tokenizer_vocab_size = 1000
  config.model.dropout = 0.0
  config.classifier.label_smoothing = 0.0
  config.optim.lr = 1e-3
  config.optim.min_lr = 1e-4
  config.optim.warmup_steps = 10
  if variant != "none":
    config.privacy.enabled = True
    config.privacy.clip_norm = 1.0
    config.privacy.target_epsilon = float(variant)
  return config
