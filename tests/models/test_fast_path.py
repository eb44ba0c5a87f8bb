"""The accelerator fast path on CPU: fused loss, bf16 compute, padded vocabulary, remat, scan, cuDNN fallback."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm.models import TransformerConfig, TransformerLM, fused_loss, layers, losses
from lm.models.transformer import REMAT_POLICIES, resolve_attention
from lm.tasks import lm as lm_task

VOCAB, LENGTH, BATCH = 61, 16, 4


def make(vocab: int = VOCAB, **options) -> tuple[TransformerLM, dict]:
  config = TransformerConfig.from_config(dict(num_layers=2, num_heads=4, width=32, **options), vocab_size=vocab,
                                         max_len=LENGTH)
  model = TransformerLM(config)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((2, LENGTH), jnp.int32))["params"])
  return model, params


def batch(seed: int = 1, with_mask: bool = False) -> dict:
  keys = jax.random.split(jax.random.key(seed), 3)
  out = {"inputs": jax.random.randint(keys[0], (BATCH, LENGTH), 0, VOCAB),
         "targets": jax.random.randint(keys[1], (BATCH, LENGTH), 0, VOCAB)}
  if with_mask:
    out["mask"] = (jax.random.uniform(keys[2], (BATCH, LENGTH)) > 0.3).astype(jnp.int32)
  return out


def loss_and_grads(model, params, data):
  def loss(p):
    loss_sum, count = losses.lm_loss_sum(model, p, data)
    return loss_sum / count

  return jax.jit(jax.value_and_grad(loss))(params)


def assert_trees_close(a, b, rtol, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                                       rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("vocab_major", [True, False], ids=["tied_table", "untied_kernel"])
def test_fused_loss_sum_equals_optax_value_and_gradients(vocab_major):
  keys = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(keys[0], (3, 12, 16))
  table = jax.random.normal(keys[1], (50, 16) if vocab_major else (16, 50)) * 0.3
  targets = jax.random.randint(keys[2], (3, 12), 0, 50)
  weights = (jax.random.uniform(keys[3], (3, 12)) > 0.3).astype(jnp.float32)

  def reference(h, t):
    logits = h @ (t.T if vocab_major else t)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)

  def fused(h, t):  # chunk 5 does not divide 12: the chunk becomes 4
    return fused_loss.fused_loss_sum(h, t, targets, weights, vocab_major, 5)

  expected, expected_grads = jax.value_and_grad(reference, (0, 1))(hidden, table)
  value, grads = jax.jit(jax.value_and_grad(fused, (0, 1)))(hidden, table)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  assert_trees_close(grads, expected_grads, rtol=1e-5, atol=1e-6)
  losses = fused_loss.token_losses(hidden, table, targets, vocab_major=vocab_major, chunk_len=3)
  logits = hidden @ (table.T if vocab_major else table)
  np.testing.assert_allclose(losses, optax.softmax_cross_entropy_with_integer_labels(logits, targets), rtol=1e-6)


def test_chunk_length_tiles_the_sequence():
  assert [fused_loss.chunk_length(1024, c) for c in (128, 1000, 5000, 1)] == [128, 512, 1024, 1]
  assert fused_loss.chunk_length(12, 5) == 4 and fused_loss.chunk_length(7, 4) == 1


@pytest.mark.parametrize("options, with_mask", [
    ({}, False), ({"tie_embeddings": False}, True), ({"variant": "llama", "num_kv_heads": 2}, True)],
                         ids=["gpt2_tied", "gpt2_untied_masked", "llama_masked"])
def test_fused_model_loss_equals_logits_loss_in_float32(options, with_mask):
  model, params = make(loss_impl="logits", **options)
  fused_model, _ = make(loss_impl="fused", loss_chunk_len=4, **options)
  data = batch(with_mask=with_mask)
  loss, grads = loss_and_grads(model, params, data)
  fused_value, fused_grads = loss_and_grads(fused_model, params, data)
  np.testing.assert_allclose(fused_value, loss, rtol=1e-6)
  assert_trees_close(fused_grads, grads, rtol=1e-5, atol=1e-7)
  # The eval step's per-row sums agree too.
  plain_eval = lm_task.make_eval_step(model)(params, data)
  fused_eval = lm_task.make_eval_step(fused_model)(params, data)
  assert_trees_close(fused_eval, plain_eval, rtol=1e-5, atol=1e-6)


def test_auto_loss_is_fused_only_when_the_logits_are_large():
  config = TransformerConfig(vocab_size=50_304, num_layers=1, num_heads=1, width=8, max_len=1024)
  # 16 x 1024 x 50,304 float32 logits are 3.3 GB: fused; on 16 devices 206 MB each: not at 256 MB.
  assert config.fused_loss(16, 1024) and not config.fused_loss(16, 1024, devices=16)
  assert not config.fused_loss(1, 64)
  assert TransformerConfig(**{**config.__dict__, "loss_impl": "fused"}).fused_loss(1, 1)
  assert not TransformerConfig(**{**config.__dict__, "loss_impl": "logits"}).fused_loss(64, 1024)


def _fast_path_params(params: dict, padded_vocab: int) -> dict:
  """The default model's weights in the padded-vocabulary model: the table's extra rows are zeros."""
  table = params["embed"]["embedding"]
  padded = jnp.zeros((padded_vocab, table.shape[1]), table.dtype).at[:table.shape[0]].set(table)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layer_{i}"] for i in range(2)])
  rest = {k: v for k, v in params.items() if not k.startswith("layer_") and k != "embed"}
  return {**rest, "embed": {"embedding": padded}, "layers": stacked}


def test_fast_path_gives_the_default_loss_within_bfloat16_tolerance(caplog):
  """bf16 compute on f32 master weights, cuDNN attention (falling back on CPU), vocabulary padded to 128,
  fused loss, remat and scan: the same loss and gradients as the float32 default, within bf16 rounding."""
  model, params = make()
  fast, fast_params = make(vocab=128, valid_vocab_size=VOCAB, dtype="bfloat16", param_dtype="float32", attention_impl="cudnn",
                           loss_impl="fused", loss_chunk_len=8, remat_policy="minimal", scan_layers=True)
  fast_params = _fast_path_params(params, 128)
  data = batch()
  layers._WARNED.clear()  # pylint: disable=protected-access  # the fallback warns once per shape and process
  with caplog.at_level(logging.WARNING):
    fast_loss, fast_grads = loss_and_grads(fast, fast_params, data)
  loss, grads = loss_and_grads(model, params, data)
  assert fast_loss.dtype == jnp.float32 and abs(float(fast_loss) - float(loss)) < 1e-2 * float(loss)
  assert any("using XLA's attention" in record.getMessage() for record in caplog.records)
  # Master weights and their gradients stay float32.
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(fast_grads))
  expected = _fast_path_params(grads, 128)
  flat_got, flat_want = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (fast_grads, expected))
  assert _cosine(flat_got, flat_want) > 0.999
  # Leaf by leaf, where the gradient is not rounding noise (a key bias's is 0: softmax ignores it).
  for path, got in jax.tree_util.tree_leaves_with_path(fast_grads):
    want = np.ravel(_get(expected, path))
    if np.linalg.norm(want) > 1e-3 * np.linalg.norm(flat_want):
      assert _cosine(np.ravel(got), want) > 0.99, jax.tree_util.keystr(path)


def _cosine(a, b):
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _get(tree, path):
  for entry in path:
    tree = tree[entry.key]
  return tree


# Every policy on unrolled layers; scan alone and with two policies (scan + remat is one compiled block).
REMAT_CASES = [(name, False) for name in REMAT_POLICIES if name != "none"] + [
    ("none", True), ("minimal", True), ("qkv_proj", True)]


@pytest.mark.parametrize("policy, scan_layers", REMAT_CASES,
                         ids=[f"{name}{'-scan' if scan else ''}" for name, scan in REMAT_CASES])
def test_remat_and_scan_give_identical_float32_gradients(policy, scan_layers):
  model, params = make()
  remat_model, _ = make(remat_policy=policy, scan_layers=scan_layers)
  data = batch()
  loss, grads = loss_and_grads(model, params, data)
  remat_params = _fast_path_params(params, VOCAB) if scan_layers else params
  remat_loss, remat_grads = loss_and_grads(remat_model, remat_params, data)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  expected = _fast_path_params(grads, VOCAB) if scan_layers else grads
  assert_trees_close(remat_grads, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("platform, dtype, heads, capability, expected", [
    ("gpu", "bfloat16", 4, "9.0", None),
    ("gpu", "float16", 4, "8.0", None),
    ("cpu", "bfloat16", 4, None, "needs an NVIDIA GPU, and this run's devices are cpu"),
    ("tpu", "bfloat16", 4, None, "devices are tpu"),
    ("gpu", "float32", 4, "9.0", "set model.dtype=bfloat16"),
    ("gpu", "bfloat16", 1, "8.0", "at most 128, and this model's is 256"),  # head dim 256: Hopper only
    ("gpu", "bfloat16", 1, "9.0", None),
    ("gpu", "bfloat16", 64, "9.0", "multiple of 8 and at most 256, and this model's is 4"),
])
def test_cudnn_attention_is_used_only_where_it_can_run(platform, dtype, heads, capability, expected):
  config = TransformerConfig(vocab_size=8, num_layers=1, num_heads=heads, width=256, max_len=8, dtype=dtype,
                             attention_impl="cudnn")
  problem = layers.cudnn_attention_problem(config, platform, capability)
  settled, reason = resolve_attention(config, platform, capability)
  if expected is None:
    assert problem is None and reason is None and settled.attention_impl == "cudnn"
  else:
    assert expected in problem and reason == problem and settled.attention_impl == "xla"


def test_auto_attention_in_bfloat16_on_cpu_is_xla_and_xla_stays_xla():
  auto = TransformerConfig(vocab_size=8, num_layers=1, num_heads=2, width=32, max_len=8, attention_impl="auto",
                           dtype="bfloat16")  # float32 takes lm's CPU kernel: tests/models/test_cpu_attention.py
  assert resolve_attention(auto)[0].attention_impl == "xla"
  plain = TransformerConfig(vocab_size=8, num_layers=1, num_heads=2, width=32, max_len=8)
  assert resolve_attention(plain) == (plain, None)


def test_cudnn_requested_on_cpu_falls_back_at_trace_time_with_the_same_logits(caplog):
  """A model built with attention_impl=cudnn outside build_experiment (a notebook) still runs here."""
  model, params = make(dtype="bfloat16")
  cudnn_model, _ = make(dtype="bfloat16", attention_impl="cudnn")
  tokens = batch()["inputs"]
  layers._WARNED.clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    out = cudnn_model.apply({"params": params}, tokens)
  np.testing.assert_array_equal(out, model.apply({"params": params}, tokens))
  warning = [r.getMessage() for r in caplog.records if "cuDNN attention cannot take" in r.getMessage()]
  assert warning and "model.attention_impl=xla" in warning[0]
