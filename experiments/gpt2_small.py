"""GPT-2 small (124M): the shape for scale-out runs and sharding benchmarks.

Source: Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners" (12 layers, 12 heads, width 768, context 1024, learned positions,
LayerNorm, tanh-GELU, biases, tied embeddings); training settings from
nanoGPT's `config/train_gpt2.py` (AdamW lr 6e-4 -> 6e-5 cosine, 2000 warmup
steps, beta2 0.95, weight decay 0.1, ~0.5M tokens per step, 600k steps; it
reaches validation loss ~2.85 on OpenWebText). The vocabulary is GPT-2's
50,257 padded to 50,304 (a multiple of 128, as nanoGPT does).

No GPT-2 BPE and no OpenWebText are available offline, so by default this
config trains bytes of tiny_shakespeare in the 50,304-entry table: the model,
optimizer and step have exactly the GPT-2-small shape, which is what the
sharding presets and memory figures are about. For a real run point
`data.source` at your corpus and use `data.tokenizer=sentencepiece` with
`data.tokenizer_vocab_size=50304` (or `data.tokenizer_model=` your model).

Expected result: not measured here (no accelerator, no OpenWebText).
Memory per device on 8 devices under each preset: BENCHMARKS.md, "Sharding
presets: memory per device" (parameters + Adam state 1.49 GB under dp,
187 MB under fsdp on 8 devices).

Command:
  # memory per device, compiled only (nothing allocated), 8 simulated devices
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m lm.main \
      --config experiments/gpt2_small.py --mode bench \
      --config.bench.compile_only=True --config.batch_size=8 --config.mesh.preset=fsdp
  # training on a TPU VM slice or GPU cluster: see README, "Multi-host training"
  python -m lm.main --config experiments/gpt2_small.py --workdir gs://BUCKET/runs/gpt2_small
"""

from lm.config import base_config


def get_config():
  config = base_config()
  config.seed = 0
  config.steps = 600_000
  config.batch_size = 480  # x 1024 tokens = 491,520 tokens per step, as nanoGPT
  config.seq_len = 1024
  config.grad_accum_steps = 1  # raise when 480 sequences do not fit the devices at once
  config.log_every = 10
  config.eval_every = 1000
  config.eval_batches = 20
  config.checkpoint_every = 1000

  config.model.variant = "gpt2"
  config.model.num_layers = 12
  config.model.num_heads = 12
  config.model.width = 768
  config.model.vocab_size = 50_304
  config.model.use_bias = True
  config.model.tie_embeddings = True
  config.model.gelu_approximate = True
  config.model.dropout = 0.0
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "float32"

  config.optim.lr = 6e-4
  config.optim.min_lr = 6e-5
  config.optim.warmup_steps = 2000
  config.optim.weight_decay = 0.1
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.grad_clip = 1.0

  config.data.source = "tfds:tiny_shakespeare"
  config.data.tokenizer = "byte"

  config.mesh.preset = "fsdp"
  return config
