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

import dataclasses
import functools
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


# Set to 0 to skip the calibrated matmul of cpu_peak(): the peak is then flags x clock alone.
CALIBRATE_ENV = "LM_CPU_PEAK_CALIBRATE"
MATMUL_SIZE = 1024  # the calibration's square f32 matmul: 2.1 GFLOP, a few ms per call on a modern core
_ASSUMED_MHZ = 2000.0  # when neither /proc/cpuinfo nor cpufreq gives a clock


@dataclasses.dataclass(frozen=True)
class CpuPeak:
  """How cpu_peak() arrived at the f32 peak of this process's CPUs (all FLOP/s figures for all `cores`).

  derived_flops = cores x clock_mhz x 1e6 x flops_per_cycle, flops_per_cycle = lanes x (2 if fma else 1) x
  fma_units. matmul_flops is the rate of a `matmul_size`^3 f32 matmul measured with XLA (None when skipped).
  peak_flops is the larger of the two and `source` says which: "flags x clock" or "calibrated matmul".
  """
  model_name: str
  vendor: str
  family: int | None  # `cpu family` of /proc/cpuinfo (x86)
  model: int | None
  cores: int  # the CPUs this process may run on
  lanes: int  # f32 lanes of the widest vector unit the flags name
  fma: bool
  fma_units: int  # vector FMA units per core (without FMA: one multiply and one add unit)
  flops_per_cycle: int  # per core
  clock_mhz: float
  clock_source: str  # "/proc/cpuinfo", "cpufreq max" or "assumed"
  derived_flops: float
  matmul_flops: float | None
  matmul_size: int | None
  peak_flops: float
  source: str


def vector_lanes(flags: set[str]) -> int:
  """f32 lanes of the widest vector unit: 16 with AVX-512, 8 with AVX/AVX2, else 4 (SSE, Arm NEON)."""
  return 16 if "avx512f" in flags else 8 if "avx" in flags or "avx2" in flags else 4


def has_fma(flags: set[str]) -> bool:
  """Fused multiply-add: x86's `fma` flag; Arm's Advanced SIMD (`asimd`) always has it."""
  return "fma" in flags or "asimd" in flags


def fma_units(flags: set[str], vendor: str = "", family: int | None = None) -> int:
  """Vector FMA units per core: 2, the common case, except where the CPU's family says otherwise.

  The flags cannot tell one unit from two: some Xeon Silver and Bronze parts (AVX-512) have one 512-bit
  FMA unit where Gold and Platinum have two, with the same flags and the same family and model. The one case
  told apart is AMD family 25 (Zen 3 and Zen 4; only Zen 4 has AVX-512): Zen 4 runs a 512-bit operation as two
  halves on its two 256-bit FMA units, so it completes one 16-wide FMA per cycle, as one 512-bit unit would.
  """
  if "avx512f" in flags and vendor == "AuthenticAMD" and family == 25:
    return 1
  return 2


def cpu_peak_from(cpuinfo: str, cores: int, cpufreq_max_khz: Sequence[float] = (),
                  matmul_flops: float | None = None, matmul_size: int | None = None) -> CpuPeak:
  """The CpuPeak of a /proc/cpuinfo text, `cores` CPUs, their cpufreq maximum clocks and a measured matmul rate.

  Pure: cpu_peak() reads the files and measures the matmul. The clock is the largest of /proc/cpuinfo's
  `cpu MHz` lines and the cpufreq maxima: /proc/cpuinfo's figure is the current (or, in a virtual machine,
  often the nominal) clock, and turbo runs above both; the matmul catches that, as the peak is the larger
  of flags x clock and the measured rate (a peak cannot be below a rate achieved on the machine).
  """
  def field(name: str) -> str | None:
    found = re.search(rf"^{name}\s*:\s*(.*?)\s*$", cpuinfo, re.M)
    return found.group(1) if found else None

  def number(name: str) -> int | None:
    value = field(name)
    return int(value) if value and value.isdigit() else None

  flags = set((field("flags") or field("Features") or "").split())
  vendor = field("vendor_id") or ""
  family = number("cpu family")
  lanes, fma, units = vector_lanes(flags), has_fma(flags), fma_units(flags, vendor, family)
  per_cycle = lanes * (2 if fma else 1) * units
  cpuinfo_mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)]
  max_mhz = [khz / 1e3 for khz in cpufreq_max_khz]
  clock, clock_source = _ASSUMED_MHZ, "assumed"
  if cpuinfo_mhz or max_mhz:
    clock, clock_source = max((mhz, source) for mhzs, source in ((cpuinfo_mhz, "/proc/cpuinfo"),
                                                                  (max_mhz, "cpufreq max")) for mhz in mhzs)
  derived = cores * clock * 1e6 * per_cycle
  measured_wins = matmul_flops is not None and matmul_flops > derived
  return CpuPeak(model_name=field("model name") or field("Model") or "", vendor=vendor, family=family,
                 model=number("model"), cores=cores, lanes=lanes, fma=fma, fma_units=units,
                 flops_per_cycle=per_cycle, clock_mhz=clock, clock_source=clock_source, derived_flops=derived,
                 matmul_flops=matmul_flops, matmul_size=matmul_size if matmul_flops is not None else None,
                 peak_flops=matmul_flops if measured_wins else derived,
                 source="calibrated matmul" if measured_wins else "flags x clock")


def calibrated_matmul_flops(size: int = MATMUL_SIZE, calls: int = 5, budget_s: float = 0.25) -> float:
  """FLOP/s of the fastest of `calls` f32 (size x size) @ (size x size) matmuls, jitted on this process's CPUs.

  Runs on the first local CPU device (there is one on GPU and TPU hosts too). XLA:CPU runs a device's ops on
  one thread pool of the whole process, so with --xla_force_host_platform_device_count=N one device's matmul
  still uses every core: the rate is the host's. Stops after `budget_s` seconds of calls (at least one).
  """
  device = jax.local_devices(backend="cpu")[0]
  a = jax.device_put(np.random.default_rng(0).standard_normal((size, size), np.float32), device)
  compiled = jax.jit(jnp.dot).lower(a, a).compile()
  jax.block_until_ready(compiled(a, a))  # the first call starts the threads and allocates
  best, start = math.inf, time.perf_counter()
  for _ in range(calls):
    begin = time.perf_counter()
    jax.block_until_ready(compiled(a, a))
    end = time.perf_counter()
    best = min(best, end - begin)
    if end - start > budget_s:
      break
  return 2.0 * size ** 3 / best


def _affinity_cores() -> list[int]:
  try:
    return sorted(os.sched_getaffinity(0))
  except (AttributeError, OSError):  # not Linux
    return list(range(os.cpu_count() or 1))


@functools.cache
def cpu_peak() -> CpuPeak:
  """The f32 peak of the CPUs this process may run on (its affinity), derived once per process.

  Flags x clock (cpu_peak_from) against a short calibrated matmul (calibrated_matmul_flops, ~0.2 s including
  its compilation), the larger wins. LM_CPU_PEAK_CALIBRATE=0 skips the matmul; so does
  config.bench.peak_flops_per_device, which peak_flops_per_device returns without calling this.
  """
  try:
    with open("/proc/cpuinfo") as f:
      cpuinfo = f.read()
  except OSError:
    cpuinfo = ""
  cpus = _affinity_cores()
  khz = []
  for cpu in cpus:
    try:
      with open(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq") as f:
        khz.append(float(f.read()))
    except (OSError, ValueError):
      pass
  matmul = None
  if os.environ.get(CALIBRATE_ENV, "1").strip().lower() not in ("0", "false", "no", "off"):
    try:
      matmul = calibrated_matmul_flops()
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu)
      pass
  return cpu_peak_from(cpuinfo, len(cpus), khz, matmul, MATMUL_SIZE)


def cpu_peak_flops() -> float:
  """Peak f32 FLOP/s of this process's CPUs (cpu_peak)."""
  return cpu_peak().peak_flops


def cpu_peak_in_use(override: float | None = None) -> CpuPeak | None:
  """cpu_peak() when it is the MFU's peak (the devices are CPUs and no `override` is set), else None."""
  return None if override or jax.local_devices()[0].platform != "cpu" else cpu_peak()


def peak_flops_per_device(dtype: str = "float32", override: float | None = None) -> float:
  """Peak FLOP/s of one local device, from the table, cpu_peak() shared by the CPU devices, or `override`.

  An `override` is returned as is: no CPU calibration runs.
  """
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
