"""Character-level Shakespeare: nanoGPT's GPU baseline.

Source: Karpathy, nanoGPT, `config/train_shakespeare_char.py` (6 layers, 6
heads, width 384, context 256, batch 64, dropout 0.2, 5000 steps, lr 1e-3 ->
1e-4 cosine with 100 warmup steps, AdamW beta2 0.99, no biases).
Data: TFDS `tiny_shakespeare`, validation split.

Expected result: nanoGPT reports a best validation loss of 1.4697 (on its own
90/10 split of the same text; it overfits, and keeps its best checkpoint). On
one NVIDIA H200 (jax 0.11.2, 2026-12-04, `bash benchmarks/gpu_figures.sh`) the
eval loss was lowest at step 1,250, 1.411, and 1.960 at step 5,000 (train loss
0.589): the same overfitting. BENCHMARKS.md, "On one NVIDIA H200", has every
eval.
Runtime: 101 s on one H200 (12.5 ms per step); hours on a 2-core CPU.

Command:
  TFDS_DATA_DIR=../shared/tfds python -m lm.main \
      --config experiments/shakespeare_char_gpu.py --workdir runs/shakespeare_char_gpu
"""

from lm.config import base_config


def get_config():
  config = base_config()
  config.seed = 1337
  config.steps = 5000
  config.batch_size = 64
  config.seq_len = 256
  config.log_every = 50
  config.eval_every = 250
  config.checkpoint_every = 500

  config.model.variant = "gpt2"
  config.model.num_layers = 6
  config.model.num_heads = 6
  config.model.width = 384
  config.model.use_bias = False
  config.model.dropout = 0.2

  config.optim.lr = 1e-3
  config.optim.min_lr = 1e-4
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 0.1
  config.optim.b2 = 0.99
  config.optim.grad_clip = 1.0

  config.data.source = "tfds:tiny_shakespeare"
  config.data.tokenizer = "char"
  config.sample.max_tokens = 500
  config.sample.top_k = 200
  return config
