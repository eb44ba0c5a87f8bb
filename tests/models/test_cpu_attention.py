"""lm's fused XLA:CPU attention kernel (lm/kernels): XLA's results within 1e-6, under vmap, in the model, and
what happens where it cannot run."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import kernels
from lm.kernels import attention as cpu_attention
from lm.models import layers
from lm.models.config import TransformerConfig
from lm.models.transformer import resolve_attention
from tests.models.test_fast_path import batch, loss_and_grads, make


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


def test_the_model_with_the_kernel_gives_xla_attentions_loss_and_gradients():
  model, params = make(num_kv_heads=2)
  kernel_model, _ = make(num_kv_heads=2, attention_impl="cpu")
  data = batch()
  loss, grads = loss_and_grads(model, params, data)
  kernel_loss, kernel_grads = loss_and_grads(kernel_model, params, data)
  assert abs(float(kernel_loss) - float(loss)) <= 1e-6 * abs(float(loss))
  for mine, theirs in zip(jax.tree.leaves(kernel_grads), jax.tree.leaves(grads)):
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
  monkeypatch.setenv("CXX", "false")  # a "compiler" that fails, as a broken toolchain would
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
