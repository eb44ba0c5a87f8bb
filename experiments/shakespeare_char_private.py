"""The baseline Shakespeare LM with differential privacy (DP-SGD), against the same run without it.

The model of shakespeare_char.py (4 layers, width 128, context 64), trained with DP-SGD (lm.train.privacy,
docs/privacy.md): an example is one 64-character window (data.train_stride = 64, so windows do not overlap:
15,685 of them), Poisson sampling (each window in each step's batch with probability 657 / 15,685; the batch
padded to 768 rows), each window's gradient clipped to norm 1 (the windows' gradients agree: norms 5.4-6.7,
cosine of the clipped mean with the ordinary one 0.9998, benchmarks/privacy_clip.py), Gaussian noise once per
batch, the noise multiplier the smallest that keeps the 119 steps (5 expected passes) within the target epsilon
at delta = 1 / 15,685 (PLD accountant). Batch 768, not more: the validation split holds 871 windows and
evaluation reads whole batches (the first 768 windows).

Variants (`experiments/shakespeare_char_private.py:EPSILON`): `:8` (the default), any other epsilon, or
`:none`, the same batch, steps and optimizer without privacy (fixed batches of 768).

Expected result (measured, BENCHMARKS.md, "Privacy-utility"): eval loss 2.452 at `:8` (noise multiplier 0.634)
against 2.263 at `:none`; 7 min 46 s and 5 min 0 s on a 2-core CPU.

Command:
  python -m lm.main --config experiments/shakespeare_char_private.py:8 --workdir runs/shakespeare_private
  python benchmarks/privacy.py --sst2 "" --lm 8,none
"""

import os

from lm.config import load_config


def get_config(variant: str = "8"):
  config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_char.py"))
  config.batch_size = 768  # the eval split has 871 windows: evaluation reads the first 768 (one batch)
  config.grad_accum_steps = 6  # per-example gradients of 128 windows at a time
  config.data.train_stride = config.seq_len
  config.steps = 119  # 5 expected passes of Poisson batches of 657 over the 15,685 windows
  config.eval_every = 30
  config.log_every = 10
  config.checkpoint_every = 30
  config.optim.lr = 3e-3
  config.optim.min_lr = 3e-4
  config.optim.warmup_steps = 10
  if variant != "none":
    config.privacy.enabled = True
    config.privacy.sampling = "poisson"  # expected batch 768 - 4 sqrt(768) = 657, padded to 768
    config.privacy.clip_norm = 1.0
    config.privacy.target_epsilon = float(variant)
  return config
