"""The Transformer LM: causality, KV-cache decoding, variants, remat and scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.models import TransformerConfig, TransformerLM

VOCAB, LENGTH = 50, 16


def make(variant: str = "gpt2", **options) -> tuple[TransformerLM, dict]:
  config = TransformerConfig.from_config(dict(variant=variant, num_layers=2, num_heads=4, width=32, **options),
                                         vocab_size=VOCAB, max_len=LENGTH)
  model = TransformerLM(config)
  tokens = jnp.zeros((2, LENGTH), jnp.int32)
  params = jax.tree.map(lambda x: x, model.init(jax.random.key(0), tokens)["params"])
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return model, nn.meta.unbox(params)


def tokens(seed: int = 1, batch: int = 2) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, LENGTH), 0, VOCAB)


VARIANTS = [
    ("gpt2", {}),
    ("llama", {"num_kv_heads": 2}),
    ("llama", {"num_kv_heads": 1, "scan_layers": True}),
    ("gpt2", {"scan_layers": True, "remat_policy": "full"}),
    ("gpt2", {"use_bias": False, "tie_embeddings": False}),
]


@pytest.mark.parametrize("variant,options", VARIANTS)
def test_changing_a_future_token_never_changes_past_logits(variant, options):
  model, params = make(variant, **options)
  x = tokens()
  base = model.apply({"params": params}, x)
  for t in (0, 7, LENGTH - 2):
    changed = x.at[:, t + 1].set((x[:, t + 1] + 1) % VOCAB)
    out = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(out[:, : t + 1]), np.asarray(base[:, : t + 1]))
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:])  # the change is visible after t


@pytest.mark.parametrize("variant,options", VARIANTS)
def test_kv_cache_decoding_equals_full_forward(variant, options):
  model, params = make(variant, **options)
  x = tokens(batch=3)
  full = model.apply({"params": params}, x)
  cache = model.init_cache(3)
  # Prefill 5 tokens at once, then one token at a time.
  logits, variables = model.apply({"params": params, "cache": cache}, x[:, :5], decode=True, mutable=["cache"])
  pieces = [logits]
  for t in range(5, LENGTH):
    logits, variables = model.apply({"params": params, "cache": variables["cache"]}, x[:, t:t + 1], decode=True,
                                    mutable=["cache"])
    pieces.append(logits)
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), np.asarray(full), atol=2e-5)


def test_variants_differ_in_structure():
  _, gpt2 = make("gpt2")
  _, llama = make("llama", num_kv_heads=2)
  assert "position_embedding" in gpt2 and "position_embedding" not in llama
  assert "unembed" in llama and "unembed" not in gpt2
  assert "gate" in llama["layer_0"]["mlp"] and "bias" not in llama["layer_0"]["attn"]["query"]
  assert llama["layer_0"]["attn"]["key"]["kernel"].shape == (32, 2, 8)  # grouped-query: 2 kv heads


def _grads(options):
  model, params = make("gpt2", **options)
  x = tokens()

  def loss(p):
    logits = model.apply({"params": p}, x)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  return model, params, jax.grad(loss)(params)


# Remat policies and scan: tests/models/test_fast_path.py.


def test_scan_over_layers_matches_unrolled_layers():
  unrolled_model, unrolled_params = make("gpt2")
  scanned_model, scanned_params = make("gpt2", scan_layers=True)
  # Copy the unrolled weights into the scanned layout ([layers, ...] stacks).
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[unrolled_params[f"layer_{i}"] for i in range(2)])
  scanned_params = dict(scanned_params, layers=stacked,
                        **{k: v for k, v in unrolled_params.items() if not k.startswith("layer")})
  x = tokens()
  np.testing.assert_allclose(scanned_model.apply({"params": scanned_params}, x),
                             unrolled_model.apply({"params": unrolled_params}, x), atol=1e-5)


def test_bf16_compute_keeps_f32_params():
  model, params = make("gpt2", dtype="bfloat16")
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits = model.apply({"params": params}, tokens())
  assert logits.dtype == jnp.float32  # losses are computed in f32


def test_invalid_model_options_are_rejected():
  with pytest.raises(ValueError, match="num_heads"):
    TransformerConfig.from_config(dict(num_layers=1, num_heads=3, width=32), vocab_size=10, max_len=8)
  with pytest.raises(ValueError, match="attention_impl"):
    TransformerConfig.from_config(dict(num_layers=1, num_heads=2, width=32, attention_impl="flash"),
                                  vocab_size=10, max_len=8)


@pytest.mark.parametrize("num_in_axes,out_features", [(1, (4, 8)), (2, (32,)), (1, (32,))])
def test_projection_is_the_named_axes_contraction(num_in_axes, out_features):
  from lm.models.layers import Projection  # pylint: disable=g-import-not-at-top
  in_shape = (32,) if num_in_axes == 1 else (4, 8)
  x = jax.random.normal(jax.random.key(0), (2, 5) + in_shape)
  axes = ("embed", "heads", "kv")[:num_in_axes + len(out_features)]
  layer = Projection(out_features, axes, num_in_axes=num_in_axes, use_bias=False)
  params = layer.init(jax.random.key(1), x)
  kernel = jax.tree.leaves(params)[0]
  assert kernel.shape == in_shape + out_features  # parameters keep their named axes
  contract = tuple(range(2, 2 + num_in_axes))
  expected = jax.lax.dot_general(x, kernel, ((contract, tuple(range(num_in_axes))), ((), ())))
  np.testing.assert_allclose(layer.apply(params, x), expected, rtol=1e-5, atol=1e-6)


def test_exact_gelu_matches_jax_and_its_gradient():
  from lm.models.layers import gelu  # pylint: disable=g-import-not-at-top
  x = jnp.linspace(-10.0, 10.0, 4001)
  np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(x),
                             jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x), atol=1e-6)
  np.testing.assert_array_equal(gelu(x, approximate=True), jax.nn.gelu(x, approximate=True))
