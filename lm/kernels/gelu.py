"""The exact GELU on XLA:CPU (`model.gelu_impl=cpu`): `gelu_cpu.cc` behind a custom VJP.

`gelu(x)` computes `x/2 · (1 + erf(x/√2))` (PyTorch's formula, `lm.models.layers.gelu`'s exact form) for
float32 `x`, one XLA FFI call forward and one backward; the backward recomputes erf and exp from `x`, so
nothing but `x` is kept between them. Under a mesh each device computes its own shard (`jax.shard_map`,
as the logical `axes` of `x` place it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lm import kernels

NAME = "gelu_cpu"
TARGETS = ("LmGeluForward", "LmGeluBackward")
AXES = ("batch", "length", "mlp")


def problem(platform: str, dtype: str) -> str | None:
  """Why the GELU kernel cannot run a model of compute `dtype` on `platform`; None if it can."""
  return kernels.platform_problem("GELU", platform, dtype) or kernels.load_problem(NAME, TARGETS)


def mesh_problem(axes: tuple[str, ...], shape: tuple[int, ...]) -> str | None:
  """Why the active mesh's layout of `x` (logical `axes`, `shape`) cannot run the kernel per shard; None if it
  can."""
  return kernels.split_problem(kernels.mesh_spec(axes), shape)


def _call(target, x, *args):
  kernels.load(NAME, TARGETS)
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="broadcast_all")(x, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gelu(x, spec):
  return kernels.per_shard(lambda x: _call("lm_LmGeluForward", x), spec, (spec,), spec)(x)


def _gelu_fwd(x, spec):
  return _gelu(x, spec), x


def _gelu_bwd(spec, x, dy):
  backward = kernels.per_shard(lambda x, dy: _call("lm_LmGeluBackward", x, dy), spec, (spec, spec), spec)
  return (backward(x, dy.astype(x.dtype)),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


def gelu(x: jax.Array, axes: tuple[str, ...] = AXES) -> jax.Array:
  """The exact GELU of float32 `x`; `axes`: the logical names of its axes, for the per-shard call under a mesh."""
  if x.dtype != jnp.float32:
    raise TypeError(f"lm's GELU kernel takes float32, not {x.dtype}")
  spec = kernels.mesh_spec(axes)
  if spec is not None and len(spec) != x.ndim:
    raise ValueError(f"x {x.shape} has {x.ndim} axes and its logical axes are {axes}")
  reason = mesh_problem(axes, x.shape)
  if reason:
    raise ValueError(reason)
  return _gelu(x, spec)
