"""`--mode bench`: time the jitted train step of a config, its memory per device, and decoding.

Batches are taken from the real training data and placed on the devices
before timing, so the figure is the step itself. Each step is timed to
completion (`block_until_ready`), like an eager framework's step.

With `bench.decode` (a language model), the benchmarked model's greedy decoding is
timed too: new tokens per second with the KV cache (`lm.inference.sample.generate`) at
each of `bench.decode_batches` batch sizes, `bench.decode_tokens` new tokens
per row, and (`bench.decode_uncached`, first batch size) without the cache,
recomputing the whole fixed-length buffer (prompt + new tokens) for every
token (`generate_without_cache`; about twice the work of a prefix-only
recompute after a short prompt) (`decode_figures`).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any

try:
  import resource  # Unix: the page-fault count of --mode bench
except ImportError:  # Windows
  resource = None

import jax
import jaxlib
import ml_collections
import numpy as np

from lm import xla_flags
from lm.core import malloc
from lm.data import pipeline
from lm.experiment import build_experiment, open_train_split, token_windows, train_dataset
from lm.inference import sample as sample_lib
from lm.train import perf


def _bytes(value: Any) -> int | None:
  return int(value) if value is not None else None


def memory_per_device(compiled: Any) -> dict[str, int | None]:
  """Bytes per device from XLA's memory analysis of a compiled step ({} where unsupported).

  `argument_bytes` are the step's inputs (train state + batch), `temp_bytes`
  the activations and other buffers live during the step; the donated state
  is updated in place, so `argument_bytes + temp_bytes` is the step's peak.
  """
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return {}
  if analysis is None:
    return {}
  figures = {
      "argument_bytes": _bytes(getattr(analysis, "argument_size_in_bytes", None)),
      "output_bytes": _bytes(getattr(analysis, "output_size_in_bytes", None)),
      "alias_bytes": _bytes(getattr(analysis, "alias_size_in_bytes", None)),
      "temp_bytes": _bytes(getattr(analysis, "temp_size_in_bytes", None)),
      "generated_code_bytes": _bytes(getattr(analysis, "generated_code_size_in_bytes", None)),
  }
  if figures["argument_bytes"] is not None and figures["temp_bytes"] is not None:
    figures["peak_bytes"] = figures["argument_bytes"] + figures["temp_bytes"]
  return figures


def _shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a pytree of sharded arrays or ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def state_bytes_per_device(state: Any) -> dict[str, int]:
  """Parameter and optimizer-state bytes on one device, from the state's shardings."""
  params, optimizer = _shard_bytes(state.params), _shard_bytes(state.opt_state)
  return {"params_bytes": params, "optimizer_bytes": optimizer, "state_bytes": _shard_bytes(state)}


def _mesh_figures(experiment: Any) -> dict[str, Any]:
  return {"mesh": dict(experiment.mesh.shape), "preset": experiment.config.mesh.preset or "custom",
          "devices": jax.device_count(), "processes": jax.process_count()}


MODEL_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "width", "mlp_dim", "vocab_size", "valid_vocab_size",
                "max_len", "variant", "position", "norm", "mlp", "use_bias", "tie_embeddings", "gelu_approximate",
                "dropout", "dtype", "param_dtype", "attention_impl", "norm_impl", "gelu_impl", "remat_policy", "scan_layers",
                "loss_impl")


def _run_figures(experiment: Any) -> dict[str, Any]:
  """What was benchmarked: the model's shape and fast-path choices (attention as settled for these
  devices, the loss actually used), the platform, versions and XLA flags, so a figure carries its setup."""
  config, model = experiment.config, experiment.model_config
  micro_batch = config.batch_size // config.grad_accum_steps
  return {
      "model": {field: getattr(model, field) for field in MODEL_FIELDS},
      "fused_loss": model.fused_loss(micro_batch, config.seq_len, devices=jax.device_count()),
      "platform": jax.default_backend(),
      "xla_flags": xla_flags.describe(),
      "host_malloc": malloc.describe(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
  }


def compile_memory(config: ml_collections.ConfigDict, workdir: str = "") -> dict[str, Any]:
  """Compiles the train step for abstract inputs and reports memory per device; runs nothing.

  Nothing is allocated, so this sizes models that would not fit (e.g. GPT-2
  small on simulated CPU devices) to compare sharding strategies.
  """
  experiment, _ = build_experiment(config, workdir or "/nonexistent-bench-workdir", "bench")
  ranks = {**experiment.task.batch_ranks, **experiment.task.train_only_ranks}
  batch = {key: jax.ShapeDtypeStruct((config.batch_size, config.seq_len)[:rank], np.int32,
                                     sharding=experiment.steps.train_shardings[key])
           for key, rank in ranks.items()}
  with experiment.steps.context():
    start = time.perf_counter()
    compiled = experiment.steps.train_step.lower(experiment.abstract_state, batch).compile()
    compile_time = time.perf_counter() - start
  memory = state_bytes_per_device(experiment.abstract_state)
  memory.update(memory_per_device(compiled))
  return {
      **_mesh_figures(experiment),
      "memory_per_device": memory,
      "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(experiment.abstract_state.params)),
      "batch_size": config.batch_size,
      "seq_len": config.seq_len,
      "compile_time_s": compile_time,
      "device": perf.device_description(),
      **_run_figures(experiment),
  }


def decode_figures(experiment: Any, params: Any) -> dict[str, Any]:
  """Greedy decode throughput of the model with the KV cache, and without it ("decode/..." figures).

  `bench.decode_tokens` new tokens (at most the context) after a random
  prompt that fills the rest of the context, so the timed tokens are the
  last ones of a full context, as long sampling decodes them (`generate_long`
  keeps half the context and fills the rest). tokens/s counts new tokens;
  the cached run's time includes the prompt's prefill. Only for head="lm"
  on one process ({} otherwise). Per batch size B: "decode/bB/cached_tokens_per_sec",
  and at the first one with bench.decode_uncached also "decode/bB/uncached_tokens_per_sec",
  "decode/bB/speedup" and "decode/bB/tokens_match".
  """
  config = experiment.config
  if not config.bench.decode or not experiment.task.language_model or jax.process_count() > 1:
    return {}
  max_len = experiment.model_config.max_len
  new_tokens = min(config.bench.decode_tokens, max_len)
  prompt_len = max(max_len - new_tokens + 1, 1)
  out: dict[str, Any] = {"decode/batch_sizes": list(config.bench.decode_batches), "decode/prompt_len": prompt_len,
                         "decode/new_tokens": new_tokens}
  for index, batch_size in enumerate(config.bench.decode_batches):
    uncached = config.bench.decode_uncached and index == 0
    with experiment.steps.context():
      figures = sample_lib.decode_benchmark(experiment.model, params, batch_size=batch_size, prompt_len=prompt_len,
                                            new_tokens=new_tokens, uncached=uncached)
    out[f"decode/b{batch_size}/cached_tokens_per_sec"] = figures["cached_tokens_per_s"]
    if uncached:
      out[f"decode/b{batch_size}/uncached_tokens_per_sec"] = figures["uncached_tokens_per_s"]
      out[f"decode/b{batch_size}/speedup"] = figures["speedup"]
      out[f"decode/b{batch_size}/tokens_match"] = figures["tokens_match"]
  return out


def _minor_page_faults() -> int:
  """The process's minor page faults so far (getrusage), 0 without the resource module (Windows)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def benchmark(config: ml_collections.ConfigDict, workdir: str = "") -> dict[str, Any]:
  """Compiles and times `config.bench.steps` train steps; returns the figures.

  With `config.bench.compile_only`, only compiles and reports memory (`compile_memory`); with
  `config.bench.decode`, also the decode throughput with and without the KV cache (`decode_figures`).
  """
  if config.bench.compile_only:
    return compile_memory(config, workdir)
  experiment, _ = build_experiment(config, workdir or "/nonexistent-bench-workdir", "bench")
  windows = token_windows(experiment, open_train_split(config), config.data.train_stride, train=True)
  dataset, _ = train_dataset(experiment, windows)  # DP-SGD's batches, and the noise the run would have
  total = config.bench.warmup_steps + config.bench.steps
  batches = [pipeline.to_global_batch(dataset[i], experiment.steps.train_shardings, config.batch_size)
             for i in range(total)]
  state = experiment.init_state()
  with experiment.steps.context():
    start = time.perf_counter()
    compiled = experiment.steps.train_step.lower(state, batches[0]).compile()
    compile_time = time.perf_counter() - start
    times = []
    faults = 0
    for index, batch in enumerate(batches):
      timed = index >= config.bench.warmup_steps
      faults_before = _minor_page_faults()
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      if timed:
        times.append(time.perf_counter() - start)
        faults += _minor_page_faults() - faults_before
    if config.bench.profile_dir:  # after the timing, so the trace's overhead is not in the figures
      with jax.profiler.trace(config.bench.profile_dir, create_perfetto_trace=True):
        for index in range(config.bench.profile_steps):
          with jax.profiler.StepTraceAnnotation("train", step_num=index):
            state, profiled = compiled(state, batches[index % len(batches)])
          jax.block_until_ready(profiled)
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
      # The FLOP count is the LM's (lm.train.perf); other tasks report no MFU.
      "mfu": flops / step_time / (peak * jax.device_count()) if experiment.task.counts_lm_flops else None,
      "compile_time_s": compile_time,
      "device": perf.device_description(),
      "peak_flops_per_device": peak,
      # How the CPU peak was derived (lm.train.perf.cpu_peak); None on accelerators and when overridden.
      "cpu_peak": dataclasses.asdict(used) if (used := perf.cpu_peak_in_use(config.bench.peak_flops_per_device))
                  else None,
      "flops_per_step": flops,
      "params": num_params,
      "flops_per_token": perf.flops_per_token(num_params, experiment.model_config, config.seq_len),
      "vocab_size": experiment.model_config.vocab_size,
      "tie_embeddings": experiment.model_config.tie_embeddings,
      "batch_size": config.batch_size,
      "seq_len": config.seq_len,
      "steps_timed": len(times),
      # The process's minor page faults per timed step (every thread's; 0 where the OS does not count them). Tens
      # of thousands of kernel page-zeroings a step is host memory faulted in afresh: see config.cpu_malloc.
      "page_faults_per_step": faults / len(times),
      "profile_dir": config.bench.profile_dir or None,
      "final_loss": float(metrics["train/loss"]),
      "memory_per_device": {**state_bytes_per_device(state), **memory_per_device(compiled)},
      **_mesh_figures(experiment),
      **_run_figures(experiment),
      **decode_figures(experiment, state.params),
  }


def run(config: ml_collections.ConfigDict, workdir: str, report: Any = print) -> int:
  """The CLI's --mode bench: prints the figures as one JSON line."""
  report(json.dumps(benchmark(config, workdir or "")))
  return 0
