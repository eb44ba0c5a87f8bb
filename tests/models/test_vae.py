"""The sentence VAE: the decoder's conditioning hooks, the encoder, the loss and generation from z."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.models import SentenceVAE, TransformerConfig, TransformerLM, VAEConfig
from lm.models.vae import generate_from_latent, vae_loss
from lm.models.vae_objectives import gaussian_kl

VOCAB, LENGTH, LATENT = 50, 16, 8


def config(variant: str = "gpt2", **options) -> TransformerConfig:
  return TransformerConfig.from_config(dict(variant=variant, num_layers=2, num_heads=4, width=32, **options),
                                       vocab_size=VOCAB, max_len=LENGTH)


def make_lm(variant: str = "gpt2", **options) -> tuple[TransformerLM, dict]:
  model = TransformerLM(config(variant, **options))
  params = model.init(jax.random.key(0), jnp.zeros((2, LENGTH), jnp.int32))["params"]
  return model, nn.meta.unbox(params)


def make_vae(variant: str = "gpt2", vae: VAEConfig = VAEConfig(latent_size=LATENT), **options
             ) -> tuple[SentenceVAE, dict]:
  model = SentenceVAE(config(variant, **options), vae)
  x = jnp.zeros((2, LENGTH), jnp.int32)
  params = model.init(jax.random.key(0), x, x, jnp.ones((2, LENGTH), bool))["params"]
  return model, nn.meta.unbox(params)


def tokens(seed: int = 1, batch: int = 2) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, LENGTH), 0, VOCAB)


def normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape)


def memory_for(batch: int) -> jax.Array:
  return normal(7, (batch, 2, 32))


def differs_at_every_position(a: jax.Array, b: jax.Array) -> bool:
  return all(not np.allclose(a[:, t], b[:, t], atol=1e-6) for t in range(a.shape[1]))


# --- TransformerLM conditioning hooks ---------------------------------------------------------------------------


def test_without_condition_or_memory_the_lm_is_unchanged():
  model, params = make_lm()
  x = tokens()
  plain = model.apply({"params": params}, x)
  np.testing.assert_array_equal(model.apply({"params": params}, x, condition=None, memory=None), plain)
  # Conditioning adds no parameters: a plain LM's checkpoint loads into a conditioned decoder.
  conditioned = model.init(jax.random.key(0), x, condition=normal(3, (2, 32)), memory=memory_for(2))["params"]
  assert jax.tree.structure(nn.meta.unbox(conditioned)) == jax.tree.structure(params)


def test_condition_changes_the_logits_at_every_position():
  model, params = make_lm()
  x = tokens()
  plain = model.apply({"params": params}, x)
  conditioned = model.apply({"params": params}, x, condition=normal(3, (2, 32)))
  assert differs_at_every_position(conditioned, plain)


@pytest.mark.parametrize("variant,options", [("gpt2", {}), ("llama", {"num_kv_heads": 2, "scan_layers": True})])
def test_memory_is_visible_at_every_position_including_the_first(variant, options):
  model, params = make_lm(variant, **options)
  x = tokens()
  plain = model.apply({"params": params}, x)
  forward = jax.jit(lambda memory: model.apply({"params": params}, x, memory=memory))
  with_memory = forward(memory_for(2))
  assert differs_at_every_position(with_memory, plain)
  # Each layer has its own slot: changing only layer 1's memory changes the output.
  assert not np.allclose(forward(memory_for(2).at[:, 1].add(1.0)), with_memory, atol=1e-6)


@pytest.mark.parametrize("variant,options", [("gpt2", {}), ("llama", {"num_kv_heads": 2, "scan_layers": True})])
def test_memory_keeps_the_decoder_causal(variant, options):
  model, params = make_lm(variant, **options)
  forward = jax.jit(lambda x: model.apply({"params": params}, x, memory=memory_for(2)))
  x = tokens()
  base = forward(x)
  for t in (0, 7, LENGTH - 2):
    changed = x.at[:, t + 1].set((x[:, t + 1] + 1) % VOCAB)
    out = forward(changed)
    np.testing.assert_array_equal(np.asarray(out[:, : t + 1]), np.asarray(base[:, : t + 1]))
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize("variant,options", [
    ("gpt2", {}),
    ("gpt2", {"scan_layers": True}),
    ("llama", {"num_kv_heads": 2, "scan_layers": True, "remat_policy": "full"}),
])
def test_kv_cache_decoding_with_memory_equals_the_full_forward(variant, options):
  model, params = make_lm(variant, **options)
  x, memory, condition = tokens(batch=3), memory_for(3), normal(3, (3, 32))
  full = model.apply({"params": params}, x, memory=memory, condition=condition)
  decode = jax.jit(lambda cache, x: model.apply({"params": params, "cache": cache}, x, memory=memory,
                                                condition=condition, decode=True, mutable=["cache"]))
  logits, updated = decode(model.init_cache(3), x[:, :5])  # prefill, then one token at a time
  pieces = [logits]
  for t in range(5, LENGTH):
    logits, updated = decode(updated["cache"], x[:, t:t + 1])
    pieces.append(logits)
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), np.asarray(full), atol=2e-5)
  # The memory slot is not cached: the cache has the plain LM's shapes.
  plain_cache = model.init_cache(3)
  assert jax.tree.map(jnp.shape, updated["cache"]) == jax.tree.map(jnp.shape, plain_cache)


def test_scanned_layers_read_their_own_memory_slot():
  unrolled_model, unrolled_params = make_lm()
  scanned_model, _ = make_lm(scan_layers=True)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[unrolled_params[f"layer_{i}"] for i in range(2)])
  scanned_params = dict(layers=stacked, **{k: v for k, v in unrolled_params.items() if not k.startswith("layer")})
  x, memory = tokens(), memory_for(2)
  np.testing.assert_allclose(scanned_model.apply({"params": scanned_params}, x, memory=memory),
                             unrolled_model.apply({"params": unrolled_params}, x, memory=memory), atol=1e-5)


def test_conditioning_of_the_wrong_shape_is_rejected():
  model, params = make_lm()
  with pytest.raises(ValueError, match="num_layers"):
    model.apply({"params": params}, tokens(), memory=normal(0, (2, 32)))
  with pytest.raises(ValueError, match="width"):
    model.apply({"params": params}, tokens(), condition=normal(0, (2, 16)))


# --- SentenceVAE -----------------------------------------------------------------------------------------------


def test_vae_output_shapes_and_parameters():
  model, params = make_vae(vae=VAEConfig(latent_size=LATENT, encoder_layers=1))
  x = tokens()
  out = model.apply({"params": params}, x, x, jnp.ones_like(x, bool))
  assert out["logits"].shape == (2, LENGTH, VOCAB)
  assert all(out[k].shape == (2, LATENT) and out[k].dtype == jnp.float32 for k in ("mu", "logvar", "z"))
  assert set(params) == {"encoder", "decoder", "latent_to_condition", "latent_to_memory"}
  assert "layer_0" in params["encoder"] and "layer_1" not in params["encoder"]  # encoder_layers=1
  assert params["latent_to_memory"]["kernel"].shape == (LATENT, 2, 32)
  boxed = model.init(jax.random.key(0), x, x, jnp.ones_like(x, bool))["params"]
  assert boxed["latent_to_memory"]["kernel"].names == ("latent", "layers", "embed")
  assert boxed["encoder"]["mu"]["kernel"].names == ("embed", "latent")


def test_the_encoder_is_bidirectional():
  # With first-token pooling, mu can only see the last token through bidirectional attention.
  model, params = make_vae(vae=VAEConfig(latent_size=LATENT, pooling="first"))
  x, mask = tokens(), jnp.ones((2, LENGTH), bool)
  encode = jax.jit(lambda t: model.apply({"params": params}, t, mask, method=SentenceVAE.encode)[0])
  changed = x.at[:, -1].set((x[:, -1] + 1) % VOCAB)
  assert not np.allclose(encode(changed), encode(x), atol=1e-7)


@pytest.mark.parametrize("pooling,options", [("mean", {}), ("first", {}), ("mean", {"variant": "llama",
                                                                                   "scan_layers": True})])
def test_padding_does_not_change_the_posterior(pooling, options):
  model, params = make_vae(vae=VAEConfig(latent_size=LATENT, pooling=pooling), **options)
  x = tokens()
  lengths = jnp.array([LENGTH, 9])
  mask = jnp.arange(LENGTH)[None, :] < lengths[:, None]
  encode = jax.jit(lambda t, m: model.apply({"params": params}, t, m, method=SentenceVAE.encode))
  mu, logvar = encode(x, mask)
  other_padding = jnp.where(mask, x, (x + 3) % VOCAB)
  np.testing.assert_allclose(encode(other_padding, mask)[0], mu, atol=1e-6)
  # The short sentence encoded alone, unpadded, has the same posterior.
  alone_mu, alone_logvar = encode(x[1:, :9], jnp.ones((1, 9), bool))
  np.testing.assert_allclose(alone_mu[0], mu[1], atol=1e-5)
  np.testing.assert_allclose(alone_logvar[0], logvar[1], atol=1e-5)
  assert not np.allclose(encode(x, jnp.ones_like(mask))[0][1], mu[1], atol=1e-6)  # the mask did hide something


@pytest.mark.parametrize("injection", ["memory", "embedding", "both"])
def test_the_decoder_depends_on_z_for_every_injection(injection):
  model, params = make_vae(vae=VAEConfig(latent_size=LATENT, injection=injection))
  assert ("latent_to_memory" in params) == (injection != "embedding")
  assert ("latent_to_condition" in params) == (injection != "memory")
  x = tokens()
  decode = jax.jit(lambda z: model.apply({"params": params}, x, z, method=SentenceVAE.decode))
  assert differs_at_every_position(decode(normal(1, (2, LATENT))), decode(normal(2, (2, LATENT))))


def test_z_is_mu_unless_sampling():
  model, params = make_vae()
  x, mask = tokens(), jnp.ones((2, LENGTH), bool)
  evaluation = model.apply({"params": params}, x, x, mask)  # deterministic: no rng needed
  np.testing.assert_array_equal(evaluation["z"], evaluation["mu"])
  no_sample = model.apply({"params": params}, x, x, mask, deterministic=False, sample=False)
  np.testing.assert_array_equal(no_sample["z"], no_sample["mu"])
  sampled = model.apply({"params": params}, x, x, mask, deterministic=False, rngs={"latent": jax.random.key(3)})
  assert not np.allclose(sampled["z"], sampled["mu"])
  again = model.apply({"params": params}, x, x, mask, sample=True, rngs={"latent": jax.random.key(3)})
  np.testing.assert_allclose(again["z"], sampled["z"], atol=1e-6)  # same rng, same sample
  np.testing.assert_allclose(evaluation["logits"],
                             model.apply({"params": params}, x, evaluation["mu"], method=SentenceVAE.decode))


# --- vae_loss ---------------------------------------------------------------------------------------------------


def _outputs_and_targets():
  model, params = make_vae()
  x = tokens(batch=3)
  mask = jnp.arange(LENGTH)[None, :] < jnp.array([LENGTH, 10, 4])[:, None]
  outputs = model.apply({"params": params}, x, x, mask, sample=True, rngs={"latent": jax.random.key(2)})
  outputs = dict(outputs, mu=outputs["mu"] + normal(4, (3, LATENT)))  # a KL well above zero
  return outputs, tokens(seed=5, batch=3), mask


def test_vae_loss_terms():
  outputs, targets, mask = _outputs_and_targets()
  loss, metrics = vae_loss(outputs, targets, mask, beta=0.0, free_bits=0.0)
  log_probs = jax.nn.log_softmax(outputs["logits"])
  nll = -np.take_along_axis(np.asarray(log_probs), np.asarray(targets)[..., None], -1)[..., 0]
  expected_recon = np.sum(nll * np.asarray(mask)) / 3
  np.testing.assert_allclose(loss, expected_recon, rtol=1e-5)
  np.testing.assert_allclose(metrics["recon"], expected_recon, rtol=1e-5)
  np.testing.assert_allclose(metrics["nll_per_token"], np.sum(nll * np.asarray(mask)) / np.sum(mask), rtol=1e-5)
  expected_kl = np.sum(gaussian_kl(outputs["mu"], outputs["logvar"])) / 3
  np.testing.assert_allclose(metrics["kl"], expected_kl, rtol=1e-5)
  np.testing.assert_allclose(metrics["elbo"], expected_recon + expected_kl, rtol=1e-5)
  assert expected_kl > 1.0
  half, _ = vae_loss(outputs, targets, mask, beta=0.5, free_bits=0.0)
  np.testing.assert_allclose(half, expected_recon + 0.5 * expected_kl, rtol=1e-5)
  # Free bits floor the KL term of the loss, never the reported KL.
  floored, floored_metrics = vae_loss(outputs, targets, mask, beta=1.0, free_bits=100.0)
  np.testing.assert_allclose(floored, expected_recon + 100.0 * LATENT, rtol=1e-5)
  np.testing.assert_allclose(floored_metrics["kl"], expected_kl, rtol=1e-5)


def test_one_sgd_step_lowers_the_loss():
  model, params = make_vae(dropout=0.1)
  x, mask = tokens(batch=4), jnp.ones((4, LENGTH), bool)
  inputs, targets = x[:, :-1], x[:, 1:]
  rngs = {"latent": jax.random.key(1), "dropout": jax.random.key(2)}

  def loss_fn(p):
    outputs = model.apply({"params": p}, inputs, x, mask, deterministic=False, rngs=rngs)
    return vae_loss(outputs, targets, mask[:, 1:], beta=1.0, free_bits=0.1)[0]

  @jax.jit
  def step(p):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    return jax.tree.map(lambda w, g: w - 0.1 * g, p, grads), loss

  new_params, before = step(params)
  _, after = step(new_params)
  assert np.isfinite(before) and after < before


# --- generation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"variant": "llama", "scan_layers": True}])
def test_greedy_generation_from_a_latent(options):
  model, params = make_vae(**options)
  z, prompt = normal(3, (2, LATENT)), jnp.zeros((2, 1), jnp.int32)
  generated = generate_from_latent(model, params, z, prompt, jax.random.key(0), max_new_tokens=10, temperature=0.0)
  assert generated.shape == (2, 10) and generated.dtype == jnp.int32
  again = generate_from_latent(model, params, z, prompt, jax.random.key(9), max_new_tokens=10, temperature=0.0)
  np.testing.assert_array_equal(generated, again)
  # Each generated token is the argmax of the full (uncached) decoder on the sequence so far.
  sequence = jnp.concatenate([prompt, generated], axis=1)
  logits = model.apply({"params": params}, sequence[:, :-1], z, method=SentenceVAE.decode)
  np.testing.assert_array_equal(jnp.argmax(logits, axis=-1), generated)
  sampled = generate_from_latent(model, params, z, prompt, jax.random.key(0), max_new_tokens=10, temperature=1.0)
  assert sampled.shape == (2, 10)


def test_generation_past_the_context_is_rejected():
  model, params = make_vae()
  with pytest.raises(ValueError, match="max_len"):
    generate_from_latent(model, params, normal(3, (2, LATENT)), jnp.zeros((2, 2), jnp.int32), jax.random.key(0),
                         max_new_tokens=LENGTH, temperature=0.0)


def test_invalid_vae_options_are_rejected():
  with pytest.raises(ValueError, match="injection"):
    VAEConfig(injection="cross_attention")
  with pytest.raises(ValueError, match="pooling"):
    VAEConfig(pooling="max")
