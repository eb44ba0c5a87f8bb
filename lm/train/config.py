"""The engine's part of the run config: the run's length and batch, its checkpoints, the optimizer, the mesh.

Start modes (docs/training.md), chosen by these fields:
  * resume (`resume=True`, the default): if the workdir already holds
    checkpoints, continue from the latest one exactly: train state and data
    iterator.
  * warm-start (`warm_start=PATH`): weights *and* optimizer state (and the
    step count) from another run's checkpoint, with this run's data.
  * init-from (`init_from=PATH`): weights only; fresh optimizer, step 0
    (`hf:DIR`: a Hugging Face folder, `lm.interop`).
A workdir's own checkpoint always wins over warm_start/init_from, so a
restarted warm-started run resumes instead of starting over.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from lm.core.configs import ConfigPart, require
from lm.core.errors import ConfigError
from lm.train import sharding
from lm.train.optim import OPTIMIZERS

OPTIM_SCHEDULES = ("cosine", "linear", "constant")

RUN_FIELDS = {
    "seed": 0,
    "steps": 1000,
    "batch_size": 32,  # global, over all processes and devices
    "seq_len": 128,
    "grad_accum_steps": 1,  # micro-batches per step, for every task (lm.train.step)
    "log_every": 50,
    "eval_every": 500,
    "eval_batches": 0,  # 0: the whole eval split (non-overlapping windows)
    "checkpoint_every": 500,
    "keep_checkpoints": 3,
    "keep_best": 1,  # best checkpoints kept by the task's selection figure (eval/loss for the LM)
    "async_checkpointing": True,
    # Start modes (module docstring).
    "resume": True,
    "warm_start": "",
    "init_from": "",
}

OPTIM_FIELDS = {
    "optim.name": "adamw",  # adamw | sgd (momentum optim.b1; DP-SGD's usual optimizer)
    "optim.lr": 1e-3,
    "optim.warmup_steps": 100,
    "optim.min_lr": 1e-4,
    "optim.decay_steps": placeholder(int),  # None: steps
    "optim.schedule": "cosine",  # cosine | linear | constant
    "optim.weight_decay": 0.1,
    "optim.decay_embeddings": True,  # weight decay on the token/position tables too (nanoGPT: yes)
    "optim.b1": 0.9,
    "optim.b2": 0.95,
    "optim.eps": 1e-8,
    "optim.grad_clip": 1.0,
}

MESH_FIELDS = {
    # dp | fsdp | fsdp_tp: sets the sizes and rules below (lm.train.sharding.PRESETS);
    # empty: use them as set. fsdp_tp takes its tensor size from mesh.tensor (2 if 1).
    "mesh.preset": "",
    "mesh.data": -1,
    "mesh.fsdp": 1,
    "mesh.tensor": 1,
    "mesh.rules": sharding.DEFAULT_RULES,
}

# XLA options for the jitted train/eval steps when the devices are CPUs; one set in XLA_FLAGS wins.
# YNNPACK runs the matmuls only: its reduction kernels (on by default in jaxlib 0.10) ran the attention
# softmax's gradient ~4x slower than XLA's own loops (BENCHMARKS.md, "CPU: train step vs PyTorch eager").
CPU_FIELDS = {
    "xla_cpu_options.xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    # keep | default. keep: glibc's malloc keeps the memory XLA:CPU's steps free (lm.core.malloc), so the step's
    # temporary buffer is not mapped and faulted in afresh every step once it passes 32 MiB (BENCHMARKS.md, "The
    # page faults behind the GELU surprise"); set when the devices are CPUs. default: glibc as it is.
    "cpu_malloc": "keep",
}
CPU_MALLOC = ("keep", "default")

# --mode bench (lm.app.bench); bench.peak_flops_per_device is also the MFU denominator of training's logs.
BENCH_FIELDS = {
    "bench.steps": 50,
    "bench.warmup_steps": 5,
    "bench.peak_flops_per_device": placeholder(float),  # None: from the device table in lm.train.perf
    "bench.compile_only": False,  # True: memory per device from the compiled step, no timing
    "bench.decode": True,  # also time greedy sampling with the KV cache (tasks that decode)
    "bench.decode_batches": (8,),  # one figure per batch size, e.g. (1, 64)
    "bench.decode_tokens": 64,  # new tokens per row, after a prompt that fills the rest of the context
    # and without the cache, the whole buffer recomputed per token (at the first batch size)
    "bench.decode_uncached": True,
    # A folder: after the timed steps, bench.profile_steps more under jax.profiler.trace (TensorBoard's profile
    # plugin and a Perfetto trace, perfetto_trace.json.gz; benchmarks/profile_summary.py sums its kernels).
    "bench.profile_dir": "",
    "bench.profile_steps": 3,
}


# DP-SGD (lm.train.privacy; docs/privacy.md): per-example clipping and Gaussian noise in the step, epsilon from
# Google's dp_accounting for the batches the pipeline draws (privacy.sampling).
PRIVACY_FIELDS = {
    "privacy.enabled": False,
    "privacy.clip_norm": 1.0,  # each example's gradient is clipped to this L2 norm
    "privacy.noise_multiplier": 1.0,  # noise std = noise_multiplier * clip_norm, once per logical batch
    # Or: the smallest noise multiplier that keeps the run's config.steps within this epsilon (overrides it).
    "privacy.target_epsilon": placeholder(float),
    "privacy.delta": placeholder(float),  # None: 1 / (training examples)
    # rdp | pld (dp_accounting's Renyi or privacy-loss-distribution accountant); None: rdp for shuffled batches,
    # pld for Poisson sampling (the only one that evaluates its truncation).
    "privacy.accountant": placeholder(str),
    # shuffle: fixed-size batches, each example once per epoch; poisson: each example joins each batch with
    # probability expected_batch_size / N, the batch truncated and padded to config.batch_size rows.
    "privacy.sampling": "shuffle",
    "privacy.expected_batch_size": placeholder(float),  # poisson; None: batch_size - 4 sqrt(batch_size)
}


def _validate_privacy(config: ml_collections.ConfigDict) -> None:
  privacy = config.privacy
  if not privacy.enabled:
    return
  from lm.train import privacy as privacy_lib  # pylint: disable=g-import-not-at-top
  require(privacy.clip_norm > 0, f"config.privacy.clip_norm={privacy.clip_norm} must be > 0: each example's "
          "gradient is clipped to this L2 norm (e.g. --config.privacy.clip_norm=1.0).")
  require(privacy.noise_multiplier >= 0, f"config.privacy.noise_multiplier={privacy.noise_multiplier} must be "
          ">= 0 (the noise std is noise_multiplier * clip_norm; 0 is clipping without privacy).")
  require(privacy.target_epsilon is None or privacy.target_epsilon > 0,
          f"config.privacy.target_epsilon={privacy.target_epsilon} must be > 0, or unset to use "
          "privacy.noise_multiplier.")
  require(privacy.delta is None or 0 < privacy.delta < 1, f"config.privacy.delta={privacy.delta} must be in "
          "(0, 1), e.g. 1e-5, or unset for 1 / (training examples).")
  require(privacy.accountant is None or privacy.accountant in privacy_lib.ACCOUNTANTS,
          f"config.privacy.accountant={privacy.accountant!r}: pick one of {', '.join(privacy_lib.ACCOUNTANTS)}, or "
          "leave it unset (rdp for shuffled batches, pld for Poisson sampling).")
  require(privacy.sampling in privacy_lib.SAMPLINGS, f"config.privacy.sampling={privacy.sampling!r}: pick one of "
          f"{', '.join(privacy_lib.SAMPLINGS)}.")
  if privacy.sampling == "poisson":
    require(privacy.accountant in (None, "pld"), f"config.privacy.accountant={privacy.accountant!r} cannot account "
            "privacy.sampling='poisson': its batches are truncated to config.batch_size rows, which only the PLD "
            "accountant evaluates. Fix: --config.privacy.accountant=pld (or leave it unset).")
    expected = privacy_lib.expected_batch_size(config.batch_size, privacy.expected_batch_size)
    require(0 < expected <= config.batch_size, f"config.privacy.expected_batch_size={expected:g} (privacy.sampling="
            f"'poisson') must be in (0, config.batch_size={config.batch_size}]: each batch is padded to "
            "batch_size rows. Fix: set privacy.expected_batch_size a few standard deviations below batch_size "
            "(the default, batch_size - 4 sqrt(batch_size), needs batch_size >= 17).")
  else:
    require(privacy.expected_batch_size is None, "config.privacy.expected_batch_size is Poisson sampling's: shuffled "
            "batches hold config.batch_size examples. Fix: unset it, or --config.privacy.sampling=poisson.")
  require(config.grad_accum_steps >= 1 and config.batch_size % config.grad_accum_steps == 0,
          "config.grad_accum_steps must divide config.batch_size.")


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  """The run, optim, mesh, bench and privacy fields."""
  del mode
  _validate_privacy(config)
  for key in ("steps", "batch_size", "seq_len", "grad_accum_steps", "log_every", "eval_every",
              "checkpoint_every", "keep_checkpoints"):
    require(int(config[key]) > 0, f"config.{key} must be a positive integer (got {config[key]!r}).")
  require(config.batch_size % config.grad_accum_steps == 0,
          f"config.batch_size={config.batch_size} must be divisible by "
          f"config.grad_accum_steps={config.grad_accum_steps}.")
  require(not (config.warm_start and config.init_from),
          "Set at most one of config.warm_start (weights + optimizer) and config.init_from (weights only).")
  optim = config.optim
  require(optim.lr > 0, f"config.optim.lr must be > 0 (got {optim.lr}).")
  require(0 <= optim.min_lr <= optim.lr,
          f"config.optim.min_lr={optim.min_lr} must be between 0 and config.optim.lr={optim.lr}.")
  require(optim.warmup_steps >= 0, "config.optim.warmup_steps must be >= 0.")
  require(optim.name in OPTIMIZERS, f"config.optim.name={optim.name!r} is not one of {OPTIMIZERS}.")
  require(optim.schedule in OPTIM_SCHEDULES,
          f"config.optim.schedule={optim.schedule!r} is not one of {OPTIM_SCHEDULES}.")
  for key in ("b1", "b2"):
    require(0 <= optim[key] < 1, f"config.optim.{key} must be in [0, 1) (got {optim[key]}).")
  require(optim.weight_decay >= 0 and optim.grad_clip >= 0,
          "config.optim.weight_decay and config.optim.grad_clip must be >= 0.")
  require(config.mesh.preset in ("", *sharding.PRESETS),
          f"config.mesh.preset={config.mesh.preset!r} is not one of 'dp', 'fsdp', 'fsdp_tp' "
          "(or empty to use mesh.data/fsdp/tensor/rules as set).")
  if not config.mesh.preset:
    try:
      sharding.normalize_rules(config.mesh.rules)
    except (TypeError, ValueError) as error:
      problem = str(error) if isinstance(error, ValueError) else "its entries must be (logical_axis, mesh_axes) pairs."
      raise ConfigError(f"config.mesh.rules={config.mesh.rules!r:.120} is malformed: {problem} Fix: leave it at its "
                        "default, or set config.mesh.preset to 'dp', 'fsdp' or 'fsdp_tp'.") from None
  require(config.cpu_malloc in CPU_MALLOC, f"config.cpu_malloc={config.cpu_malloc!r} is not one of "
          f"{', '.join(CPU_MALLOC)} (keep: glibc keeps the memory XLA:CPU's steps free, no page faults every step; "
          "default: glibc's malloc as it is).")
  bench = config.bench
  batches = bench.decode_batches
  require(isinstance(batches, tuple) and len(batches) > 0 and all(isinstance(b, int) and b >= 1 for b in batches)
          and bench.decode_tokens >= 1,
          f"config.bench.decode_batches={batches!r} must be a non-empty tuple of batch sizes >= 1, e.g. "
          "--config.bench.decode_batches='(1, 64)', and bench.decode_tokens >= 1.")
  require(bench.steps > 0 and bench.warmup_steps >= 0,
          "config.bench.steps must be > 0 and config.bench.warmup_steps >= 0.")
  require(bench.profile_steps >= 1, f"config.bench.profile_steps={bench.profile_steps} must be >= 1 (the steps "
          "traced into bench.profile_dir).")


CONFIG = ConfigPart("lm.train", {**RUN_FIELDS, **OPTIM_FIELDS, **MESH_FIELDS, **CPU_FIELDS, **BENCH_FIELDS,
                                  **PRIVACY_FIELDS}, validate)
