"""lm's XLA:CPU kernels (lm/kernels: fused attention, LayerNorm, GELU): XLA's and flax's results within 1e-6,
under vmap, in the model, and what happens where they cannot run."""

from __future__ import annotations

import logging
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import kernels
from lm.kernels import attention as cpu_attention
from lm.kernels import gelu as cpu_gelu
from lm.kernels import layernorm as cpu_layernorm
from lm.models import layers
from lm.models.config import TransformerConfig
from lm.models.transformer import resolve_attention, resolve_kernel
from tests.helpers import needs_cpp_compiler
from tests.models.test_fast_path import batch, loss_and_grads, make


@pytest.fixture(autouse=True)
def _compiler(request):
  if "cannot_happen" not in request.node.name:  # that test makes the compiler fail on purpose
    needs_cpp_compiler()


def rel_error(a, b) -> float:
  """The largest difference relative to the largest magnitude of the reference (what 1e-6 means here)."""
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def xla_attention(query, key, value, causal):
  group = query.shape[-2] // key.shape[-2]
  key, value = jnp.repeat(key, group, axis=-2), jnp.repeat(value, group, axis=-2)
  return jax.nn.dot_product_attention(query, key, value, is_causal=causal, implementation="xla")


def inputs(batch_size, length, heads, kv_heads, head_dim, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  query = jax.random.normal(keys[0], (batch_size, length, heads, head_dim))
  key = jax.random.normal(keys[1], (batch_size, length, kv_heads, head_dim))
  value = jax.random.normal(keys[2], (batch_size, length, kv_heads, head_dim))
  cotangent = jax.random.normal(keys[3], (batch_size, length, heads, head_dim))
  return query, key, value, cotangent


@pytest.mark.parametrize("shape, causal", [
    ((12, 64, 4, 4, 32), True),   # the baseline's layer (a compiled-in head dimension)
    ((2, 64, 2, 2, 64), False),
    ((3, 17, 4, 2, 16), False),   # grouped-query, a length that is not a multiple of the vector width
    ((2, 33, 6, 3, 128), True),
    ((1, 5, 2, 1, 7), True),      # a head dimension padded to the vector width
])
def test_forward_and_gradients_equal_xla_within_1e_6(shape, causal):
  query, key, value, cotangent = inputs(*shape)
  ours = jax.jit(lambda q, k, v: cpu_attention.attention(q, k, v, causal))
  hlo = ours.lower(query, key, value).as_text()
  assert "lm_LmAttentionForward" in hlo and "dot_general" not in hlo  # the kernel, not XLA's dots
  assert rel_error(ours(query, key, value), xla_attention(query, key, value, causal)) < 1e-6

  def grads(attention):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, causal) * cotangent), (0, 1, 2)))
  for mine, theirs in zip(grads(cpu_attention.attention)(query, key, value),
                          grads(xla_attention)(query, key, value)):
    assert rel_error(mine, theirs) < 1e-6


def test_vmapped_per_row_gradients_equal_the_unbatched_ones():
  """DP-SGD's per-example gradients vmap the model over rows: the kernel takes the extra batch dimension."""
  query, key, value, cotangent = inputs(4, 16, 2, 2, 16)

  def row_grad(q, k, v, g):
    return jax.grad(lambda q: jnp.sum(cpu_attention.attention(q[None], k[None], v[None]) * g[None]))(q)
  batched = jax.jit(jax.vmap(row_grad))(query, key, value, cotangent)
  for i in range(4):
    np.testing.assert_allclose(batched[i], row_grad(query[i], key[i], value[i], cotangent[i]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel, options", [("attention_impl", {}), ("norm_impl", {}), ("gelu_impl", {}),
                                             ("norm_impl", {"param_dtype": "bfloat16"})])
def test_the_model_with_a_kernel_gives_xlas_loss_and_gradients(kernel, options):
  model, params = make(num_kv_heads=2, **options)
  kernel_model, _ = make(num_kv_heads=2, **options, **{kernel: "cpu"})
  hlo = jax.jit(lambda p: kernel_model.apply({"params": p}, batch()["inputs"])).lower(params).as_text()
  assert {"attention_impl": "LmAttention", "norm_impl": "LmLayerNorm", "gelu_impl": "LmGelu"}[kernel] in hlo
  data = batch()
  loss, grads = loss_and_grads(model, params, data)
  kernel_loss, kernel_grads = loss_and_grads(kernel_model, params, data)
  assert abs(float(kernel_loss) - float(loss)) <= 1e-6 * abs(float(loss))
  for mine, theirs in zip(jax.tree.leaves(kernel_grads), jax.tree.leaves(grads)):
    mine, theirs = mine.astype(jnp.float32), theirs.astype(jnp.float32)
    if options.get("param_dtype") == "bfloat16":
      # Gradients stored in bfloat16: float32 values within 1e-6 may round to neighbouring bfloat16s (2^-7 apart).
      assert bool(jnp.all(jnp.abs(mine - theirs) <= 2.0**-7 * jnp.abs(theirs) + 1e-10))
      continue
    # Within 1e-6 of each gradient's largest entry. The key bias's gradient is zero but for rounding (a softmax
    # does not change when every score moves alike): ~1e-11 in both, hence the floor.
    assert float(jnp.max(jnp.abs(mine - theirs))) <= 1e-6 * float(jnp.max(jnp.abs(theirs))) + 1e-10


def test_auto_takes_the_kernel_for_float32_on_cpu_and_says_why_not_elsewhere():
  def config(max_len=8, **options):
    return TransformerConfig(vocab_size=8, num_layers=1, num_heads=2, width=32, max_len=max_len, **options)
  assert resolve_attention(config(attention_impl="auto"))[0].attention_impl == "cpu"
  assert resolve_attention(config(attention_impl="cpu")) == (config(attention_impl="cpu"), None)
  settled, reason = resolve_attention(config(attention_impl="auto", dtype="bfloat16"))
  assert settled.attention_impl == "xla" and "set model.dtype=float32" in reason and "cuDNN" in reason
  settled, reason = resolve_attention(config(attention_impl="cpu", max_len=cpu_attention.MAX_LENGTH + 1))
  assert settled.attention_impl == "xla" and f"sequences of {cpu_attention.MAX_LENGTH + 1} exceed" in reason
  settled, reason = resolve_attention(config(attention_impl="cpu"), "gpu", "9.0")
  assert settled.attention_impl == "xla" and "for XLA:CPU, and this run's devices are gpu" in reason


def test_packed_rows_fall_back_to_xla_with_a_warning_and_the_same_logits(caplog):
  model, params = make()
  kernel_model, _ = make(attention_impl="cpu")
  tokens = batch()["inputs"]
  segments = jnp.asarray(np.repeat([[1, 2]], tokens.shape[1] // 2, axis=1).repeat(tokens.shape[0], 0))
  layers._WARNED.clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    out = kernel_model.apply({"params": params}, tokens, segment_ids=segments)
  np.testing.assert_array_equal(out, model.apply({"params": params}, tokens, segment_ids=segments))
  warning = [r.getMessage() for r in caplog.records if "fused CPU attention cannot run" in r.getMessage()]
  assert warning and "no document mask" in warning[0] and "model.attention_impl=xla" in warning[0]


def test_a_build_that_cannot_happen_names_the_reason_and_leaves_no_file(tmp_path, monkeypatch):
  monkeypatch.setenv("LM_KERNEL_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")  # a "compiler" that fails, as a broken one would
  with pytest.raises(kernels.KernelUnavailable, match="building lm's attention_cpu kernel failed"):
    kernels.build("attention_cpu")
  assert list((tmp_path / "cache").iterdir()) == []
  monkeypatch.delenv("CXX")
  monkeypatch.setenv("PATH", str(tmp_path))  # no g++ or c++ on it
  with pytest.raises(kernels.KernelUnavailable, match=r"no C\+\+ compiler .* set model.attention_impl=xla"):
    kernels.build("attention_cpu")


def test_the_build_is_cached_by_source_and_reused(tmp_path, monkeypatch):
  monkeypatch.setenv("LM_KERNEL_CACHE", str(tmp_path))
  first = kernels.build("attention_cpu")
  assert first.parent == tmp_path and first.name.startswith("attention_cpu-") and first.suffix == ".so"
  stamp = first.stat().st_mtime_ns
  assert kernels.build("attention_cpu") == first and first.stat().st_mtime_ns == stamp
  assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def layer_norm_inputs(shape, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], shape) * 2 + 0.3
  scale = 1 + 0.1 * jax.random.normal(keys[1], shape[-1:])
  bias = 0.1 * jax.random.normal(keys[2], shape[-1:])
  return x, scale, bias, jax.random.normal(keys[3], shape)


@pytest.mark.parametrize("shape, use_bias", [((12, 64, 128), True), ((12, 64, 128), False), ((3, 5, 37), True),
                                             ((7, 16), True)])
def test_layer_norm_and_its_gradients_equal_flax_within_1e_6(shape, use_bias):
  x, scale, bias, cotangent = layer_norm_inputs(shape)
  params = {"scale": scale, "bias": bias} if use_bias else {"scale": scale}
  flax_norm = nn.LayerNorm(epsilon=1e-5, use_bias=use_bias)
  axes = ("batch", "length", "embed")[-len(shape):]

  def ours(p, x):
    return cpu_layernorm.layer_norm(x, p["scale"], p.get("bias"), 1e-5, axes)

  def theirs(p, x):
    return flax_norm.apply({"params": p}, x)
  assert rel_error(jax.jit(ours)(params, x), jax.jit(theirs)(params, x)) < 1e-6
  def grads(norm):
    return jax.jit(jax.grad(lambda p, x: jnp.sum(norm(p, x) * cotangent), (0, 1)))(params, x)
  for mine, expected in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(theirs))):
    assert rel_error(mine, expected) < 1e-6
  # Per-row parameter gradients under vmap (DP-SGD's per-example gradients): each row its own.
  def row_grads(norm):
    return jax.jit(jax.vmap(jax.grad(lambda p, x, g: jnp.sum(norm(p, x[None]) * g[None])), in_axes=(None, 0, 0)))(
        params, x, cotangent)
  if len(shape) == 3:
    for mine, expected in zip(jax.tree.leaves(row_grads(ours)), jax.tree.leaves(row_grads(theirs))):
      assert mine.shape == (shape[0], shape[-1]) and rel_error(mine, expected) < 1e-6


@pytest.mark.parametrize("shape", [(12, 64, 512), (3, 5, 7)])
def test_gelu_and_its_gradient_equal_xlas_within_1e_6(shape):
  x = 3 * jax.random.normal(jax.random.key(0), shape)
  cotangent = jax.random.normal(jax.random.key(1), shape)
  ours = jax.jit(lambda x: cpu_gelu.gelu(x, ("batch", "length", "mlp")))
  assert "LmGeluForward" in ours.lower(x).as_text()
  assert rel_error(ours(x), jax.jit(layers.gelu)(x)) < 1e-6
  mine = jax.jit(jax.grad(lambda x: jnp.sum(cpu_gelu.gelu(x) * cotangent)))(x)
  assert rel_error(mine, jax.jit(jax.grad(lambda x: jnp.sum(layers.gelu(x) * cotangent)))(x)) < 1e-6
  batched = jax.jit(jax.vmap(jax.grad(lambda x, g: jnp.sum(cpu_gelu.gelu(x[None]) * g[None]))))(x, cotangent)
  assert rel_error(batched, mine) < 1e-6


@pytest.mark.parametrize("options, field, reason", [
    (dict(norm="rmsnorm"), "norm_impl", "a LayerNorm, and model.norm=rmsnorm"),
    (dict(dtype="bfloat16"), "norm_impl", "set model.dtype=float32"),
    (dict(gelu_approximate=True), "gelu_impl", "the tanh approximation"),
    (dict(mlp="swiglu"), "gelu_impl", "model.mlp=swiglu"),
    (dict(dtype="bfloat16"), "gelu_impl", "set model.dtype=float32"),
])
def test_norm_and_gelu_kernels_say_why_they_cannot_run(options, field, reason):
  def resolve(config, platform=None):
    return resolve_kernel(config, field, platform)
  def config(impl, **more):
    return TransformerConfig(vocab_size=8, num_layers=1, num_heads=2, width=32, max_len=8, **{field: impl}, **more)
  settled, problem = resolve(config("cpu", **options))
  assert getattr(settled, field) == "xla" and reason in problem
  assert getattr(resolve(config("auto", **options))[0], field) == "xla"
  assert resolve(config("auto")) == (config("cpu"), None)
  settled, problem = resolve(config("auto"), "gpu")
  assert getattr(settled, field) == "xla" and "for XLA:CPU, and this run's devices are gpu" in problem
