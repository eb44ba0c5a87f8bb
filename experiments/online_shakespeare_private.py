"""Online learning with differential privacy: experiments/online_shakespeare.py's stream, trained with DP-SGD.

The byte-level Shakespeare model keeps learning from SST-2's sentences in 5 chunks (online_shakespeare.py),
every chunk trained with DP-SGD (lm.online.privacy, docs/privacy.md): an example is one 64-byte window of a
chunk, cut without overlap; each batch of 256 rows draws its 192 new rows by Poisson sampling of the chunk's
windows and its 64 replay rows of the replay buffer's (144 and 48 expected: privacy.expected_batch_size
defaults to 256 - 4 sqrt(256) = 192), each window's gradient clipped to norm 1, Gaussian noise of multiplier
2.0 once per batch, 75 steps per chunk (the rows online_shakespeare.py's 300 steps of 48 new rows see). The
run's epsilon (delta 1e-6) is the largest over its classes of examples (each chunk's windows: new in their
chunk, replayed after; the pretraining windows: replayed in every chunk), composed by dp_accounting's PLD
accountant, reported after every chunk and saved in the checkpoint.

Variants (`experiments/online_shakespeare_private.py:NOISE`): `:2.0` (the default), any other noise
multiplier, or `:none`, the same batch, steps and optimizer without privacy (online_shakespeare.py's batches:
windows at every offset, 64 replay rows).

Expected result (measured; BENCHMARKS.md, "Privacy in the online loop"; 2-core AMD EPYC):

  | run (5 chunks x 75 steps, batch 256) | epsilon | tiny_shakespeare final loss | SST-2 final loss |
  | `:2.0` (this config)                 | 0.915   | 1.9339                      | 2.3949           |
  | `:none`                              | -       | 1.9203                      | 1.7605           |

Runtime: 16 min 25 s (`:2.0`), 7 min 10 s (`:none`), after the 2-minute pretraining.

Command:
  TFDS_DATA_DIR=../shared/tfds python -m lm.main --config experiments/shakespeare_byte.py --workdir runs/shakespeare_byte
  TFDS_DATA_DIR=../shared/tfds python -m lm.main --config experiments/online_shakespeare_private.py \
      --workdir runs/online_shakespeare_private --mode online
"""

import os

from lm.config import load_config


def get_config(variant: str = "2.0"):
  config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "online_shakespeare.py"))
  config.batch_size = 256  # DP-SGD's noise is on a sum: a larger batch, fewer steps (the same rows per chunk)
  config.online.steps_per_chunk = 75  # 75 x 192 expected rows = online_shakespeare.py's 300 x 48 (at batch 64)
  config.optim.lr = 3e-4
  config.optim.min_lr = 3e-5
  config.optim.warmup_steps = 8
  config.log_every = 5
  if variant != "none":
    config.privacy.enabled = True
    config.privacy.sampling = "poisson"  # expected batch 256 - 4 sqrt(256) = 192: 144 new rows, 48 replayed
    config.privacy.clip_norm = 1.0
    config.privacy.noise_multiplier = float(variant)
    config.privacy.delta = 1e-6  # below 1 / the ~60,000 windows of the stream and the pretraining data
  return config
