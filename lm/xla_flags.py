r"""XLA flag presets, set by `lm` in the environment before JAX starts its backends.

XLA reads its flags from environment variables once, when JAX creates its
first backend (the first `jax.devices()`, `jax.jit` call, array, ...):
`XLA_FLAGS` for the compiler inside jaxlib and its GPU plugin, and
`LIBTPU_INIT_ARGS` for libtpu. Setting them later has no effect, so
`python -m lm.main` calls `apply(config.xla.preset, config.xla.flags)` first
thing, and a notebook calls it in its first cell:

  import lm.xla_flags
  lm.xla_flags.apply("gpu")          # or "auto", "tpu", "none"; extra="--name=value ..."

Precedence, lowest to highest: the preset's flags < the extra flags
(`config.xla.flags`, e.g. to change one flag of the preset) < whatever the
environment variable already holds (a flag set in `XLA_FLAGS` by the user
wins over both, and the user's other flags are kept).

This module does not import JAX, and never starts a backend itself: importing
it, `resolve` and `apply` are safe before JAX initializes (`auto` looks at
device files and installed packages only).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import shutil
import sys
from typing import Mapping, MutableMapping

from lm.core.configs import ConfigPart, require
from lm.core.errors import ConfigError

XLA_FLAGS = "XLA_FLAGS"
LIBTPU_INIT_ARGS = "LIBTPU_INIT_ARGS"

# The combiners merge collectives into one up to this many bytes. With smaller thresholds an FSDP step
# issues one small all-gather / reduce-scatter per weight, each paying NCCL's launch latency and using
# little bandwidth. NVIDIA's JAX-Toolbox / MaxText GPU recipes scale the threshold with the GPU count
# (1 GiB / GPUs for all-gathers: 128 MiB on one 8-GPU node); one fixed 128 MiB is that node's value: a
# combined collective per few layers, and combined buffers small next to a 40-80 GiB GPU's activations.
_COMBINE_THRESHOLD_BYTES = str(128 * 1024 * 1024)

PRESETS: dict[str, dict[str, str]] = {
    "none": {},
    # The JAX GPU performance tips / NVIDIA JAX-Toolbox / MaxText flags for multi-GPU training. Every one is
    # checked to parse with this jaxlib (tests/test_xla_flags.py): XLA aborts the process on an unknown flag.
    # Not set: --xla_gpu_enable_async_all_gather / _async_reduce_scatter / _async_all_reduce (older
    # JAX-Toolbox images set them; jaxlib 0.10 rejects them as unknown: collectives are async by default).
    "gpu": {
        # Schedules collectives (FSDP's all-gathers and reduce-scatters, data parallelism's all-reduces)
        # to overlap with compute; the one flag NVIDIA's JAX containers set by default.
        "xla_gpu_enable_latency_hiding_scheduler": "true",
        # Fewer, larger collectives (see _COMBINE_THRESHOLD_BYTES).
        "xla_gpu_all_reduce_combine_threshold_bytes": _COMBINE_THRESHOLD_BYTES,
        "xla_gpu_all_gather_combine_threshold_bytes": _COMBINE_THRESHOLD_BYTES,
        "xla_gpu_reduce_scatter_combine_threshold_bytes": _COMBINE_THRESHOLD_BYTES,
        # Inside a scanned layer loop (model.scan_layers=True), start layer i+1's all-gather / finish layer
        # i-1's reduce-scatter or all-reduce during layer i's compute.
        "xla_gpu_enable_pipelined_all_gather": "true",
        "xla_gpu_enable_pipelined_reduce_scatter": "true",
        "xla_gpu_enable_pipelined_all_reduce": "true",
        # Unrolls while loops (the layer scan) by two so collectives can overlap across the loop boundary.
        "xla_gpu_enable_while_loop_double_buffering": "true",
    },
    # MaxText's TPU flags: collectives fused with and overlapped by compute. libtpu parses these (not
    # jaxlib, which rejects xla_tpu_* flags in XLA_FLAGS as unknown); not checked here (no TPU).
    "tpu": {
        "xla_tpu_enable_async_collective_fusion": "true",
        "xla_tpu_enable_async_collective_fusion_fuse_all_gather": "true",
        "xla_tpu_enable_async_collective_fusion_multiple_steps": "true",
        "xla_tpu_overlap_compute_collective_tc": "true",
        "xla_enable_async_all_gather": "true",
    },
}
# The environment variable each preset's flags go to.
PRESET_ENV: dict[str, str] = {"none": XLA_FLAGS, "gpu": XLA_FLAGS, "tpu": LIBTPU_INIT_ARGS}
CHOICES = ("auto", *PRESETS)


@dataclasses.dataclass(frozen=True)
class AppliedFlags:
  """What `apply` did."""

  requested: str  # the preset asked for ("auto" included)
  preset: str  # the preset used ("auto" resolved to gpu / tpu / none)
  env: dict[str, str]  # environment variable -> its value now, for each variable lm set
  flags: dict[str, str | None]  # the flags lm set (preset + extra), name -> value (None: `--name` alone)
  overridden: dict[str, str | None]  # flags lm would have set that the environment already sets otherwise,
  #                                    name -> the environment's value (which is kept)

  def summary(self) -> str:
    preset = self.preset if self.requested == self.preset else f"{self.preset} (from {self.requested})"
    parts = [f"XLA flag preset {preset}"]
    parts += [f"{name}={value!r}" for name, value in self.env.items()] or ["no flags set"]
    if self.overridden:
      parts.append("kept from the environment: " + ", ".join(
          _format(name, value) for name, value in self.overridden.items()))
    return "; ".join(parts)


_last_applied: AppliedFlags | None = None  # by apply() on os.environ, for describe()


def _error(message: str) -> Exception:
  return ConfigError(message)


def _format(name: str, value: str | None) -> str:
  return f"--{name}" if value is None else f"--{name}={value}"


def _split(token: str) -> tuple[str, str | None]:
  name, sep, value = token.lstrip("-").partition("=")
  return name, (value if sep else None)


def parse(flags: str) -> dict[str, str | None]:
  """`--a=b --c` -> {"a": "b", "c": None}; a token that is not a `--flag` raises ConfigError."""
  parsed: dict[str, str | None] = {}
  for token in flags.split():
    name, value = _split(token)
    if not token.startswith("--") or not name:
      raise _error(f"config.xla.flags={flags!r}: {token!r} is not an XLA flag. Write the extra flags as "
                   "'--name=value --other=value' (e.g. --xla_gpu_enable_latency_hiding_scheduler=false).")
    parsed[name] = value
  return parsed


def _env_flags(value: str) -> dict[str, str | None]:
  """The flags already in an environment variable (tokens that are not `-flag`s are kept but not read)."""
  return dict(_split(token) for token in value.split() if token.startswith("-"))


def _nvidia_gpu_visible(environ: Mapping[str, str]) -> bool:
  if environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
    return False
  driver = os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None
  return driver and any(_installed(name) for name in (
      "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"))


def _tpu_visible() -> bool:
  # TPU chips show up as /dev/accel* (v2-v4) or VFIO groups (v5+); JAX needs libtpu to use them.
  chips = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
  return chips and _installed("libtpu")


def _installed(module: str) -> bool:
  """Whether `module` can be imported, without importing it (only a namespace parent like jax_plugins)."""
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def detect(environ: Mapping[str, str] | None = None) -> str:
  """The preset `auto` stands for here: "gpu" with an NVIDIA GPU and JAX's CUDA plugin, "tpu" on a TPU
  VM with libtpu, else "none". Looks at files and packages only; starts nothing."""
  environ = os.environ if environ is None else environ
  platforms = {p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()}
  if (not platforms or "tpu" in platforms) and _tpu_visible():
    return "tpu"
  if (not platforms or platforms & {"cuda", "gpu"}) and _nvidia_gpu_visible(environ):
    return "gpu"
  return "none"


def preset_name(preset: str, environ: Mapping[str, str] | None = None) -> str:
  """`preset` checked, with "auto" resolved by `detect`."""
  if preset not in CHOICES:
    raise _error(f"config.xla.preset={preset!r} is not an XLA flag preset: pick one of {', '.join(CHOICES)} "
                 "(auto: gpu on an NVIDIA GPU, tpu on a TPU VM, none elsewhere).")
  return detect(environ) if preset == "auto" else preset


def _target(name: str, preset: str) -> str:
  """The environment variable an extra flag goes to: its preset's for a preset flag, libtpu's for
  xla_tpu_* flags (jaxlib rejects those), XLA_FLAGS otherwise."""
  if name in PRESETS[preset]:
    return PRESET_ENV[preset]
  return LIBTPU_INIT_ARGS if name.startswith("xla_tpu_") else XLA_FLAGS


def _resolve(preset: str, extra: str, environ: Mapping[str, str]
             ) -> tuple[str, dict[str, str], dict[str, str | None], dict[str, str | None]]:
  name = preset_name(preset, environ)
  wanted: dict[str, dict[str, str | None]] = {}  # env var -> flags lm sets there, preset then extra
  for flag, value in PRESETS[name].items():
    wanted.setdefault(PRESET_ENV[name], {})[flag] = value
  for flag, value in parse(extra).items():  # replaces the preset's flag of the same name
    wanted.setdefault(_target(flag, name), {})[flag] = value
  values: dict[str, str] = {}
  applied: dict[str, str | None] = {}
  overridden: dict[str, str | None] = {}
  for var, flags in wanted.items():
    if not flags:
      continue
    current = environ.get(var, "")
    users = _env_flags(current)
    ours = []
    for flag, value in flags.items():
      if flag in users:  # the user's own setting wins
        if users[flag] != value:
          overridden[flag] = users[flag]
        continue
      ours.append(_format(flag, value))
      applied[flag] = value
    # Ours first, then the user's string unchanged; no flag appears twice.
    values[var] = " ".join(ours + ([current.strip()] if current.strip() else []))
  return name, values, applied, overridden


def resolve(preset: str, extra: str = "", environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """Environment variable -> the value it should have: the preset's flags, then `extra`'s
  (`--name=value ...`, replacing the preset's flag of that name), with any flag the variable already
  sets left as the user set it, and the user's other flags kept. Only variables lm sets appear."""
  return _resolve(preset, extra, os.environ if environ is None else environ)[1]


def backends_started() -> bool:
  """Whether JAX has created its backends (XLA has read its flags); never imports or starts JAX."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  started = getattr(xla_bridge, "backends_are_initialized", None)
  if started is not None:
    return bool(started())
  return bool(getattr(xla_bridge, "_backends", None))


def apply(preset: str = "auto", extra: str = "", environ: MutableMapping[str, str] | None = None
          ) -> AppliedFlags:
  """Sets the preset's flags (and `extra`'s) in the environment, under the precedence of `resolve`.

  Must run before JAX creates its backends: raises ConfigError if they already exist and the flags
  would change (the same call again is a no-op).
  """
  global _last_applied
  environ = os.environ if environ is None else environ
  name, values, applied, overridden = _resolve(preset, extra, environ)
  changes = {var: value for var, value in values.items() if environ.get(var, "").split() != value.split()}
  if changes and environ is os.environ and backends_started():
    raise _error(
        f"XLA flags ({', '.join(f'{var}={value!r}' for var, value in changes.items())}) set after JAX started "
        "its backends would have no effect: XLA reads them once. Call lm.xla_flags.apply(...) before the first "
        "jax.devices(), jax.jit or array (e.g. in a notebook's first cell), and restart the kernel / process "
        "to apply them now.")
  environ.update(changes)
  result = AppliedFlags(requested=preset, preset=name, env=values, flags=applied, overridden=overridden)
  if environ is os.environ:
    _last_applied = result
  return result


def describe(environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """The effective flags, for recording next to benchmark figures: XLA_FLAGS, LIBTPU_INIT_ARGS (as in the
  environment, "" when unset) and the preset `apply` last used in this process ("" if not called)."""
  environ = os.environ if environ is None else environ
  return {"xla_preset": _last_applied.preset if _last_applied else "",
          XLA_FLAGS: environ.get(XLA_FLAGS, ""), LIBTPU_INIT_ARGS: environ.get(LIBTPU_INIT_ARGS, "")}


# -- the xla part of the run config ----------------------------------------------------------------------
# Set in XLA_FLAGS / LIBTPU_INIT_ARGS by `lm.main` before JAX starts; a flag already in those environment
# variables wins over both fields.
CONFIG_FIELDS = {
    "xla.preset": "auto",  # auto | gpu | tpu | none; auto: gpu on an NVIDIA GPU, tpu on a TPU VM, else none
    "xla.flags": "",  # extra "--name=value --name2=value2" flags; one of the preset's name replaces it
}


def validate_config(config, mode: str) -> None:
  del mode
  require(config.xla.preset in CHOICES, f"config.xla.preset={config.xla.preset!r} is not one of {CHOICES}.")
  parse(config.xla.flags)  # ConfigError naming a malformed flag


CONFIG = ConfigPart("lm.xla_flags", CONFIG_FIELDS, validate_config)
