"""SST-2 with differential privacy: the from-scratch classifier of sst2_classifier.py trained with DP-SGD.

Variants (`experiments/sst2_private.py:EPSILON`): the target epsilon, e.g. `:1`, `:3`, `:8`, or `:none` for
the same run without privacy (same batch, steps and optimizer: the gap is the price of privacy alone; `:none`
draws fixed batches of 2,048).
DP-SGD (lm.train.privacy, docs/privacy.md): Poisson sampling, each of the 67,349 training sentences in each
step's batch with probability 1,867 / 67,349 (the batch padded to 2,048 rows, 64 micro-batches of 32:
per-example gradients take batch x parameters of memory), each sentence's gradient clipped to norm 25 (about
the median norm at initialization: benchmarks/privacy_clip.py shows that a clip of 1 leaves a mean gradient
that does not descend), Gaussian noise once per batch, the noise multiplier the smallest that keeps the 128
steps (3.5 expected passes) within the target epsilon at delta = 1 / 67,349 (PLD accountant of truncated
Poisson sampling, add/remove neighbours). AdamW 1e-3, no dropout or label smoothing, and a 1,000-piece
SentencePiece vocabulary (8,000 in sst2_classifier.py): each example's gradient is dense over the embedding
table, so its size sets DP-SGD's cost on a CPU.

Expected result (measured, BENCHMARKS.md, "Privacy-utility: DP-SGD on SST-2 and the Shakespeare LM"; dev /
test accuracy of the final weights): `:none` 0.749 / 0.765; `:8` (noise multiplier 0.595) 0.718 / 0.728;
`:3` (0.863) 0.695 / 0.711; `:1` (1.467) 0.675 / 0.662. Runtime on a 2-core CPU: 7 min 30 s (`:none`), 12-15 min
(private).

Command:
  python -m lm.main --config experiments/sst2_private.py:8 --workdir runs/sst2_private_eps8
  python benchmarks/privacy.py --sst2 8,none,3,1 --lm 8,none    # the study, into one table
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
    config.privacy.sampling = "poisson"  # expected batch 2,048 - 4 sqrt(2,048) = 1,867, padded to 2,048
    config.privacy.clip_norm = 25.0  # about the median example's gradient norm at initialization
    config.privacy.target_epsilon = float(variant)
  return config
