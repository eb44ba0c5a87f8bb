"""Experiment configuration: the base schema, loading, and validation.

Every experiment in `experiments/` starts from `base_config()` and changes
what it needs, so all configs share one schema: a key that is not in the
schema is a typo and is rejected (ConfigDicts are locked), and `validate`
checks values before a run touches its workdir.

Start modes (GUIDE.md), chosen by these fields:
  * resume (`resume=True`, the default): if the workdir already holds
    checkpoints, continue from the latest one exactly: train state and data
    iterator.
  * warm-start (`warm_start=PATH`): weights *and* optimizer state (and the
    step count) from another run's checkpoint, with this run's data.
  * init-from (`init_from=PATH`): weights only; fresh optimizer, step 0.
A workdir's own checkpoint always wins over warm_start/init_from, so a
restarted warm-started run resumes instead of starting over.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import ml_collections
from ml_collections.config_dict import placeholder

from lm.core.errors import ConfigError
from lm.models.config import CHOICES as MODEL_CHOICES

MODES = ("train", "online", "eval", "sample", "bench", "crossval", "ab", "export")
TOKENIZERS = ("char", "byte", "sentencepiece")
HEADS = ("lm", "vae", "gan", "classifier")
DATA_FORMATS = ("windows", "sentences")
SAMPLE_KINDS = ("continue", "prior", "reconstruct", "interpolate")


def default_rules() -> tuple[tuple[str, Any], ...]:
  """Logical axis -> mesh axes. Data parallel over data+fsdp; FSDP shards `embed`
  of every parameter; tensor parallel splits heads, MLP hidden units and vocab."""
  return (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      ("kv", None),
      ("length", None),
      ("layers", None),
      ("latent", None),  # a VAE's latent vector: small, replicated
      ("classes", None),  # a classifier's output layer: small, replicated
  )


def base_config() -> ml_collections.ConfigDict:
  """Every field `lm` reads, with its default. Experiments override some of them."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.steps = 1000
  config.batch_size = 32  # global, over all processes and devices
  config.seq_len = 128
  config.grad_accum_steps = 1
  config.log_every = 50
  config.eval_every = 500
  config.eval_batches = 0  # 0: the whole eval split (non-overlapping windows)
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  config.keep_best = 1
  config.async_checkpointing = True
  # Start modes (see the module docstring).
  config.resume = True
  config.warm_start = ""
  config.init_from = ""
  # What is trained on the Transformer (lm.heads): "lm" (the plain language model), "vae" (a sentence
  # VAE: config.vae) or "gan" (a text GAN: config.gan). "vae" and "gan" need data.format="sentences".
  config.head = "lm"

  config.model = ml_collections.ConfigDict()
  config.model.variant = "gpt2"  # gpt2 | llama: sets the defaults of the placeholders below
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.num_kv_heads = placeholder(int)
  config.model.width = 128
  config.model.mlp_dim = placeholder(int)
  config.model.vocab_size = placeholder(int)  # None: the tokenizer's size
  config.model.vocab_multiple = 1  # pad the vocabulary to a multiple of this (128 on accelerators)
  config.model.max_len = placeholder(int)  # None: seq_len
  config.model.position = placeholder(str)  # learned | rope
  config.model.norm = placeholder(str)  # layernorm | rmsnorm
  config.model.mlp = placeholder(str)  # gelu | swiglu
  config.model.use_bias = placeholder(bool)
  config.model.tie_embeddings = placeholder(bool)
  config.model.dropout = 0.0
  config.model.gelu_approximate = False  # True: GPT-2's tanh approximation of GELU
  config.model.norm_eps = 1e-5  # LayerNorm / RMSNorm epsilon (Llama checkpoints use 1e-5 or 1e-6)
  config.model.rope_theta = 10_000.0  # RoPE base frequency (Llama 3: 500000)
  config.model.dtype = "float32"  # computation dtype: bfloat16 on accelerators
  config.model.param_dtype = "float32"  # master weights
  # xla | cudnn (flash attention, NVIDIA GPUs; falls back to xla with a warning saying why) |
  # auto (cudnn where it can run, else xla, silently)
  config.model.attention_impl = "xla"
  # none | minimal | nothing_saveable (= full) | dots_with_no_batch_dims_saveable | dots_saveable |
  # qkv_proj | everything_saveable: what the backward keeps of each block (lm.models.transformer)
  config.model.remat_policy = "none"
  config.model.scan_layers = False  # nn.scan over the layers: one compiled block, stacked weights
  # auto | fused | logits: the LM loss without the full-vocabulary float32 logits (lm.models.fused_loss)
  # when they would take >= fused_loss_min_mb per device (auto), always (fused) or never (logits).
  config.model.loss_impl = "auto"
  config.model.loss_chunk_len = 128  # positions per chunk of the fused loss
  config.model.fused_loss_min_mb = 256.0

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100
  config.optim.min_lr = 1e-4
  config.optim.decay_steps = placeholder(int)  # None: steps
  config.optim.schedule = "cosine"  # cosine | linear | constant
  config.optim.weight_decay = 0.1
  config.optim.decay_embeddings = True  # weight decay on the token/position tables too (nanoGPT: yes)
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.eps = 1e-8
  config.optim.grad_clip = 1.0

  config.data = ml_collections.ConfigDict()
  config.data.source = "tfds:tiny_shakespeare"  # tfds:NAME[:SPLIT] or a .txt/.jsonl/.tsv file or folder
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.text_field = "text"
  # head="classifier": the .tsv column / .jsonl field / TFDS feature holding each example's label.
  config.data.label_field = "label"
  # windows: documents joined into one token stream, cut into seq_len windows (the LM's default);
  # sentences: one record = one example, BOS + tokens + EOS padded to seq_len (lm.data.sentences).
  config.data.format = "windows"
  config.data.tokenizer = "char"  # char | byte | sentencepiece
  config.data.tokenizer_vocab_size = 8000  # sentencepiece only
  config.data.tokenizer_model = ""  # a SentencePiece .model file; empty: train one on the train split
  # data.source="synthetic" (lm.data.synthetic): uniform random ids, for throughput runs.
  config.data.synthetic_vocab_size = 50_257  # GPT-2's vocabulary
  config.data.synthetic_tokens = 1 << 22  # ids per split
  config.data.cache_dir = ""  # where local corpora are prepared as TFDS datasets; empty: ~/.cache/lm/tfds
  config.data.train_stride = 1  # training windows start every `train_stride` tokens
  config.data.clean_train = False  # True: clean the training split with config.clean (dedup, filters) first
  config.data.prefetch = 4
  config.data.threads = 1

  config.mesh = ml_collections.ConfigDict()
  # dp | fsdp | fsdp_tp: sets the sizes and rules below (lm.train.sharding.PRESETS);
  # empty: use them as set. fsdp_tp takes its tensor size from mesh.tensor (2 if 1).
  config.mesh.preset = ""
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  config.mesh.rules = default_rules()

  # Text cleaning (lm.data.clean): every online chunk, and the training split when data.clean_train.
  config.clean = ml_collections.ConfigDict()
  config.clean.normalization = "NFC"  # NFC | NFKC | none
  config.clean.min_chars = 1
  config.clean.max_chars = 0  # 0: no limit
  config.clean.exact_dedup = True
  config.clean.near_dup_threshold = 0.8  # MinHash estimate of the Jaccard similarity of 5-gram sets; 0: off
  config.clean.shingle_size = 5
  config.clean.num_perm = 64
  config.clean.bands = 16

  # --mode online (lm.online.loop): keep training a model on newly streamed data.
  # The online phase's learning rate is optim.lr / min_lr / warmup_steps, per chunk.
  config.online = ml_collections.ConfigDict()
  config.online.stream = ""  # dir:PATH (a watched folder) | tfds:NAME[:SPLIT] | a .txt/.jsonl/.tsv file or folder
  config.online.domain = ""  # the stream's domain name; empty: from the stream (folder or dataset name)
  config.online.split = "train"  # the split of a fixed corpus to stream
  config.online.chunks = 5  # a fixed corpus is cut into this many ordered chunks
  config.online.max_chunks = 0  # stop after this many chunks in this run (0: when the stream ends, or never)
  config.online.steps_per_chunk = 200
  config.online.epochs_per_chunk = 0.0  # > 0: the budget is this many passes over a chunk's tokens instead
  config.online.init_from = ""  # workdir (or checkpoints folder) of the model to start from
  config.online.pretrain_domain = ""  # name of that model's data (held out: data.source's eval split); empty: derived
  config.online.heldout_fraction = 0.05  # of each chunk's documents, held out by a hash of their text
  config.online.heldout_max_windows = 256  # per domain, evaluated after every chunk
  config.online.replay_fraction = 0.0  # of every batch, drawn from the replay buffer of past sequences
  config.online.replay_capacity = 4096  # windows kept per domain (reservoir sampling)
  config.online.lr_schedule = "rewarm"  # rewarm: warmup + cosine decay every chunk | constant: warm up once
  config.online.l2_init = 0.0  # weight of the pull toward the weights before the chunk
  config.online.ewc = 0.0  # weight of EWC (diagonal Fisher on replay data, normalized to mean 1)
  config.online.ewc_batches = 8
  config.online.distill = 0.0  # weight of distillation toward the previous model on replay rows (LwF)
  config.online.distill_temperature = 1.0
  config.online.checkpoint_every = 100  # steps within a chunk (0: only at chunk ends)
  config.online.poll_interval = 2.0  # seconds between looks at a watched folder
  config.online.idle_timeout = 0.0  # stop after this many seconds without a new chunk (0: wait forever)
  config.online.settle_seconds = 2.0  # a file is complete once its size and mtime held this long
  config.online.gate = ml_collections.ConfigDict()
  config.online.gate.max_regression = 0.02  # relative loss increase allowed on any old domain
  config.online.gate.confidence = 0.95
  config.online.gate.bootstrap_samples = 1000

  # head="vae" (lm.heads.vae, lm.models.vae): a sentence VAE on the Transformer backbone.
  config.vae = ml_collections.ConfigDict()
  config.vae.latent_size = 32
  config.vae.injection = "both"  # memory | embedding | both (Li et al. 2020)
  config.vae.pooling = "mean"  # mean | first
  config.vae.encoder_layers = placeholder(int)  # None: model.num_layers
  config.vae.kl_schedule = "cyclical"  # constant | linear | cyclical (Fu et al. 2019)
  config.vae.kl_warmup_steps = 1000  # linear: steps for beta to rise from 0 to 1
  config.vae.kl_cycles = 4  # cyclical: number of cycles over the run
  config.vae.kl_ratio = 0.5  # cyclical: fraction of each cycle spent rising
  config.vae.ae_steps = 0  # autoencoder warm start: beta = 0 for these first steps
  config.vae.free_bits = 0.0  # per-dimension KL floor in nats (0: off)
  config.vae.word_dropout = 0.0  # rate of decoder input tokens replaced by <mask> (Bowman et al. 2016)
  config.vae.iw_samples = 100  # k of the importance-weighted NLL bound, every eval
  config.vae.iw_chunk = 10  # posterior samples decoded together (memory vs speed of the IW bound)

  # head="gan" (lm.heads.gan, lm.models.gan): a text GAN on the same backbone, started with
  # config.init_from from an MLE-trained model: a head="vae" run for "latent", a head="lm" run for "relgan".
  config.gan = ml_collections.ConfigDict()
  config.gan.kind = "relgan"  # latent: ARAE-style WGAN-GP in the VAE's latent space | relgan: Gumbel-softmax LM
  config.gan.lr = 1e-4  # Adam for the generator and the critic/discriminator (b1 0.5, b2 0.9: WGAN-GP's)
  config.gan.critic_steps = 5  # critic/discriminator updates per generator update
  config.gan.noise_size = 64  # latent: generator input size
  config.gan.hidden_size = 256  # latent: generator and critic MLP width
  config.gan.mlp_layers = 2  # latent: hidden layers of each
  config.gan.gp_weight = 10.0  # latent: WGAN-GP gradient penalty weight (Gulrajani et al. 2017)
  config.gan.discriminator_layers = 2  # relgan: the Transformer discriminator's depth
  config.gan.discriminator_width = 64  # relgan: its width (heads: model.num_heads)
  config.gan.max_temperature = 100.0  # relgan: Gumbel-softmax temperature annealed from 1 to this
  config.gan.temperature_schedule = "exponential"  # exponential | linear | constant (Nie et al. 2019)
  config.gan.mle_weight = 0.0  # relgan: weight of the MLE loss kept beside the adversarial one
  config.gan.eval_samples = 500  # sentences generated per point of the quality-diversity report
  config.gan.temperatures = (0.5, 0.7, 0.85, 1.0, 1.2)  # the MLE model's sweep in that report
  config.gan.baseline = ""  # head="lm" workdir whose temperature sweep is the MLE curve; empty: relgan's init_from
  config.gan.judge = ""  # workdir of a separately trained head="lm" model: NLL of the samples under it

  # head="classifier" (lm.heads.classifier, lm.models.classifier): a sequence classifier on the Transformer,
  # trained from scratch or from a head="lm" run on sentences (config.init_from), on data.label_field.
  config.classifier = ml_collections.ConfigDict()
  config.classifier.labels = ()  # the class labels as written in the data, in class order; empty: the
  #                                training split's distinct labels, sorted (numerically when all are integers)
  config.classifier.pooling = "mean"  # mean | max (over the sentence's tokens) | last (the EOS position)
  config.classifier.attention = "causal"  # causal (as the LM) | bidirectional (every token reads the sentence)
  config.classifier.label_smoothing = 0.0
  config.classifier.token_dropout = 0.0  # rate of sentence tokens replaced by <mask> in training (augmentation)
  config.classifier.class_weights = ""  # "": none | "balanced" (inverse class frequency) | "w0,w1,..."
  config.classifier.test_split = "test"  # evaluated once after training with the best-on-dev weights; "": none

  # --mode eval / --mode crossval (lm.run_modes).
  config.eval = ml_collections.ConfigDict()
  config.eval.source = ""  # evaluate on this source (tfds:NAME[:SPLIT] or a local path); empty: data.source
  config.eval.split = ""  # and this split of it; empty: data.eval_split
  config.eval.stride = 0  # sliding window: windows start every `stride` tokens and score only their new
  #                         tokens, each with >= seq_len - stride tokens of context; 0: non-overlapping windows
  config.eval.folds = 5  # --mode crossval: K stratified folds of the training split

  # --mode ab (lm.stats.ab): two runs evaluated on the same examples, difference with a paired bootstrap.
  config.ab = ml_collections.ConfigDict()
  config.ab.a = ""  # workdir or checkpoints folder of model A (the baseline)
  config.ab.b = ""  # of model B (the candidate); B - A is reported
  config.ab.confidence = 0.95  # two-sided interval level
  config.ab.bootstrap_samples = 1000
  config.ab.seed = 0

  # --mode export (lm.interop): write the run's latest weights as a Hugging Face directory.
  config.export = ml_collections.ConfigDict()
  config.export.dir = ""  # where to write config.json + model.safetensors (must not exist or be empty)
  config.export.max_shard_size = 0  # bytes per .safetensors shard (0: one file)

  # Multi-process runs (lm.distributed): explicit settings, or JAX_COORDINATOR_ADDRESS,
  # JAX_NUM_PROCESSES and JAX_PROCESS_ID in the environment (lm.launch_local sets them).
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ""  # HOST:PORT of process 0; empty: environment or auto
  config.distributed.num_processes = placeholder(int)
  config.distributed.process_id = placeholder(int)
  config.distributed.auto = True  # detect Cloud TPU VMs, SLURM steps and Open MPI jobs
  config.distributed.initialization_timeout = 300  # seconds for all processes to reach the coordinator
  config.distributed.heartbeat_timeout = 100  # seconds after which a silent process counts as dead

  # XLA options for the jitted train/eval steps when the devices are CPUs; one
  # set in XLA_FLAGS wins. YNNPACK runs the matmuls only: its reduction kernels
  # (on by default in jaxlib 0.10) ran the attention softmax's gradient ~4x
  # slower than XLA's own loops (BENCHMARKS.md, "CPU: train step vs PyTorch eager").
  config.xla_cpu_options = ml_collections.ConfigDict()
  config.xla_cpu_options.xla_cpu_experimental_ynn_fusion_type = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"

  # XLA flag presets (lm.xla_flags), set in XLA_FLAGS / LIBTPU_INIT_ARGS by `lm.main` before JAX starts.
  # A flag already in those environment variables wins over both fields.
  config.xla = ml_collections.ConfigDict()
  config.xla.preset = "auto"  # auto | gpu | tpu | none; auto: gpu on an NVIDIA GPU, tpu on a TPU VM, else none
  config.xla.flags = ""  # extra "--name=value --name2=value2" flags; one of the preset's name replaces it

  config.sample = ml_collections.ConfigDict()
  # continue: continue sample.prompt (LM); with a VAE: prior (z ~ N(0, I)), reconstruct (sample.prompt),
  # interpolate (from sample.prompt to sample.prompt_b in sample.interpolation_steps points).
  config.sample.kind = "continue"
  config.sample.prompt = "\n"
  config.sample.prompt_b = ""
  config.sample.interpolation_steps = 5
  config.sample.max_tokens = 256
  config.sample.temperature = 0.8
  config.sample.top_k = 0  # 0: off
  config.sample.top_p = 1.0  # 1.0: off
  config.sample.num_samples = 1
  config.sample.seed = 0
  config.sample.beam_size = 1  # > 1: beam search (deterministic; temperature/top-k/top-p unused)
  config.sample.length_penalty = 0.6  # beam search: GNMT's alpha (0: raw log-probability)
  config.sample.stop = ()  # strings that end a sample (cut before them), e.g. ("\n\n",)
  config.sample.prompts_file = ""  # one prompt per line (.txt) or per {"prompt": ...} line (.jsonl)

  config.bench = ml_collections.ConfigDict()
  config.bench.steps = 50
  config.bench.warmup_steps = 5
  config.bench.peak_flops_per_device = placeholder(float)  # None: from the device table in lm.train.perf
  config.bench.compile_only = False  # True: memory per device from the compiled step, no timing
  config.bench.decode = True  # also time greedy sampling with the KV cache (head="lm")
  config.bench.decode_batches = (8,)  # one figure per batch size, e.g. (1, 64)
  config.bench.decode_tokens = 64  # new tokens per row, after a prompt that fills the rest of the context
  config.bench.decode_uncached = True  # and recomputing the prefix without the cache (at the first batch size)
  return config


def load_config(path: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Loads `experiments/NAME.py`'s get_config() and applies dotted overrides.

  For notebooks: `load_config("experiments/shakespeare_char.py", {"steps": 300})`.
  `PATH:ARG` calls get_config(ARG), as `--config PATH:ARG` does on the command
  line (e.g. experiments/sentence_vae.py:lm for that experiment's plain LM).
  """
  argument = None
  if not os.path.exists(path) and ":" in path:
    path, argument = path.rsplit(":", 1)
  if not os.path.exists(path):
    raise ConfigError(f"Config file {path!r} does not exist; pick one from experiments/.")
  spec = importlib.util.spec_from_file_location("lm_experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # type: ignore[union-attr]
  config = module.get_config() if argument is None else module.get_config(argument)
  return apply_overrides(config, overrides or {})


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys ("optim.lr") on a copy of `config`; unknown keys raise ConfigError."""
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy with the same schema
  for dotted, value in overrides.items():
    parent, _, leaf = dotted.rpartition(".")
    node = config
    for part in parent.split(".") if parent else []:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ConfigError(unknown_key_message(dotted, node))
      node = node[part]
    if leaf not in node:
      raise ConfigError(unknown_key_message(dotted, node))
    node[leaf] = value
  config.lock()
  return config


def unknown_key_message(dotted: str, node: ml_collections.ConfigDict) -> str:
  known = ", ".join(sorted(node.keys()))
  return f"Unknown config key {dotted!r}. Keys at that level: {known}. Check the spelling."


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, mode: str = "train") -> None:
  """Checks values before anything runs; raises ConfigError naming the field and the fix."""
  _require(mode in MODES, f"--mode={mode!r} is not one of {MODES}.")
  for key in ("steps", "batch_size", "seq_len", "grad_accum_steps", "log_every", "eval_every",
              "checkpoint_every", "keep_checkpoints"):
    _require(int(config[key]) > 0, f"config.{key} must be a positive integer (got {config[key]!r}).")
  _require(config.batch_size % config.grad_accum_steps == 0,
           f"config.batch_size={config.batch_size} must be divisible by "
           f"config.grad_accum_steps={config.grad_accum_steps}.")
  _require(not (config.warm_start and config.init_from),
           "Set at most one of config.warm_start (weights + optimizer) and config.init_from (weights only).")
  model = config.model
  for key in ("num_layers", "num_heads", "width"):
    _require(int(model[key]) > 0, f"config.model.{key} must be a positive integer (got {model[key]!r}).")
  for key, allowed in MODEL_CHOICES.items():
    value = model.get(key)
    _require(value is None or value in allowed, f"config.model.{key}={value!r} is not one of {allowed}.")
  _require(model.width % model.num_heads == 0,
           f"config.model.width={model.width} must be divisible by config.model.num_heads={model.num_heads}.")
  if model.num_kv_heads:
    _require(model.num_heads % model.num_kv_heads == 0,
             f"config.model.num_heads={model.num_heads} must be a multiple of "
             f"config.model.num_kv_heads={model.num_kv_heads}.")
  _require(0.0 <= model.dropout < 1.0, f"config.model.dropout must be in [0, 1) (got {model.dropout}).")
  _require(model.vocab_multiple >= 1, "config.model.vocab_multiple must be >= 1.")
  _require(int(model.loss_chunk_len) >= 1,
           f"config.model.loss_chunk_len must be >= 1 positions (got {model.loss_chunk_len}).")
  _require(float(model.fused_loss_min_mb) >= 0,
           f"config.model.fused_loss_min_mb must be >= 0 MB (got {model.fused_loss_min_mb}).")
  if model.max_len is not None:
    _require(model.max_len >= config.seq_len,
             f"config.model.max_len={model.max_len} is shorter than config.seq_len={config.seq_len}.")
  optim = config.optim
  _require(optim.lr > 0, f"config.optim.lr must be > 0 (got {optim.lr}).")
  _require(0 <= optim.min_lr <= optim.lr,
           f"config.optim.min_lr={optim.min_lr} must be between 0 and config.optim.lr={optim.lr}.")
  _require(optim.warmup_steps >= 0, "config.optim.warmup_steps must be >= 0.")
  _require(optim.schedule in ("cosine", "linear", "constant"),
           f"config.optim.schedule={optim.schedule!r} is not one of ('cosine', 'linear', 'constant').")
  for key in ("b1", "b2"):
    _require(0 <= optim[key] < 1, f"config.optim.{key} must be in [0, 1) (got {optim[key]}).")
  _require(optim.weight_decay >= 0 and optim.grad_clip >= 0,
           "config.optim.weight_decay and config.optim.grad_clip must be >= 0.")
  _require(config.head in HEADS, f"config.head={config.head!r} is not one of {HEADS}: 'lm' trains the language "
           "model, 'vae' a sentence VAE (config.vae), 'gan' a text GAN (config.gan).")
  _require(config.data.format in DATA_FORMATS,
           f"config.data.format={config.data.format!r} is not one of {DATA_FORMATS}.")
  if config.head != "lm":
    _require(config.data.format == "sentences",
             f"config.head={config.head!r} trains on whole sentences: set --config.data.format=sentences "
             "(one record per sentence, e.g. the sentence column of a .tsv).")
    _require(config.grad_accum_steps == 1, f"config.head={config.head!r} does not support grad_accum_steps > 1; "
             "lower batch_size instead.")
  vae = config.vae
  _require(isinstance(vae.latent_size, int) and vae.latent_size > 0,
           f"config.vae.latent_size={vae.latent_size!r} must be a positive integer (32 in Optimus).")
  _require(vae.injection in ("memory", "embedding", "both"),
           f"config.vae.injection={vae.injection!r} is not one of ('memory', 'embedding', 'both').")
  _require(vae.pooling in ("mean", "first"), f"config.vae.pooling={vae.pooling!r} is not one of ('mean', 'first').")
  _require(vae.encoder_layers is None or vae.encoder_layers > 0, "config.vae.encoder_layers must be > 0 (or unset).")
  _require(vae.kl_schedule in ("constant", "linear", "monotonic", "cyclical"),
           f"config.vae.kl_schedule={vae.kl_schedule!r} is not one of ('constant', 'linear', 'cyclical').")
  _require(vae.kl_warmup_steps >= 0 and vae.kl_cycles >= 1 and 0 < vae.kl_ratio <= 1 and vae.ae_steps >= 0,
           "config.vae.kl_warmup_steps and ae_steps must be >= 0, kl_cycles >= 1, kl_ratio in (0, 1].")
  if config.head == "vae" and vae.kl_schedule == "cyclical":
    _require(vae.ae_steps < config.steps, f"config.vae.ae_steps={vae.ae_steps} leaves no steps of the cyclical "
             f"KL schedule in config.steps={config.steps}; lower ae_steps.")
  _require(vae.free_bits >= 0, f"config.vae.free_bits={vae.free_bits} must be >= 0 (nats per dimension).")
  _require(0 <= vae.word_dropout < 1, f"config.vae.word_dropout={vae.word_dropout} must be in [0, 1).")
  _require(vae.iw_samples >= 1 and vae.iw_chunk >= 1, "config.vae.iw_samples and iw_chunk must be >= 1.")
  gan = config.gan
  _require(gan.kind in ("latent", "relgan"), f"config.gan.kind={gan.kind!r} is not one of ('latent', 'relgan').")
  _require(gan.lr > 0 and gan.critic_steps >= 1 and gan.gp_weight >= 0 and gan.mle_weight >= 0,
           "config.gan.lr must be > 0, critic_steps >= 1, gp_weight and mle_weight >= 0.")
  _require(gan.noise_size >= 1 and gan.hidden_size >= 1 and gan.mlp_layers >= 1 and gan.discriminator_layers >= 1
           and gan.discriminator_width >= 1, "config.gan sizes (noise_size, hidden_size, mlp_layers, "
           "discriminator_layers, discriminator_width) must be >= 1.")
  _require(gan.max_temperature >= 1 and gan.temperature_schedule in ("exponential", "linear", "constant"),
           "config.gan.max_temperature must be >= 1 and temperature_schedule one of exponential, linear, constant.")
  _require(gan.eval_samples >= 2 and all(t > 0 for t in gan.temperatures),
           "config.gan.eval_samples must be >= 2 and every config.gan.temperatures entry > 0.")
  classifier = config.classifier
  _require(classifier.pooling in ("mean", "max", "last"),
           f"config.classifier.pooling={classifier.pooling!r} is not one of ('mean', 'max', 'last').")
  _require(0 <= classifier.label_smoothing < 1,
           f"config.classifier.label_smoothing={classifier.label_smoothing} must be in [0, 1).")
  _require(classifier.attention in ("causal", "bidirectional"),
           f"config.classifier.attention={classifier.attention!r} is not one of ('causal', 'bidirectional').")
  _require(0 <= classifier.token_dropout < 1,
           f"config.classifier.token_dropout={classifier.token_dropout} must be in [0, 1).")
  _require(isinstance(classifier.class_weights, str), "config.classifier.class_weights must be a string: '', "
           "'balanced' or comma-separated weights such as '1.0,2.5'.")
  _require(isinstance(config.data.label_field, str) and config.data.label_field.strip() != "",
           "config.data.label_field is empty: name the .tsv column / .jsonl field holding the labels.")
  data = config.data
  _require(isinstance(data.source, str) and data.source.strip() != "",
           "config.data.source is empty: set it to tfds:NAME[:SPLIT] or a path to a .txt/.jsonl/.tsv corpus.")
  _require(data.tokenizer in TOKENIZERS, f"config.data.tokenizer={data.tokenizer!r} is not one of {TOKENIZERS}.")
  _require(data.train_stride >= 1, "config.data.train_stride must be >= 1.")
  if data.source == "synthetic":
    _require(config.head == "lm" and data.format == "windows" and data.tokenizer == "byte",
             "config.data.source='synthetic' is random token ids for a language model's throughput: it needs "
             f"head='lm', data.format='windows' and data.tokenizer='byte' (got {config.head!r}, {data.format!r}, "
             f"{data.tokenizer!r}).")
    _require(data.synthetic_vocab_size >= 1 and data.synthetic_tokens > config.seq_len,
             f"config.data.synthetic_vocab_size must be >= 1 and data.synthetic_tokens > seq_len={config.seq_len} "
             f"(got {data.synthetic_vocab_size}, {data.synthetic_tokens}).")
  _require(config.mesh.preset in ("", "dp", "fsdp", "fsdp_tp"),
           f"config.mesh.preset={config.mesh.preset!r} is not one of 'dp', 'fsdp', 'fsdp_tp' "
           "(or empty to use mesh.data/fsdp/tensor/rules as set).")
  online = config.online
  if mode == "online":
    _require(config.head == "lm" and config.data.format == "windows", "--mode online trains a language model on "
             f"token windows; config.head={config.head!r}, data.format={config.data.format!r} are not supported "
             "there. Set --config.head=lm --config.data.format=windows.")
    _require(bool(online.stream), "config.online.stream is empty: set it to dir:PATH (a watched folder), "
             "tfds:NAME[:SPLIT] or a path to a .txt/.jsonl/.tsv corpus.")
  _require(online.chunks >= 1 and online.max_chunks >= 0, "config.online.chunks must be >= 1, max_chunks >= 0.")
  _require(online.steps_per_chunk >= 1 or online.epochs_per_chunk > 0,
           "config.online.steps_per_chunk must be >= 1 (or set epochs_per_chunk > 0).")
  _require(0.0 <= online.replay_fraction < 1.0,
           f"config.online.replay_fraction must be in [0, 1) (got {online.replay_fraction}).")
  _require(0.0 < online.heldout_fraction < 1.0 and online.heldout_max_windows >= 1,
           "config.online.heldout_fraction must be in (0, 1) and heldout_max_windows >= 1.")
  _require(online.lr_schedule in ("rewarm", "constant"),
           f"config.online.lr_schedule={online.lr_schedule!r} is not one of ('rewarm', 'constant').")
  _require(min(online.l2_init, online.ewc, online.distill) >= 0 and online.distill_temperature > 0,
           "config.online.l2_init, ewc and distill must be >= 0 and distill_temperature > 0.")
  _require(online.replay_capacity >= 1 and online.ewc_batches >= 1, "config.online.replay_capacity and "
           "ewc_batches must be >= 1.")
  _require(online.gate.max_regression >= 0 and 0.5 <= online.gate.confidence < 1,
           "config.online.gate.max_regression must be >= 0 and gate.confidence in [0.5, 1).")
  try:
    from lm.data.clean import CleanConfig  # pylint: disable=g-import-not-at-top
    CleanConfig.from_mapping(config.clean.to_dict())
  except ValueError as error:
    raise ConfigError(f"config.clean: {error}") from error
  distributed = config.distributed
  _require(distributed.initialization_timeout > 0 and distributed.heartbeat_timeout > 0,
           "config.distributed.initialization_timeout and heartbeat_timeout must be > 0 seconds.")
  from lm import xla_flags  # pylint: disable=g-import-not-at-top
  _require(config.xla.preset in xla_flags.CHOICES,
           f"config.xla.preset={config.xla.preset!r} is not one of {xla_flags.CHOICES}.")
  xla_flags.parse(config.xla.flags)  # ConfigError naming a malformed flag
  sample = config.sample
  _require(sample.kind in SAMPLE_KINDS, f"config.sample.kind={sample.kind!r} is not one of {SAMPLE_KINDS}.")
  if mode == "sample" and sample.kind != "continue":
    _require(config.head == "vae", f"config.sample.kind={sample.kind!r} decodes from a VAE's latent space; it needs "
             "config.head='vae' (use sample.kind=continue for a language model).")
  if mode == "sample" and sample.kind == "interpolate":
    _require(bool(sample.prompt.strip()) and bool(sample.prompt_b.strip()), "config.sample.kind='interpolate' "
             "goes from config.sample.prompt to config.sample.prompt_b: set both to a sentence.")
  _require(sample.interpolation_steps >= 2, "config.sample.interpolation_steps must be >= 2.")
  _require(sample.temperature >= 0, "config.sample.temperature must be >= 0 (0 means greedy).")
  _require(0 < sample.top_p <= 1, "config.sample.top_p must be in (0, 1].")
  _require(sample.top_k >= 0 and sample.max_tokens > 0 and sample.num_samples > 0,
           "config.sample.top_k must be >= 0; max_tokens and num_samples must be > 0.")
  _require(isinstance(sample.beam_size, int) and sample.beam_size >= 1,
           f"config.sample.beam_size={sample.beam_size!r} must be an integer >= 1 (1: sampling, > 1: beam search).")
  _require(sample.beam_size == 1 or sample.num_samples <= sample.beam_size,
           f"config.sample.num_samples={sample.num_samples} best beams asked of beam_size={sample.beam_size}: "
           "beam search returns at most beam_size per prompt; raise beam_size or lower num_samples.")
  _require(sample.length_penalty >= 0, f"config.sample.length_penalty={sample.length_penalty} must be >= 0 "
           "(GNMT's alpha: 0 ranks beams by log-probability, larger values favour longer outputs).")
  _require(all(isinstance(stop, str) and stop for stop in sample.stop),
           f"config.sample.stop={tuple(sample.stop)!r} must be non-empty strings, e.g. "
           "--config.sample.stop='(\"\\n\\n\", \"THE END\")'.")
  if mode == "sample" and (sample.prompts_file or sample.beam_size > 1 or sample.stop):
    _require(config.head == "lm" and sample.kind == "continue", "config.sample.prompts_file, beam_size > 1 and "
             f"stop continue prompts with a language model (head='lm', sample.kind='continue'); this is head="
             f"{config.head!r}, kind={sample.kind!r}. Unset them.")
  _require(isinstance(config.eval.stride, int) and 0 <= config.eval.stride <= config.seq_len,
           f"config.eval.stride={config.eval.stride!r} must be in [0, seq_len={config.seq_len}] (0: non-overlapping "
           "windows; S: a sliding window scoring each token with >= seq_len - S tokens of context).")
  if config.eval.stride:
    _require(config.head == "lm" and config.data.format == "windows", f"config.eval.stride={config.eval.stride} "
             "slides a window over a token stream: it needs head='lm' and data.format='windows' (this is head="
             f"{config.head!r}, data.format={config.data.format!r}); set eval.stride=0.")
  batches = config.bench.decode_batches
  _require(isinstance(batches, tuple) and len(batches) > 0 and all(isinstance(b, int) and b >= 1 for b in batches)
           and config.bench.decode_tokens >= 1,
           f"config.bench.decode_batches={batches!r} must be a non-empty tuple of batch sizes >= 1, e.g. "
           "--config.bench.decode_batches='(1, 64)', and bench.decode_tokens >= 1.")
  _require(isinstance(config.eval.folds, int) and config.eval.folds >= 2,
           f"config.eval.folds={config.eval.folds!r} must be an integer >= 2 (the usual value is 5 or 10).")
  ab = config.ab
  if mode == "ab":
    _require(bool(ab.a) and bool(ab.b), "--mode ab compares two runs: set --config.ab.a=WORKDIR_A and "
             "--config.ab.b=WORKDIR_B (workdirs or checkpoints folders of trained runs).")
  _require(0 < ab.confidence < 1 and ab.bootstrap_samples >= 1,
           f"config.ab.confidence={ab.confidence} must be in (0, 1) (e.g. 0.95) and ab.bootstrap_samples >= 1.")
  _require(config.bench.steps > 0 and config.bench.warmup_steps >= 0,
           "config.bench.steps must be > 0 and config.bench.warmup_steps >= 0.")
  _require(mode != "export" or bool(config.export.dir), "--mode export writes a Hugging Face folder: set "
           "--config.export.dir=OUT (a new or empty folder).")
  _require(config.export.max_shard_size >= 0, "config.export.max_shard_size must be >= 0 bytes (0: one file).")


def to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Plain JSON-serializable dict of the config (tuples become lists)."""
  return ml_collections.ConfigDict(config).to_dict()


def _as_tuples(value: Any) -> Any:
  return tuple(_as_tuples(item) for item in value) if isinstance(value, list) else value


def config_from_saved(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The config a run recorded (its config.json / checkpoint metadata), on today's schema.

  Keys the schema no longer has are dropped; keys it gained keep their
  defaults; JSON lists become the tuples the schema holds.
  """
  config = base_config()

  def merge(node: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
      if key not in node:
        continue
      if isinstance(node[key], ml_collections.ConfigDict):
        if isinstance(value, Mapping):
          merge(node[key], value)
        continue
      if isinstance(node[key], tuple) and isinstance(value, list):
        value = _as_tuples(value)
      try:
        node[key] = value
      except TypeError:  # a value of another type than today's default (e.g. None for a placeholder)
        with node.ignore_type():
          node[key] = value

  merge(config, saved)
  return config
