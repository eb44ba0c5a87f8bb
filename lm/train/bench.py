"""`--mode bench`: time the jitted train step of a config after compilation.

Batches are taken from the real training data and placed on the devices
before timing, so the figure is the step itself. Each step is timed to
completion (`block_until_ready`), like an eager framework's step.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from lm.data import pipeline
from lm.train import perf
from lm.train.experiment import build_experiment, open_train_split, token_windows


def _bytes(value: Any) -> int | None:
  return int(value) if value is not None else None


def memory_per_device(compiled: Any) -> dict[str, int | None]:
  """Bytes per device from XLA's memory analysis of a compiled step (None where unsupported)."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return {}
  if analysis is None:
    return {}
  return {
      "argument_bytes": _bytes(getattr(analysis, "argument_size_in_bytes", None)),
      "output_bytes": _bytes(getattr(analysis, "output_size_in_bytes", None)),
      "temp_bytes": _bytes(getattr(analysis, "temp_size_in_bytes", None)),
      "generated_code_bytes": _bytes(getattr(analysis, "generated_code_size_in_bytes", None)),
  }


def benchmark(config: ml_collections.ConfigDict, workdir: str = "") -> dict[str, Any]:
  """Compiles and times `config.bench.steps` train steps; returns the figures."""
  experiment, _ = build_experiment(config, workdir or "/nonexistent-bench-workdir", "bench")
  windows = token_windows(experiment, open_train_split(config), config.data.train_stride)
  dataset = pipeline.train_dataset(windows, seed=config.seed, global_batch_size=config.batch_size)
  total = config.bench.warmup_steps + config.bench.steps
  sharding = experiment.steps.batch_sharding
  batches = [{k: pipeline.to_global(v, sharding, config.batch_size) for k, v in dataset[i].items()}
             for i in range(total)]
  state = experiment.init_state()
  with experiment.steps.context():
    start = time.perf_counter()
    compiled = experiment.steps.train_step.lower(state, batches[0]).compile()
    compile_time = time.perf_counter() - start
    times = []
    for index, batch in enumerate(batches):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      if index >= config.bench.warmup_steps:
        times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  tokens = config.batch_size * config.seq_len
  num_params = perf.matmul_params(state.params, experiment.model_config)
  flops = perf.flops_per_token(num_params, experiment.model_config, config.seq_len) * tokens
  peak = perf.peak_flops_per_device(experiment.model_config.dtype, config.bench.peak_flops_per_device)
  return {
      "step_time_ms": 1e3 * step_time,
      "step_time_p10_ms": 1e3 * float(np.percentile(times, 10)),
      "step_time_p90_ms": 1e3 * float(np.percentile(times, 90)),
      "tokens_per_sec": tokens / step_time,
      "mfu": flops / step_time / (peak * jax.device_count()),
      "compile_time_s": compile_time,
      "device": perf.device_description(),
      "peak_flops_per_device": peak,
      "flops_per_step": flops,
      "params": num_params,
      "vocab_size": experiment.model_config.vocab_size,
      "tie_embeddings": experiment.model_config.tie_embeddings,
      "batch_size": config.batch_size,
      "seq_len": config.seq_len,
      "steps_timed": len(times),
      "final_loss": float(metrics["train/loss"]),
      "memory_per_device": memory_per_device(compiled),
      "jax": jax.__version__,
  }
