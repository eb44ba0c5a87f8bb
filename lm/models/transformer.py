"""Decoder-only Transformer language model (GPT-2 and Llama families).

`TransformerConfig.variant` picks the family's defaults; every choice can also
be set on its own (e.g. GPT-2 without biases, as nanoGPT's baseline uses):

| option          | gpt2        | llama     |
|-----------------|-------------|-----------|
| position        | learned     | rope      |
| norm            | layernorm   | rmsnorm   |
| mlp             | gelu        | swiglu    |
| use_bias        | True        | False     |
| tie_embeddings  | True        | False     |
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models import fused_loss, layers

VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False),
}
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
    # Keep only the query/key/value projections (named in layers.Attention); recompute the rest.
    "qkv_proj": jax.checkpoint_policies.save_only_these_names(*layers.QKV_NAMES),
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CHOICES = {
    "variant": tuple(VARIANT_DEFAULTS),
    "position": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu"),
    "attention_impl": ("xla", "cudnn", "auto"),
    "loss_impl": ("auto", "fused", "logits"),
    "remat_policy": tuple(REMAT_POLICIES),
    "dtype": tuple(DTYPES),
    "param_dtype": tuple(DTYPES),
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Static hyperparameters of `TransformerLM` (hashable, so jit can close over it)."""

  vocab_size: int  # rows of the embedding table (padded to a multiple of model.vocab_multiple)
  num_layers: int
  num_heads: int
  width: int
  max_len: int
  num_kv_heads: int | None = None  # grouped-query attention when < num_heads
  mlp_dim: int | None = None  # default: 4 * width (gelu), 8/3 * width rounded to 64 (swiglu)
  variant: str = "gpt2"
  position: str = "learned"
  norm: str = "layernorm"
  mlp: str = "gelu"
  use_bias: bool = True
  tie_embeddings: bool = True
  dropout: float = 0.0
  norm_eps: float = 1e-5
  gelu_approximate: bool = False  # exact erf GELU (nanoGPT, PyTorch's default); True: GPT-2's tanh form
  rope_theta: float = 10_000.0
  init_std: float = 0.02
  dtype: str = "float32"  # computation
  param_dtype: str = "float32"  # storage (master weights)
  # xla | cudnn (flash attention on NVIDIA GPUs) | auto (cudnn where it can run, else xla);
  # `resolve_attention` settles it for the devices at hand and says why it falls back.
  attention_impl: str = "xla"
  remat_policy: str = "none"
  scan_layers: bool = False
  # The training/eval loss: logits (full [batch, length, vocab] float32 logits), fused
  # (lm.models.fused_loss: chunk_len positions at a time, no full logits), or auto: fused when the
  # full logits would take >= fused_loss_min_mb per device.
  loss_impl: str = "auto"
  loss_chunk_len: int = 128
  fused_loss_min_mb: float = 256.0
  # Ids the data can hold; those from here to vocab_size are padding (a vocabulary padded to a multiple of
  # 128 for the matmul units): their logits are -1e9, so they take no probability. None: no padding.
  valid_vocab_size: int | None = None

  @classmethod
  def from_config(cls, model: Mapping[str, Any], vocab_size: int, max_len: int) -> TransformerConfig:
    """Builds the config from the `model` group of an experiment config.

    Fields left as None take the variant's default (table in the module doc).
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(model).items() if k in fields and v is not None}
    values.update(vocab_size=vocab_size, max_len=max_len)
    for key, default in VARIANT_DEFAULTS[values.get("variant", "gpt2")].items():
      values.setdefault(key, default)
    return cls(**values)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def hidden_dim(self) -> int:
    if self.mlp_dim:
      return self.mlp_dim
    if self.mlp == "swiglu":
      return 64 * round(8 * self.width / 3 / 64) or 64
    return 4 * self.width

  @property
  def attention_impl_for_decode(self) -> str:
    # cuDNN's fused kernel needs query and key lengths to match the causal
    # pattern; decoding attends a few queries over the whole cache, which XLA
    # handles well.
    return "xla"

  def fused_loss(self, batch: int, length: int, devices: int = 1) -> bool:
    """Whether the loss of a [batch, length] (global) batch on `devices` devices uses `fused_loss`."""
    if self.loss_impl != "auto":
      return self.loss_impl == "fused"
    logits_bytes = batch * length * self.vocab_size * 4 / max(devices, 1)
    return logits_bytes >= self.fused_loss_min_mb * 2**20

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self) -> Any:
    return DTYPES[self.param_dtype]

  def __post_init__(self):
    for name, allowed in CHOICES.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}.")
    if self.width % self.num_heads:
      raise ValueError(f"model.width={self.width} must be divisible by model.num_heads={self.num_heads}.")
    if self.num_heads % self.kv_heads:
      raise ValueError(
          f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.kv_heads}.")
    if self.position == "rope" and (self.width // self.num_heads) % 2:
      raise ValueError("RoPE needs an even head dimension (model.width / model.num_heads).")
    if self.valid_vocab_size is not None and not 0 < self.valid_vocab_size <= self.vocab_size:
      raise ValueError(f"valid_vocab_size={self.valid_vocab_size} must be in [1, vocab_size={self.vocab_size}].")
    if self.loss_chunk_len < 1:
      raise ValueError(f"model.loss_chunk_len={self.loss_chunk_len} must be >= 1 (positions per loss chunk).")


def resolve_attention(config: TransformerConfig, platform: str | None = None,
                      compute_capability: str | None = None) -> tuple[TransformerConfig, str | None]:
  """Settles attention_impl "cudnn"/"auto" for the devices at hand: (config with xla or cudnn, why not cudnn).

  The reason is None when the config keeps what it asked for (or asked for
  xla). Defaults: JAX's default backend and its first device's compute
  capability.
  """
  if config.attention_impl == "xla":
    return config, None
  if platform is None:
    platform = jax.default_backend()
    if platform == "gpu":
      compute_capability = getattr(jax.local_devices()[0], "compute_capability", None)
  problem = layers.cudnn_attention_problem(config, platform, compute_capability)
  if problem is None:
    return dataclasses.replace(config, attention_impl="cudnn"), None
  return dataclasses.replace(config, attention_impl="xla"), problem


class Block(nn.Module):
  """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

  `causal=False` makes the attention bidirectional (an encoder's block);
  `memory` and `key_mask` are passed to `layers.Attention`.
  """

  config: TransformerConfig
  decode: bool = False
  deterministic: bool = True
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, memory: jax.Array | None = None,
               key_mask: jax.Array | None = None) -> tuple[jax.Array, None]:
    """x: [batch, length, embed], memory: [batch, embed] | None -> ([batch, length, embed], None).

    The (carry, None) return is the form `nn.scan` needs.
    """
    cfg = self.config
    attn_in = layers.make_norm(cfg, "attn_norm")(x)
    attention = layers.Attention(cfg, decode=self.decode, causal=self.causal, name="attn")
    x = x + attention(attn_in, positions, self.deterministic, memory=memory, key_mask=key_mask)
    mlp_in = layers.make_norm(cfg, "mlp_norm")(x)
    x = x + layers.Mlp(cfg, name="mlp")(mlp_in, self.deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, None


def apply_blocks(cfg: TransformerConfig, x: jax.Array, positions: jax.Array, *, decode: bool, deterministic: bool,
                 causal: bool = True, memory: jax.Array | None = None,
                 key_mask: jax.Array | None = None) -> jax.Array:
  """Runs `cfg.num_layers` blocks on x [batch, length, embed] -> [batch, length, embed].

  Call it from inside a module's compact method: the blocks become that
  module's children, `layers` (stacked, with `scan_layers`) or `layer_{i}`,
  so the decoder and the VAE's encoder share one layout. memory: [batch,
  num_layers, embed] | None, slice i goes to layer i (scanned over layers
  with `scan_layers`). key_mask: [batch, length] bool | None, for every layer.
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
        in_axes=(nn.broadcast, nn.broadcast if memory is None else 0, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, decode=decode, deterministic=deterministic, causal=causal, name="layers")
    x, _ = stack(x, positions, layer_memory, key_mask)
  else:
    for i in range(cfg.num_layers):
      layer_memory = None if memory is None else memory[:, i]
      x, _ = block(cfg, decode=decode, deterministic=deterministic, causal=causal, name=f"layer_{i}")(
          x, positions, layer_memory, key_mask)
  return x


class TransformerLM(nn.Module):
  """Decoder-only language model.

  Call with tokens [batch, length] (int32) and get logits [batch, length,
  vocab] (float32). With `decode=True` the module reads and writes the `cache`
  collection (create it with `init_cache`), and positions continue from the
  number of tokens already cached.
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
  ) -> jax.Array:
    """tokens: [batch, length] -> logits [batch, length, vocab] (hidden [batch, length, embed] with return_hidden).

    Optional conditioning (e.g. on a VAE's latent; both None for a plain LM):
      condition: [batch, width], added to every token's embedding.
      memory: [batch, num_layers, width], one extra key/value slot per layer
        that every position attends to (`layers.Attention`); not cached, so
        pass the same memory on every decoding call.
    """
    cfg = self.config
    batch, length = tokens.shape
    if condition is not None and condition.shape != (batch, cfg.width):
      raise ValueError(f"condition has shape {condition.shape}; pass [batch, width] = {(batch, cfg.width)}.")
    if memory is not None and memory.shape != (batch, cfg.num_layers, cfg.width):
      raise ValueError(f"memory has shape {memory.shape}; pass [batch, num_layers, width] = "
                       f"{(batch, cfg.num_layers, cfg.width)}, one slot per layer.")
    tokens = nn.with_logical_constraint(tokens, ("batch", "length"))
    if decode:
      index = self.variable("cache", "position", lambda: jnp.array(0, dtype=jnp.int32))
      start = index.value
      if self.has_variable("cache", "position") and not self.is_initializing():
        index.value = start + length
    else:
      start = 0
    positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))

    embed = layers.token_embedding(cfg)
    x = layers.add_learned_positions(self, cfg, embed(tokens), positions)
    if condition is not None:
      x = x + condition[:, None, :].astype(cfg.compute_dtype)
    x = nn.Dropout(rate=cfg.dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if memory is not None:
      memory = nn.with_logical_constraint(memory.astype(cfg.compute_dtype), ("batch", "layers", "embed"))
    x = apply_blocks(cfg, x, positions, decode=decode, deterministic=deterministic, memory=memory)

    x = layers.make_norm(cfg, "final_norm")(x)
    if return_hidden:
      return x
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = layers.Projection((cfg.vocab_size,), ("embed", "vocab"), use_bias=False, std=cfg.init_std,
                                 dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name="unembed")(x)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return fused_loss.mask_padding(logits.astype(jnp.float32), cfg.valid_vocab_size)

  def init_cache(self, batch_size: int) -> Any:
    """Empty KV cache for `batch_size` sequences of up to `max_len` tokens."""
    tokens = jnp.zeros((batch_size, 1), jnp.int32)
    variables = jax.eval_shape(lambda: self.init(jax.random.key(0), tokens, decode=True))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])
