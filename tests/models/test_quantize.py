"""int8 weights (lm.models.quantize): the per-channel error bound, logits and decoding close to float, the bytes,
and the weights the scheme refuses."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from hypothesis import given, settings
from hypothesis import strategies as st

from lm.core.errors import ConfigError
from lm.models import TransformerConfig, TransformerLM
from lm.models import quantize


@st.composite
def kernels(draw):
  """A projection kernel of random shape (1-2 input axes, 1-2 output axes, maybe stacked over layers) and
  values, with one output channel all zeros."""
  module = draw(st.sampled_from(["query", "out", "up", "down", "unembed"]))
  stacked = draw(st.booleans()) and module != "unembed"
  num_in = quantize.MATMUL_IN_AXES[module]
  in_shape = tuple(draw(st.lists(st.integers(1, 6), min_size=num_in, max_size=num_in)))
  out_shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=2)))
  shape = ((draw(st.integers(1, 3)),) if stacked else ()) + in_shape + out_shape
  seed = draw(st.integers(0, 2**31 - 1))
  magnitude = draw(st.sampled_from([1e-6, 0.02, 1.0, 300.0]))
  values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * magnitude
  values[(...,) + (0,) * len(out_shape)] = 0.0  # the first output channel (of every layer) is all zeros
  path = ("layers", "attn", module) if stacked else ("layer_0", "mlp", module)
  return path, values, len(shape) - len(out_shape)


def _tree(path, leaf):
  tree = {"kernel": leaf}
  for key in reversed(path):
    tree = {key: tree}
  return tree


@settings(max_examples=25, deadline=None)
@given(kernels())
def test_dequantized_weights_are_within_half_a_scale_per_channel(case):
  path, kernel, first_out = case
  leaf = quantize.quantize_params(_tree(path, kernel))
  for key in path:
    leaf = leaf[key]
  q = leaf["kernel"]
  assert isinstance(q, qwix.QArray) and q.qvalue.dtype == jnp.int8 and q.scale.dtype == jnp.float32
  scale = np.asarray(q.scale)
  stacked = path[0] == "layers"
  # One scale per output channel (and layer): size 1 along every input axis.
  assert all(scale.shape[axis] == 1 for axis in range(int(stacked), first_out))
  assert scale.shape[first_out:] == kernel.shape[first_out:]
  error = np.abs(np.asarray(qwix.dequantize(q)) - kernel)
  bound = np.broadcast_to(scale, kernel.shape) / 2
  # <= scale / 2. A channel's largest weight lands on 127.5 (qwix's bound) and saturates to 127, exactly half a
  # scale off, so float32's rounding of w * (1 / scale) decides the last digits: hence the 1e-4 relative slack.
  assert np.all(error <= bound * (1 + 1e-4)), float(np.max(error / bound))
  zero = (...,) + (0,) * (kernel.ndim - first_out)
  assert np.all(np.asarray(q.qvalue)[zero] == 0)  # an all-zero channel stays exactly zero
  assert np.all(np.isfinite(scale))
  # absmax calibration: every non-zero channel uses the int8 range (its largest value maps to |q| >= 127).
  peak = np.max(np.abs(np.asarray(q.qvalue, np.int32)), axis=tuple(range(int(stacked), first_out)), keepdims=True)
  nonzero = np.max(np.abs(kernel), axis=tuple(range(int(stacked), first_out)), keepdims=True) > 0
  assert np.all(peak[nonzero] >= 127)


def test_int8_logits_and_cached_decoding_stay_close_to_float():
  """One model with every path the baseline (an untied per-layer GPT-2, quantized through the CLI in
  tests/integration/test_quantize_cli.py) lacks: scanned layers (a stacked layer axis), SwiGLU's gate,
  grouped-query attention, tied embeddings (the float table's `attend`) and biases (kept float)."""
  cfg = TransformerConfig(vocab_size=67, num_layers=2, num_heads=4, num_kv_heads=2, width=32, max_len=16,
                          variant="llama", position="rope", norm="rmsnorm", mlp="swiglu", use_bias=True,
                          tie_embeddings=True, scan_layers=True)
  model = TransformerLM(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  params = flax.core.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
  # Trained-like weights: init's N(0, 0.02) plus a few large entries per channel (what absmax must cover).
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda w: np.asarray(w) + np.float32(0.2) * (rng.random(w.shape) > 0.99), params)
  quantized = quantize.quantize_params(params)
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
  float_logits, int8_logits = apply(params, tokens), apply(quantized, tokens)
  # Only the projections changed: embeddings, norms, biases are the float ones.
  float_leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
  for path, leaf in jax.tree_util.tree_leaves_with_path(quantized, is_leaf=quantize.is_quantized):
    name = jax.tree_util.keystr(path)
    assert quantize.is_quantized(leaf) == name.endswith("['kernel']"), name
    if not quantize.is_quantized(leaf):
      np.testing.assert_array_equal(leaf, float_leaves[name])
  # The int8 model computes what the float model does with the dequantized weights (qwix's matmul is exact
  # up to float rounding), and stays near the float model's logits.
  np.testing.assert_allclose(int8_logits, apply(quantize.dequantize_params(quantized), tokens), atol=2e-5)
  difference = float(jnp.max(jnp.abs(int8_logits - float_logits)))
  assert 0 < difference < 0.05 * float(jnp.max(jnp.abs(float_logits))), difference
  # The same int8 model through the KV cache (prefill 8, then one token at a time) gives its full-forward logits.
  decode = jax.jit(lambda p, cache, t: model.apply({"params": p, "cache": cache}, t, decode=True, mutable=["cache"]))
  step_logits, state = decode(quantized, model.init_cache(2), tokens[:, :8])
  pieces = [step_logits]
  for i in range(8, 12):
    logits, state = decode(quantized, state["cache"], tokens[:, i:i + 1])
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), int8_logits, atol=2e-5, rtol=2e-5)
  # Bytes: int8 values + float32 scales + float rest, against the same model's float32 and bfloat16.
  summary = quantize.summary(quantized, "int8")
  assert summary["param_bytes_float32"] == quantize.param_bytes(params)
  assert summary["param_bytes_bfloat16"] * 2 == summary["param_bytes_float32"]
  kernel_bytes, kernel_count = quantize.matmul_bytes(quantized)
  assert kernel_bytes < 1.25 * kernel_count  # ~1 byte a weight: the scales are per channel (4 / inputs bytes each)
  assert summary["param_bytes"] == summary["param_bytes_float32"] - 4 * kernel_count + kernel_bytes
  for back, weight in zip(jax.tree.leaves(quantize.dequantize_params(quantized)), jax.tree.leaves(params)):
    np.testing.assert_allclose(back, weight, atol=0.25 / 127)


def test_weights_the_scheme_cannot_split_are_named():
  with pytest.raises(ConfigError, match=r"config\.eval\.quantize=int8 cannot split the weight head/dense/kernel"):
    quantize.quantize_params({"head": {"dense": {"kernel": np.ones((4, 2), np.float32)}}}, field="eval.quantize")
  with pytest.raises(ConfigError, match=r"cannot split the weight layer_0/mlp/up/kernel \[0, 8\]"):
    quantize.quantize_params({"layer_0": {"mlp": {"up": {"kernel": np.ones((0, 8), np.float32)}}}})
  with pytest.raises(ConfigError, match=r"cannot split the weight layer_0/attn/out/kernel \[4, 8\] into 2 input"):
    quantize.quantize_params({"layer_0": {"attn": {"out": {"kernel": np.ones((4, 8), np.float32)}}}})
  with pytest.raises(ConfigError, match=r"config\.serve\.quantize='int4' is not one of \('none', 'int8'\)"):
    quantize.quantize_params({}, "int4", field="serve.quantize")
