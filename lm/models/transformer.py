"""Decoder-only Transformer language model (GPT-2 and Llama families).

`TransformerConfig.variant` picks the family's defaults (the table in
`lm.models.config`); every choice can also be set on its own (e.g. GPT-2
without biases, as nanoGPT's baseline uses).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models.config import REMAT_POLICY_NAMES, TransformerConfig
from lm.models.fused_loss import mask_padding
from lm.models.layers import (QKV_NAMES, Attention, Mlp, Projection, add_learned_positions, make_norm,
                              settle_attention_impl, settle_gelu_impl, settle_norm_impl,
                              token_embedding)

# Rematerialization of each block (`model.remat_policy`): what the backward pass may keep from the
# forward instead of recomputing it. Fewer saved values: less memory, more FLOPs.
REMAT_POLICIES = {
    "none": None,  # no remat: everything the backward needs is kept
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    # MaxText's "minimal": keep the weight matmuls' outputs (projections, MLP), recompute the
    # attention scores and the elementwise work.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    # Keep only the query/key/value projections (named in Attention); recompute the rest.
    "qkv_proj": jax.checkpoint_policies.save_only_these_names(*QKV_NAMES),
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
assert tuple(REMAT_POLICIES) == REMAT_POLICY_NAMES


def resolve_attention(config: TransformerConfig, platform: str | None = None,
                      compute_capability: str | None = None) -> tuple[TransformerConfig, str | None]:
  """Settles attention_impl "cudnn"/"cpu"/"auto" for the devices at hand: (config with xla, cudnn or cpu,
  why not the one asked for).

  The reason is None when the config keeps what it asked for (or asked for
  xla). Defaults: JAX's default backend and its first device's compute
  capability. The rule is `layers.settle_attention_impl`.
  """
  if config.attention_impl == "xla":
    return config, None
  if platform is None:
    platform = jax.default_backend()
    if platform == "gpu":
      compute_capability = getattr(jax.local_devices()[0], "compute_capability", None)
  impl, problem = settle_attention_impl(config, platform, compute_capability)
  return dataclasses.replace(config, attention_impl=impl), problem


# The kernels of the Transformer's parts besides attention: field -> the rule that settles it (layers.settle_*).
KERNEL_RULES = {"norm_impl": settle_norm_impl, "gelu_impl": settle_gelu_impl}


def resolve_kernel(config: TransformerConfig, field: str, platform: str | None = None
                   ) -> tuple[TransformerConfig, str | None]:
  """Settles `field` (norm_impl or gelu_impl) "cpu"/"auto" for the devices at hand: (config with xla or cpu,
  why not cpu)."""
  if getattr(config, field) == "xla":
    return config, None
  impl, problem = KERNEL_RULES[field](config, platform or jax.default_backend())
  return dataclasses.replace(config, **{field: impl}), problem


class Block(nn.Module):
  """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

  `causal=False` makes the attention bidirectional (an encoder's block);
  `memory`, `key_mask` and `segment_ids` are passed to `Attention`.
  """

  config: TransformerConfig
  decode: bool = False
  deterministic: bool = True
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, memory: jax.Array | None = None,
               key_mask: jax.Array | None = None, segment_ids: jax.Array | None = None) -> tuple[jax.Array, None]:
    """x: [batch, length, embed], memory: [batch, embed] | None -> ([batch, length, embed], None).

    segment_ids: [batch, length] int | None, the document of each token.
    The (carry, None) return is the form `nn.scan` needs.
    """
    cfg = self.config
    attn_in = make_norm(cfg, "attn_norm")(x)
    attention = Attention(cfg, decode=self.decode, causal=self.causal, name="attn")
    x = x + attention(attn_in, positions, self.deterministic, memory=memory, key_mask=key_mask,
                      segment_ids=segment_ids)
    mlp_in = make_norm(cfg, "mlp_norm")(x)
    x = x + Mlp(cfg, name="mlp")(mlp_in, self.deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, None


def apply_blocks(cfg: TransformerConfig, x: jax.Array, positions: jax.Array, *, decode: bool, deterministic: bool,
                 causal: bool = True, memory: jax.Array | None = None, key_mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
  """Runs `cfg.num_layers` blocks on x [batch, length, embed] -> [batch, length, embed].

  Call it from inside a module's compact method: the blocks become that
  module's children, `layers` (stacked, with `scan_layers`) or `layer_{i}`,
  so the decoder and the VAE's encoder share one layout. memory: [batch,
  num_layers, embed] | None, slice i goes to layer i (scanned over layers
  with `scan_layers`). key_mask: [batch, length] bool | None, and
  segment_ids: [batch, length] int | None (packed documents attend only
  within their own, `Attention`), the same for every layer.
  """
  block = Block
  if cfg.remat_policy != "none":
    block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    # nn.scan slices scanned inputs along their leading axis: layers first.
    layer_memory = None if memory is None else jnp.moveaxis(memory, 1, 0)
    stack = nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast if memory is None else 0, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, decode=decode, deterministic=deterministic, causal=causal, name="layers")
    x, _ = stack(x, positions, layer_memory, key_mask, segment_ids)
  else:
    for i in range(cfg.num_layers):
      layer_memory = None if memory is None else memory[:, i]
      x, _ = block(cfg, decode=decode, deterministic=deterministic, causal=causal, name=f"layer_{i}")(
          x, positions, layer_memory, key_mask, segment_ids)
  return x


class TransformerLM(nn.Module):
  """Decoder-only language model.

  Call with tokens [batch, length] (int32) and get logits [batch, length,
  vocab] (float32). With `decode=True` the module reads and writes the `cache`
  collection (create it with `init_cache`), and positions continue from the
  number of tokens already cached.

  A window that packs several documents (`data.document_mask`) passes
  `segment_ids` and `positions`: each token then attends only to the earlier
  tokens of its own document, at positions counted from that document's
  start, so every document gets the logits it would get alone.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(
      self,
      tokens: jax.Array,
      *,
      deterministic: bool = True,
      decode: bool = False,
      return_hidden: bool = False,
      condition: jax.Array | None = None,
      memory: jax.Array | None = None,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """tokens: [batch, length] -> logits [batch, length, vocab] (hidden [batch, length, embed] with return_hidden).

    Optional conditioning (e.g. on a VAE's latent; both None for a plain LM):
      condition: [batch, width], added to every token's embedding.
      memory: [batch, num_layers, width], one extra key/value slot per layer
        that every position attends to (`Attention`); not cached, so
        pass the same memory on every decoding call.

    Packed documents (both None: one sequence per row, positions 0, 1, ...):
      positions: [batch, length] int32, each token's position (learned
        table row or RoPE angle), e.g. restarting at 0 at each document.
      segment_ids: [batch, length] int32, each token's document (equal ids:
        same document); attention is causal and within a document.
      Neither is taken with decode=True (decoding continues one document).
    """
    cfg = self.config
    batch, length = tokens.shape
    if condition is not None and condition.shape != (batch, cfg.width):
      raise ValueError(f"condition has shape {condition.shape}; pass [batch, width] = {(batch, cfg.width)}.")
    if memory is not None and memory.shape != (batch, cfg.num_layers, cfg.width):
      raise ValueError(f"memory has shape {memory.shape}; pass [batch, num_layers, width] = "
                       f"{(batch, cfg.num_layers, cfg.width)}, one slot per layer.")
    for name, value in (("positions", positions), ("segment_ids", segment_ids)):
      if value is None:
        continue
      if decode:
        raise ValueError(f"TransformerLM(decode=True) takes no {name}: decoding continues one sequence from the "
                         f"cache's position; pass {name} only to a full forward over packed windows.")
      if value.shape != (batch, length):
        raise ValueError(f"{name} has shape {value.shape}; pass [batch, length] = {(batch, length)}, like tokens.")
    tokens = nn.with_logical_constraint(tokens, ("batch", "length"))
    if decode:
      index = self.variable("cache", "position", lambda: jnp.array(0, dtype=jnp.int32))
      start = index.value
      if self.has_variable("cache", "position") and not self.is_initializing():
        index.value = start + length
    else:
      start = 0
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    else:
      positions = nn.with_logical_constraint(positions.astype(jnp.int32), ("batch", "length"))
    if segment_ids is not None:
      segment_ids = nn.with_logical_constraint(segment_ids, ("batch", "length"))

    embed = token_embedding(cfg)
    x = add_learned_positions(self, cfg, embed(tokens), positions)
    if condition is not None:
      x = x + condition[:, None, :].astype(cfg.compute_dtype)
    x = nn.Dropout(rate=cfg.dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if memory is not None:
      memory = nn.with_logical_constraint(memory.astype(cfg.compute_dtype), ("batch", "layers", "embed"))
    x = apply_blocks(cfg, x, positions, decode=decode, deterministic=deterministic, memory=memory,
                     segment_ids=segment_ids)

    x = make_norm(cfg, "final_norm")(x)
    if return_hidden:
      return x
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = Projection((cfg.vocab_size,), ("embed", "vocab"), use_bias=False, std=cfg.init_std,
                                 dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name="unembed")(x)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return mask_padding(logits.astype(jnp.float32), cfg.valid_vocab_size)

  def init_cache(self, batch_size: int) -> Any:
    """Empty KV cache for `batch_size` sequences of up to `max_len` tokens."""
    tokens = jnp.zeros((batch_size, 1), jnp.int32)
    variables = jax.eval_shape(lambda: self.init(jax.random.key(0), tokens, decode=True))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])
