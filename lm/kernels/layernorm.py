"""LayerNorm on XLA:CPU (`model.norm_impl=cpu`): `layernorm_cpu.cc` behind a custom VJP.

`layer_norm(x, scale, bias, eps)` computes what flax's `nn.LayerNorm(epsilon=eps)` computes (mean and
E[x²] − mean² variance, then `(x − mean) · rsqrt(var + eps) · scale + bias`) for float32 inputs, in one XLA
FFI call forward and one backward, the backward returning the input's and both parameters' gradients.

Under a mesh the calls run per shard through `jax.shard_map`, rows split as the logical `axes` of `x` place
them (`batch`, `length`), and the parameter gradients are summed over the shards (`psum`). A mesh that
splits the normalized (last) axis cannot run it: `mesh_problem` says so and the model uses flax's LayerNorm.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lm import kernels

NAME = "layernorm_cpu"
TARGETS = ("LmLayerNormForward", "LmLayerNormBackward")
AXES = ("batch", "length", "embed")


def problem(platform: str, dtype: str) -> str | None:
  """Why the LayerNorm kernel cannot run a model of compute `dtype` on `platform`; None if it can."""
  return kernels.platform_problem("LayerNorm", platform, dtype) or kernels.load_problem(NAME, TARGETS)


def mesh_problem(axes: tuple[str, ...], shape: tuple[int, ...]) -> str | None:
  """Why the active mesh's layout of `x` (logical `axes`, `shape`) cannot run the kernel per shard; None if it
  can."""
  spec = kernels.mesh_spec(axes)
  if spec is not None and spec[-1] is not None:
    return (f"the sharding rules split the normalized axis ({axes[-1]}) over the mesh, and the LayerNorm kernel "
            "needs whole rows on each device")
  return kernels.split_problem(spec, shape)


def _mesh_axes(spec: PartitionSpec) -> tuple[str, ...]:
  names = []
  for entry in spec:
    names.extend(entry if isinstance(entry, tuple) else [entry] if entry else [])
  return tuple(names)


def _forward(x, scale, bias, eps):
  kernels.load(NAME, TARGETS)
  rows = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
  return jax.ffi.ffi_call("lm_LmLayerNormForward", (jax.ShapeDtypeStruct(x.shape, x.dtype), rows, rows),
                          vmap_method="broadcast_all")(x, scale, bias, eps=np.float32(eps))


def _backward(x, scale, mean, rstd, dy):
  return jax.ffi.ffi_call("lm_LmLayerNormBackward", (jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                     jax.ShapeDtypeStruct(scale.shape, scale.dtype),
                                                     jax.ShapeDtypeStruct(scale.shape, scale.dtype)),
                          vmap_method="broadcast_all")(x, scale, mean, rstd, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, eps, spec):
  return _layer_norm_fwd(x, scale, bias, eps, spec)[0]


def _layer_norm_fwd(x, scale, bias, eps, spec):
  rows = None if spec is None else PartitionSpec(*spec[:-1])
  call = kernels.per_shard(lambda x, s, b: _forward(x, s, b, eps), spec, (spec, PartitionSpec(), PartitionSpec()),
                  (spec, rows, rows))
  y, mean, rstd = call(x, scale, bias)
  return y, (x, scale, mean, rstd)


def _layer_norm_bwd(eps, spec, residuals, dy):
  del eps
  x, scale, mean, rstd = residuals

  def backward(x, scale, mean, rstd, dy):
    dx, dscale, dbias = _backward(x, scale, mean, rstd, dy)
    if spec is not None and _mesh_axes(spec):
      dscale, dbias = jax.lax.psum((dscale, dbias), _mesh_axes(spec))
    return dx, dscale, dbias

  rows = None if spec is None else PartitionSpec(*spec[:-1])
  call = kernels.per_shard(backward, spec, (spec, PartitionSpec(), rows, rows, spec),
                  (spec, PartitionSpec(), PartitionSpec()))
  return call(x, scale, mean, rstd, dy.astype(x.dtype))


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float,
               axes: tuple[str, ...] = AXES) -> jax.Array:
  """flax's LayerNorm over the last axis of float32 `x` [..., C] with `scale` and `bias` [C] (None: no bias).

  `axes`: the logical names of x's axes, for the per-shard call under a mesh.
  """
  if x.dtype != jnp.float32 or scale.dtype != jnp.float32:
    raise TypeError(f"lm's LayerNorm kernel takes float32, not x {x.dtype} and scale {scale.dtype}")
  if scale.shape != x.shape[-1:] or (bias is not None and bias.shape != scale.shape):
    raise ValueError(f"scale {scale.shape} and bias must be [{x.shape[-1]}] for x {x.shape}")
  reason = mesh_problem(axes, x.shape)
  if reason:
    raise ValueError(reason)
  spec = kernels.mesh_spec(axes)
  if spec is not None and len(spec) != x.ndim:
    raise ValueError(f"x {x.shape} has {x.ndim} axes and its logical axes are {axes}")
  return _layer_norm(x, scale, jnp.zeros_like(scale) if bias is None else bias, float(eps), spec)
