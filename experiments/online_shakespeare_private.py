"""Online learning with differential privacy: experiments/online_shakespeare.py's stream, trained with DP-SGD.

The byte-level Shakespeare model keeps learning from SST-2's sentences in 5 chunks (online_shakespeare.py),
every chunk trained with DP-SGD (lm.online.privacy, docs/privacy.md): an example is one 64-byte window of a
chunk, cut without overlap; each batch of 64 rows draws its 48 new rows by Poisson sampling of the chunk's
windows and its 16 replay rows of the replay buffer's (36 and 12 expected: privacy.expected_batch_size = 48),
each window's gradient clipped to norm 1, Gaussian noise of multiplier 1.0 once per batch. The run's epsilon
(delta 1e-6) is the largest over its classes of examples (each chunk's windows: new in their chunk, replayed
after; the pretraining windows: replayed in every chunk), composed by dp_accounting's PLD accountant, reported
after every chunk and saved in the checkpoint. The batch is larger than online_shakespeare.py's 12: noise of
the clip's size on a sum of 12 would drown it.

Variants (`experiments/online_shakespeare_private.py:NOISE`): `:1.0` (the default), any other noise multiplier,
or `:none`, the same batch, steps and optimizer without privacy (online_shakespeare.py's batches: windows at
every offset, 16 replay rows).

Expected result: measured in BENCHMARKS.md, "Privacy in the online loop".

Command:
  TFDS_DATA_DIR=../shared/tfds python -m lm.main --config experiments/shakespeare_byte.py --workdir runs/shakespeare_byte
  TFDS_DATA_DIR=../shared/tfds python -m lm.main --config experiments/online_shakespeare_private.py \
      --workdir runs/online_shakespeare_private --mode online
"""

import os

from lm.config import load_config


def get_config(variant: str = "1.0"):
  config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "online_shakespeare.py"))
  config.batch_size = 64
  config.optim.lr = 1e-3  # a larger batch, and (private) a noisy gradient: online_shakespeare.py's 3e-4 x ~3
  config.optim.min_lr = 1e-4
  if variant != "none":
    config.privacy.enabled = True
    config.privacy.sampling = "poisson"
    config.privacy.expected_batch_size = 48.0
    config.privacy.clip_norm = 1.0
    config.privacy.noise_multiplier = float(variant)
    config.privacy.delta = 1e-6  # below 1 / the ~70,000 windows of the stream and the pretraining data
  return config
