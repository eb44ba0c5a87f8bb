"""Weight-only int8 post-training quantization of a Transformer LM's matmul weights, through qwix.

    quantized = quantize_params(params, "int8")     # the same tree; each projection kernel a qwix.QArray
    logits = TransformerLM(cfg).apply({"params": quantized}, tokens)

What is quantized: every `Projection` kernel (attention query/key/value/out,
MLP up/gate/down, the untied output projection `unembed`), to int8 with one
float32 scale per output channel (symmetric absmax: qwix's
`scale = absmax / 127.5`, values rounded and saturated to [-128, 127], so
each weight is off by at most scale / 2). Embeddings, the position table,
norms and biases stay in float: they are small, and the token and position
tables are gathered rather than multiplied.

Why qwix's arrays and not its model interception (`qwix.PtqProvider` with
`qwix.quantize_model`): PTQ there records each weight in the shape its matmul
sees, and `Projection` reshapes 3-D kernels ([embed, heads, head_dim],
[heads, head_dim, embed]) to 2-D before its one GEMM. qwix then stores a 2-D
quantized weight under the 3-D parameter's logical axis names and stops
(`AssertionError: shape=(64, 64) spec=('embed', 'heads', 'kv')` in
`flax_util.update_sharding`), and a stored weight may not be reshaped again
(`WithAux.reshape`). So the quantized weights are `qwix.QArray`s made here, in
the kernels' own shapes (scales on the output axes, the layer axis too for
scanned layers), and `Projection` multiplies by them with `qwix.dot_general`.
docs/quantization.md has the figures and the limits.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from lm.core.configs import ConfigPart
from lm.core.errors import ConfigError

# Values of the `*.quantize` config fields (eval, sample, serve, export): "none" keeps the float weights.
QUANTIZE_CHOICES = ("none", "int8")
QTYPE = jnp.int8
SCALE_DTYPE = jnp.float32
# A Projection's module name -> how many of its kernel's leading axes are inputs (lm.models.layers):
# attention's `out` contracts [heads, head_dim]; every other projection one axis.
MATMUL_IN_AXES = {"query": 1, "key": 1, "value": 1, "out": 2, "up": 1, "gate": 1, "down": 1, "unembed": 1}
STACKED = "layers"  # the scanned blocks' parameters carry a leading layer axis (model.scan_layers)


def check_choice(field: str, value: Any) -> None:
  """ConfigError naming `field` unless `value` is a scheme this module implements."""
  if value not in QUANTIZE_CHOICES:
    raise ConfigError(f"config.{field}={value!r} is not one of {QUANTIZE_CHOICES}: lm quantizes weights to int8 "
                      f"with per-channel scales (docs/quantization.md). Fix: --config.{field}=int8, or none for the "
                      "float weights.")


def is_quantized(leaf: Any) -> bool:
  return isinstance(leaf, qwix.QArray)


def _channel_axes(path: tuple[str, ...], shape: tuple[int, ...] | None, field: str) -> list[int]:
  """The axes of the kernel at `path` that get their own scales: its outputs, and a scanned layer axis.

  shape None (a tree of shardings): the module is checked, the shape is not.
  """
  where = "/".join(path)
  module = path[-2] if len(path) >= 2 else ""
  if module not in MATMUL_IN_AXES:
    raise ConfigError(f"config.{field}=int8 cannot split the weight {where} into input and output "
                      f"channels: it quantizes the Transformer LM's projections ({', '.join(MATMUL_IN_AXES)}). "
                      f"Fix: quantize a language model run, or set --config.{field}=none.")
  lead = 1 if STACKED in path[:-1] else 0
  num_in = MATMUL_IN_AXES[module]
  if shape is None:
    return []
  if len(shape) <= lead + num_in or 0 in shape:
    raise ConfigError(f"config.{field}=int8 cannot split the weight {where} {list(shape)} into {num_in} input "
                      f"axis(es) and output channels, each of at least one element. Fix: quantize a model whose "
                      f"projections have non-empty inputs and outputs, or set --config.{field}=none.")
  return list(range(lead)) + list(range(lead + num_in, len(shape)))


def _map_kernels(params: Any, fn: Callable[[Any, list[int]], Any], field: str, arrays: bool = True) -> Any:
  """`params` with fn(kernel, channel axes) in place of each projection kernel; other leaves as they are."""

  def walk(node: Any, path: tuple[str, ...]) -> Any:
    if hasattr(node, "items") and not is_quantized(node):
      return {key: walk(value, path + (str(key),)) for key, value in node.items()}
    if path and path[-1] == "kernel" and not is_quantized(node):
      return fn(node, _channel_axes(path, tuple(np.shape(node)) if arrays else None, field))
    return node

  return walk(params, ())


def quantize_params(params: Any, scheme: str = "int8", *, field: str = "quantize") -> Any:
  """The params with every projection kernel as a `qwix.QArray` (int8 values, float32 scale per output channel).

  `params` is a TransformerLM's parameter tree (or a tree holding several,
  e.g. a DPO run's policy and reference), unboxed; "none" returns it as is.
  Kernels already quantized are kept. `field` is the config field named in
  errors (a kernel of an unknown module, or one with an empty axis).
  """
  check_choice(field, scheme)
  if scheme == "none":
    return params

  def quantize(kernel: Any, channels: list[int]) -> qwix.QArray:
    return qwix.quantize(jnp.asarray(kernel, jnp.float32), QTYPE, channelwise_axes=channels,
                         scale_dtype=SCALE_DTYPE)

  quantize = jax.jit(quantize, static_argnums=1)
  return _map_kernels(params, lambda kernel, channels: quantize(kernel, tuple(channels)), field)


def dequantize_params(params: Any) -> Any:
  """Float32 params back from `quantize_params`' (each QArray dequantized: values x scales)."""
  return jax.tree.map(lambda leaf: qwix.dequantize(leaf) if is_quantized(leaf) else leaf, params,
                      is_leaf=is_quantized)


def quantized_shardings(shardings: Any, field: str = "quantize") -> Any:
  """Shardings for `quantize_params`' tree, from the float params' (e.g. a jitted step's in_shardings):
  the int8 values are laid out as their float kernels were, the small scales replicated."""

  def sharding(kernel: jax.sharding.NamedSharding, channels: list[int]) -> qwix.QArray:
    del channels
    replicated = jax.sharding.NamedSharding(kernel.mesh, jax.sharding.PartitionSpec())
    return qwix.QArray(kernel, replicated, None, QTYPE)

  return _map_kernels(shardings, sharding, field, arrays=False)


def projection_matmul(x2d: jax.Array, kernel: qwix.QArray, in_size: int, out_size: int, dtype: Any) -> jax.Array:
  """x [rows, in] @ a quantized kernel (any shape of in_size inputs and out_size outputs) -> [rows, out].

  The kernel is reshaped as a float one would be (its scales follow the
  output axes), then multiplied by qwix: with float activations it
  dequantizes the int8 values and XLA fuses that into the matmul's input.
  """
  kernel = kernel.astype(dtype).reshape(in_size, out_size)
  return qwix.dot_general(x2d, kernel, (((1,), (0,)), ((), ())))


def param_bytes(params: Any) -> int:
  """Bytes the parameters take as stored: int8 values and float32 scales of quantized kernels, the rest as is."""
  return int(sum(np.dtype(leaf.dtype).itemsize * int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)))


def float_bytes(params: Any, dtype: Any) -> int:
  """Bytes of the same model with every weight in `dtype` (float32 or bfloat16): for comparison."""
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params, is_leaf=is_quantized))
  return int(count * np.dtype(dtype).itemsize)


def matmul_bytes(params: Any) -> tuple[int, int]:
  """(bytes, parameter count) of the projection kernels alone: int8 + scales when quantized, else as stored."""
  total, count = 0, 0
  for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
    if is_quantized(leaf):
      total += param_bytes(leaf)
      count += int(np.prod(leaf.shape))
  return total, count


def summary(params: Any, scheme: str) -> dict[str, Any]:
  """What logs and JSON outputs say about a model's weights: its scheme and bytes, and float32/bfloat16's."""
  return {"quantize": scheme, "param_bytes": param_bytes(params),
          "param_bytes_float32": float_bytes(params, jnp.float32),
          "param_bytes_bfloat16": float_bytes(params, jnp.bfloat16)}


def validate(config: Any, mode: str) -> None:
  del mode
  check_choice("eval.quantize", config.eval.quantize)


# `eval.quantize` is declared here rather than with the other eval.* fields (lm.data), which may not import
# lm.models; sample.quantize, serve.quantize and export.quantize sit with their groups.
CONFIG = ConfigPart("lm.models.quantize", {"eval.quantize": "none"}, validate)  # int8: evaluate int8 weights
