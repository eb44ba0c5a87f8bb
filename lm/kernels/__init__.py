"""lm's own XLA:CPU kernels: C++ sources compiled on first use, cached, and registered as XLA FFI targets.

A kernel is built for the CPU it runs on (`-march=native`) with the machine's C++ compiler (`$CXX`, else
`g++`, else `c++`) against the XLA FFI headers jaxlib ships (`jax.ffi.include_dir()`) and this folder's
shared header (`common.h`). The shared library is cached in `$LM_KERNEL_CACHE` (default
`~/.cache/lm/kernels`) under a name that hashes the sources, the compiler command, jaxlib's version and the CPU's model and flags, so a change to any of them builds afresh
and processes that share a cache (pytest -n 2, a multi-process launch) never load a half-written file:
each builds into a temporary name and renames it into place.

`load(name)` returns the loaded library or raises `KernelUnavailable` with the reason (no compiler, a failed
build); callers that can run without the kernel (`model.attention_impl=auto`) fall back and say why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jaxlib
from jax.sharding import PartitionSpec

SOURCE_DIR = Path(__file__).resolve().parent
# -fopenmp-simd: the `#pragma omp simd` reductions vectorize without -ffast-math (no OpenMP runtime is
# linked); -fno-math-errno lets min/max/floor vectorize. Float results otherwise follow IEEE rules.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno")


class KernelUnavailable(RuntimeError):
  """The kernel cannot be built or loaded here; the message says why and what to do."""


def compiler() -> str | None:
  for candidate in (os.environ.get("CXX"), "g++", "c++"):
    if candidate and shutil.which(candidate):
      return shutil.which(candidate)
  return None


def _cpu_signature() -> str:
  """The CPU's model name and flags (what -march=native compiles for)."""
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return os.uname().machine
  lines = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags")]
  return "\n".join(sorted(set(lines)))


def cache_dir() -> Path:
  return Path(os.environ.get("LM_KERNEL_CACHE") or Path.home() / ".cache" / "lm" / "kernels")


def build(name: str) -> Path:
  """Compiles `name`.cc (or reuses the cached build) and returns the shared library's path."""
  source = SOURCE_DIR / f"{name}.cc"
  cxx = compiler()
  if cxx is None:
    raise KernelUnavailable(f"no C++ compiler to build lm's {name} kernel (looked for $CXX, g++, c++); install "
                            "one (apt-get install g++) or set model.attention_impl=xla")
  command = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{SOURCE_DIR}", str(source)]
  headers = [path.read_text() for path in sorted(SOURCE_DIR.glob("*.h"))]
  key = hashlib.sha256("\0".join([source.read_text(), *headers, *command, jaxlib.__version__,
                                   _cpu_signature()]).encode())
  target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    partial = Path(tmp) / target.name
    result = subprocess.run([*command, "-o", str(partial)], capture_output=True, text=True)
    if result.returncode:
      raise KernelUnavailable(f"building lm's {name} kernel failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
    os.replace(partial, target)
  return target


@functools.cache
def load(name: str, targets: tuple[str, ...]) -> ctypes.CDLL:
  """Builds and loads `name`.cc, and registers each symbol of `targets` as the XLA:CPU FFI target `lm_<symbol>`."""
  library = ctypes.cdll.LoadLibrary(str(build(name)))
  for symbol in targets:
    jax.ffi.register_ffi_target(f"lm_{symbol}", jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return library


@functools.cache
def load_problem(name: str, targets: tuple[str, ...]) -> str | None:
  """Why `name`.cc cannot be built or loaded on this machine (cached per process); None once it is loaded."""
  try:
    load(name, targets)
  except (KernelUnavailable, OSError) as error:
    return str(error)
  return None


def platform_problem(what: str, platform: str, dtype: str) -> str | None:
  """Why lm's `what` kernel (float32, XLA:CPU) cannot run compute `dtype` on `platform`; None if it can."""
  if platform != "cpu":
    return f"lm's {what} kernel is for XLA:CPU, and this run's devices are {platform}"
  if dtype != "float32":
    return f"lm's {what} kernel takes float32, and model.dtype={dtype}; set model.dtype=float32"
  return None


def mesh_spec(axes: tuple[str, ...]) -> PartitionSpec | None:
  """The mesh axes of an activation with logical `axes` under the active mesh (`jax.set_mesh`) and logical
  rules, one entry per axis; None without a mesh of several devices (the kernel then runs as one call)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  spec = tuple(nn.logical_to_mesh_axes(axes))
  return PartitionSpec(*(spec + (None,) * (len(axes) - len(spec))))


def split_problem(spec: PartitionSpec | None, shape: tuple[int, ...]) -> str | None:
  """Why an array of `shape` cannot be split over the active mesh as `spec` says (an axis the mesh axes'
  devices do not divide: a per-example vmap's batch of 1, say); None if it can, or without a mesh."""
  if spec is None:
    return None
  sizes = dict(zip(jax.sharding.get_abstract_mesh().axis_names, jax.sharding.get_abstract_mesh().axis_sizes))
  for size, entry in zip(shape, spec):
    names = entry if isinstance(entry, tuple) else (entry,) if entry else ()
    devices = 1
    for name in names:
      devices *= sizes[name]
    if size % devices:
      return (f"an axis of {size} of the activations {tuple(shape)} does not split over the {devices} devices of "
              f"mesh axes {names} (a per-example vmap's batch of 1?), and the kernel runs on whole shards")
  return None


def per_shard(fn, spec: PartitionSpec | None, in_specs, out_specs):
  """`fn` run on each device's shard (`jax.shard_map`) under a mesh, or `fn` itself without one (spec None)."""
  if spec is None:
    return fn
  return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)
