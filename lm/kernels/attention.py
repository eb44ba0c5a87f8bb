"""Fused self-attention on XLA:CPU (`model.attention_impl=cpu`): `attention_cpu.cc` behind a custom VJP.

`attention(query, key, value, causal)` computes what
`jax.nn.dot_product_attention(query, key, value, is_causal=causal, implementation="xla")` computes, for
float32 [batch, length, heads, head_dim] inputs (key and value may have fewer heads: grouped-query
attention), in one XLA FFI call forward and one backward. The forward saves each row's log-sum-exp, and the
backward recomputes the probabilities from it (FlashAttention's backward), so nothing of size length² is kept
between them.

Under a mesh (`jax.set_mesh`, as the train step traces), the call runs per shard through `jax.shard_map`:
rows split by the logical `batch` axis and heads by `heads`, as the model's constraints already place them.
A mesh that splits `length` or `kv` cannot run it (`mesh_problem`), nor can other dtypes, masks or devices:
`problem` names the reason, and `model.attention_impl=auto` then uses XLA's attention.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lm import kernels

NAME = "attention_cpu"
TARGETS = ("LmAttentionForward", "LmAttentionBackward")
AXES = ("batch", "length", "heads", "kv")
# A tile holds its length x length scores, and the backward three such buffers per thread: 4096 tokens take
# 3 x 64 MiB per thread. Longer sequences are left to XLA's attention.
MAX_LENGTH = 4096


def problem(platform: str, dtype: str, length: int) -> str | None:
  """Why the fused CPU attention cannot run sequences of `length` in compute `dtype` on `platform`; None if it
  can."""
  reason = kernels.platform_problem("fused attention", platform, dtype)
  if reason is None and length > MAX_LENGTH:
    reason = (f"lm's fused CPU attention holds each head's length x length scores, and sequences of {length} "
              f"exceed its {MAX_LENGTH}")
  return reason or kernels.load_problem(NAME, TARGETS)


def mesh_problem(shape: tuple[int, ...]) -> str | None:
  """Why the active mesh's layout of attention's [..., length, heads, head_dim] inputs of `shape` cannot run the
  kernel per shard; None if it can."""
  spec = kernels.mesh_spec(AXES)
  if spec is None:
    return None
  split = [name for name, axis in zip(AXES, spec) if axis is not None and name in ("length", "kv")]
  if split:
    return (f"the sharding rules split attention's {' and '.join(split)} axis over the mesh, and the fused CPU "
            "attention needs whole sequences and head dimensions on each device")
  return kernels.split_problem(spec, shape)


def _call(name, outputs, *args, causal: bool, scale: float):
  return jax.ffi.ffi_call(f"lm_{name}", outputs, vmap_method="broadcast_all")(
      *args, causal=bool(causal), scale=np.float32(scale))


def _forward(query, key, value, causal):
  kernels.load(NAME, TARGETS)
  *batch, length, heads, _ = query.shape
  lse_shape = (*batch, heads, length)
  out, lse = _call("LmAttentionForward", (jax.ShapeDtypeStruct(query.shape, query.dtype),
                                           jax.ShapeDtypeStruct(lse_shape, query.dtype)),
                   query, key, value, causal=causal, scale=1 / math.sqrt(query.shape[-1]))
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(query, key, value, causal):
  return _forward(query, key, value, causal)[0]


def _attention_fwd(query, key, value, causal):
  out, lse = _forward(query, key, value, causal)
  return out, (query, key, value, out, lse)


def _attention_bwd(causal, residuals, dout):
  query, key, value, out, lse = residuals
  return _call("LmAttentionBackward", (jax.ShapeDtypeStruct(query.shape, query.dtype),
                                       jax.ShapeDtypeStruct(key.shape, key.dtype),
                                       jax.ShapeDtypeStruct(value.shape, value.dtype)),
               query, key, value, out, lse, dout.astype(query.dtype), causal=causal,
               scale=1 / math.sqrt(query.shape[-1]))


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, causal: bool = True) -> jax.Array:
  """Softmax attention of [..., length, heads, head_dim] float32 queries over keys/values of the same length.

  `causal`: query i sees keys 0..i. Key and value may have fewer heads than the query (a multiple of them).
  """
  if query.dtype != jnp.float32 or key.dtype != jnp.float32 or value.dtype != jnp.float32:
    raise TypeError(f"lm's fused CPU attention takes float32 inputs, not {query.dtype}/{key.dtype}/{value.dtype}")
  if key.shape != value.shape or key.shape[:-2] != query.shape[:-2] or key.shape[-1] != query.shape[-1]:
    raise ValueError(f"key {key.shape} and value {value.shape} must match query {query.shape} but for the heads")
  if query.shape[-2] % key.shape[-2]:
    raise ValueError(f"the query's {query.shape[-2]} heads must be a multiple of the key's {key.shape[-2]}")
  reason = mesh_problem(query.shape) or mesh_problem(key.shape)
  if reason:
    raise ValueError(reason)
  spec = kernels.mesh_spec(AXES)
  return kernels.per_shard(lambda q, k, v: _attention(q, k, v, causal), spec, (spec, spec, spec), spec)(
      query, key, value)
