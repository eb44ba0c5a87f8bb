"""FLOP accounting and model FLOPs utilization (MFU).

Convention (PaLM appendix B, nanoGPT's estimate_mfu): a training step costs
6 FLOPs per parameter per token (forward 2, backward 4) for every parameter
that takes part in a matmul, plus the attention scores and weighted sum. With
causal masking only half of the T x T score matrix is useful, so the attention
term is 6 * L * T^2 * d per sequence (L layers, T tokens, d = width), i.e.
6 * L * T * d per token. N excludes the lookup tables (the learned position
table, and the input embedding table when it is not tied to the output
projection), and includes the output projection, a matmul: the token table
once, whether tied or not. Untying adds parameters, not FLOPs.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax

from lm.models.transformer import TransformerConfig

# Dense peak FLOP/s per device for the dtype the model computes in, keyed by the start of
# `device.device_kind` (lower case; the longest matching prefix wins, so "nvidia h100 pcie" beats
# "nvidia h100", the SXM part). Sources: vendor data sheets, dense (no 2:4 sparsity); float32 is the
# plain (non-tensor-core) rate. Override with config.bench.peak_flops_per_device.
PEAK_FLOPS = {
    ("tpu v4", "bfloat16"): 275e12,
    ("tpu v5 lite", "bfloat16"): 197e12,
    ("tpu v5e", "bfloat16"): 197e12,
    ("tpu v5", "bfloat16"): 459e12,  # v5p reports "TPU v5"
    ("tpu v5p", "bfloat16"): 459e12,
    ("tpu v6 lite", "bfloat16"): 918e12,
    ("nvidia h100", "bfloat16"): 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    ("nvidia h100", "float32"): 67e12,
    ("nvidia h100 pcie", "bfloat16"): 756e12,
    ("nvidia h100 pcie", "float32"): 51e12,
    ("nvidia h100 nvl", "bfloat16"): 835e12,
    ("nvidia h100 nvl", "float32"): 60e12,
    ("nvidia h200", "bfloat16"): 989e12,
    ("nvidia h200", "float32"): 67e12,
    ("nvidia gh200", "bfloat16"): 989e12,
    ("nvidia gh200", "float32"): 67e12,
    ("nvidia b200", "bfloat16"): 2250e12,
    ("nvidia a100", "bfloat16"): 312e12,
    ("nvidia a100", "float32"): 19.5e12,
}


def matmul_params(params: Any, config: TransformerConfig) -> int:
  """N of the 6N rule: all parameters except the lookup tables (positions; the input table when untied)."""
  total = sum(int(x.size) for x in jax.tree.leaves(params))
  if config.position == "learned":
    total -= config.max_len * config.width
  if not config.tie_embeddings:
    total -= config.vocab_size * config.width  # the input table is a lookup; the untied "unembed" is the matmul
  return total


def flops_per_token(num_params: int, config: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 N + 6 L T d (causal attention)."""
  return 6.0 * num_params + 6.0 * config.num_layers * seq_len * config.width


def cpu_peak_flops() -> float:
  """Peak f32 FLOP/s of this host's CPUs: cores x clock x FLOPs per cycle.

  FLOPs per cycle per core: 64 with AVX-512 (two 16-wide FMA units), 32 with
  AVX2+FMA (two 8-wide FMA units), else 8. The clock is the current
  `cpu MHz` of /proc/cpuinfo, which is at best an estimate under turbo.
  """
  cores = os.cpu_count() or 1
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return cores * 2.0e9 * 8
  flags = re.search(r"^flags\s*:(.*)$", info, re.M)
  flag_set = set(flags.group(1).split()) if flags else set()
  per_cycle = 64 if "avx512f" in flag_set else 32 if {"avx2", "fma"} <= flag_set else 8
  mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)]
  clock = (max(mhz) if mhz else 2000.0) * 1e6
  return cores * clock * per_cycle


def peak_flops_per_device(dtype: str = "float32", override: float | None = None) -> float:
  """Peak FLOP/s of one local device, from the table, the CPU estimate, or `override`."""
  if override:
    return float(override)
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    return cpu_peak_flops() / max(len(jax.local_devices()), 1)
  return table_peak_flops(device.device_kind, dtype)


def table_peak_flops(device_kind: str, dtype: str) -> float:
  """PEAK_FLOPS of the longest name `device_kind` starts with (case-insensitive); NaN when none does."""
  kind = device_kind.lower()
  matches = [(len(name), value) for (name, table_dtype), value in PEAK_FLOPS.items()
             if kind.startswith(name) and table_dtype == dtype]
  return max(matches)[1] if matches else float("nan")  # unknown: set config.bench.peak_flops_per_device


def device_description() -> str:
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    model = "cpu"
    try:
      with open("/proc/cpuinfo") as f:
        found = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
      model = found.group(1).strip() if found else model
    except OSError:
      pass
    return f"cpu: {model} x{os.cpu_count()} ({jax.device_count()} jax devices)"
  return f"{device.device_kind} x{jax.device_count()}"
