"""SST-2 with differential privacy: the from-scratch classifier of sst2_classifier.py trained with DP-SGD.

Variants (`experiments/sst2_private.py:EPSILON`): the target epsilon, e.g. `:1`, `:3`, `:8`, or `:none` for
the same run without privacy (same batch, steps and optimizer: the gap is the price of privacy alone).
DP-SGD (lm.train.privacy, docs/privacy.md): each sentence's gradient clipped to norm 1, Gaussian noise once
per batch of 256 (8 micro-batches of 32: per-example gradients take batch x parameters of memory), the noise
multiplier the smallest that keeps the run within the target epsilon at delta = 1 / 67,349 (the training
sentences), for shuffled fixed-size batches (each sentence at most once per epoch; replace-one neighbours; RDP
accountant). 2 epochs (526 steps), a larger learning rate than the non-private config (DP-SGD's noisy steps are
small), no dropout or label smoothing, and a 1,000-piece SentencePiece vocabulary (8,000 in sst2_classifier.py):
each example's gradient is dense over the embedding table, so its size sets DP-SGD's cost on a CPU.

Expected result: not measured yet. The first attempt (`:8`, noise multiplier 1.778 for 526 steps) did not
learn: through step 200 its training accuracy stayed at 0.53-0.55 and its loss above ln 2, because the noise
on the mean gradient (norm 1.778 x sqrt(~534k parameters) / 256 = 5.1) swamps the clipped signal (norm <= 1);
BENCHMARKS.md, "Privacy: DP-SGD, a first attempt". A batch of thousands (gradient accumulation) or far fewer
parameters is the next step.
Runtime: about 1.5 s per step (256 per-example gradients) on a 2-core CPU shared with other jobs.

Command:
  python -m lm.main --config experiments/sst2_private.py:8 --workdir runs/sst2_private_eps8
  python benchmarks/privacy.py     # every variant, and the Shakespeare LM at epsilon 8, into one table
"""

import os

from lm.config import load_config


def get_config(variant: str = "8"):
  config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sst2_classifier.py"))
  config.batch_size = 256
  config.grad_accum_steps = 8
  config.steps = 2 * (67_349 // 256)  # 2 epochs of the private pipeline's 263 batches
  config.eval_every = 263
  config.log_every = 25
  config.checkpoint_every = 263
  config.data.tokenizer_vocab_size = 1000
  config.model.dropout = 0.0
  config.classifier.label_smoothing = 0.0
  config.optim.lr = 3e-3
  config.optim.min_lr = 3e-4
  config.optim.warmup_steps = 25
  if variant != "none":
    config.privacy.enabled = True
    config.privacy.clip_norm = 1.0
    config.privacy.target_epsilon = float(variant)
  return config
