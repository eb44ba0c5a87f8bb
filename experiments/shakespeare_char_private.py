"""The baseline Shakespeare LM with differential privacy (DP-SGD), against the same run without it.

The model of shakespeare_char.py (4 layers, width 128, context 64), trained with DP-SGD (lm.train.privacy,
docs/privacy.md): an example is one 64-character window (data.train_stride = 64, so windows do not overlap:
15,685 of them), each window's gradient clipped to norm 1, Gaussian noise once per batch of 128, the noise
multiplier the smallest that keeps 610 steps (5 epochs of the private pipeline's 122 batches) within the
target epsilon at delta = 1 / 15,685, for shuffled fixed-size batches (replace-one neighbours, RDP accountant).
A larger batch than the baseline's 12: the noise on the mean gradient is noise_multiplier / batch.

Variants (`experiments/shakespeare_char_private.py:EPSILON`): `:8` (the default), any other epsilon, or
`:none`, the same batch, steps and optimizer without privacy.

Expected result: not measured yet. At epsilon 8 the accountant asks for a noise multiplier of 2.654 (610 steps,
delta 1 / 15,685), i.e. noise of norm ~9 on the mean gradient of this ~0.2M-parameter model against a clipped
signal of norm <= 1: expect little learning at batch 128 (the SST-2 attempt in BENCHMARKS.md, "Privacy: DP-SGD,
a first attempt", did not learn at that ratio); a larger batch is the next step.

Command:
  python -m lm.main --config experiments/shakespeare_char_private.py:8 --workdir runs/shakespeare_private
"""

import os

from lm.config import load_config


def get_config(variant: str = "8"):
  config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_char.py"))
  config.batch_size = 128
  config.data.train_stride = config.seq_len
  config.steps = 5 * (15_685 // 128)  # 5 epochs of 122 batches
  config.eval_every = 122
  config.checkpoint_every = 122
  config.optim.lr = 3e-3
  config.optim.min_lr = 3e-4
  config.optim.warmup_steps = 30
  if variant != "none":
    config.privacy.enabled = True
    config.privacy.clip_norm = 1.0
    config.privacy.target_epsilon = float(variant)
  return config
