"""Building blocks of the Transformer: norms, rotary embeddings, attention, MLP.

Every parameter is created with `nn.with_logical_partitioning` and every large
activation passes through `nn.with_logical_constraint`, both with logical axis
names (`batch`, `length`, `embed`, `heads`, `kv`, `mlp`, `vocab`). Which mesh
axis each name maps to is decided by the rules in the experiment config, so
sharding never needs a code change.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.ad_checkpoint import checkpoint_name

from lm.kernels import attention as cpu_attention
from lm.kernels import gelu as cpu_gelu
from lm.kernels import layernorm as cpu_layernorm
from lm.models.quantize import is_quantized, projection_matmul
from lm.models.config import TransformerConfig

Initializer = Callable[..., jax.Array]

# Names of the query/key/value projections' outputs, for remat policies that keep them ("qkv_proj").
QKV_NAMES = ("query_proj", "key_proj", "value_proj")
# cuDNN's flash attention takes these compute dtypes (jax._src.cudnn.fused_attention_stablehlo).
CUDNN_DTYPES = ("bfloat16", "float16")
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
  if message not in _WARNED:
    _WARNED.add(message)
    logging.warning("%s", message)


def cudnn_attention_problem(config: TransformerConfig, platform: str, compute_capability: str | None = None
                            ) -> str | None:
  """Why cuDNN's flash attention cannot run this model on `platform` ("cpu", "gpu", "tpu"); None if it can.

  The conditions are those `jax.nn.dot_product_attention(implementation="cudnn")`
  checks: an NVIDIA GPU, bfloat16/float16 inputs, a head dimension that is a
  multiple of 8 and at most 128 (256 on Hopper, compute capability 9.0+).
  """
  if platform != "gpu":
    return f"cuDNN flash attention needs an NVIDIA GPU, and this run's devices are {platform}"
  if config.dtype not in CUDNN_DTYPES:
    return (f"cuDNN flash attention takes bfloat16 or float16, and model.dtype={config.dtype}; set "
            "model.dtype=bfloat16")
  head_dim = config.width // config.num_heads
  hopper = compute_capability is not None and tuple(int(x) for x in compute_capability.split(".")[:2]) >= (9, 0)
  limit = 256 if hopper else 128
  if head_dim % 8 or head_dim > limit:
    return (f"cuDNN flash attention needs a head dimension (model.width / model.num_heads) that is a multiple "
            f"of 8 and at most {limit}, and this model's is {head_dim}; change model.num_heads")
  return None


def segment_mask(segment_ids: jax.Array, causal: bool = True) -> jax.Array:
  """Which keys each query sees when a row packs several documents: [batch, 1, length, length] bool.

  segment_ids: [batch, length] int, equal ids = same document. A query sees
  the keys of its own document (only the earlier ones and itself when
  `causal`), never another document's, so a packed window scores each
  document as if it were alone. The axis of size 1 broadcasts over heads.
  """
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  if causal:
    length = segment_ids.shape[1]
    same = same & jnp.tril(jnp.ones((length, length), bool))
  return same[:, None]


def settle_attention_impl(config: TransformerConfig, platform: str,
                          compute_capability: str | None = None) -> tuple[str, str | None]:
  """What `config.attention_impl` runs on `platform`: (xla, cudnn or cpu, why not the one asked for or None).

  "cudnn" and "cpu" fall back to "xla" when they cannot run (the reason is
  returned); "auto" tries cuDNN, then lm's CPU kernel, then XLA.
  """
  impl = config.attention_impl
  if impl == "xla":
    return "xla", None
  problems = []
  if impl in ("cudnn", "auto"):
    problem = cudnn_attention_problem(config, platform, compute_capability)
    if problem is None:
      return "cudnn", None
    problems.append(problem)
  if impl in ("cpu", "auto"):
    problem = cpu_attention.problem(platform, config.dtype, config.max_len)
    if problem is None:
      return "cpu", None
    problems.append(problem)
  return "xla", "; ".join(problems)


def _attention(query: jax.Array, key: jax.Array, value: jax.Array, causal: bool, config: TransformerConfig,
               mask: jax.Array | None = None) -> jax.Array:
  """Self-attention [batch, length, heads, head_dim] through `config.attention_impl`: causal or full, and
  with `mask` [batch, 1, length, length] bool (True: the key is seen; it already holds the causal part) when
  the rows pack several documents (`segment_mask`).

  A config from `build_experiment` is settled to "xla", "cudnn" or "cpu" already
  (`transformer.resolve_attention`); one built by hand may still say "auto",
  which is settled here (`settle_attention_impl`). cuDNN is then tried, and
  where it refuses the shape at trace time XLA's attention runs, with a
  warning naming the reason.

  cuDNN takes the mask as an additive bias [batch, 1, length, length] (0 or a
  large negative, `jax.nn.dot_product_attention` converts it) next to its own
  causal mask, which still lets it skip the blocks above the diagonal; its
  segment-id ("packed") layout is not reachable through `jax.nn`. lm's CPU
  kernel (`lm.kernels.attention`) takes no mask: packed rows, and a mesh that
  splits the sequence or head dimension, use XLA's attention, with a warning.
  """
  impl = config.attention_impl
  platform = jax.default_backend()
  if impl == "auto":
    device = jax.local_devices()[0]
    impl, _ = settle_attention_impl(config, platform, getattr(device, "compute_capability", None))
  if impl == "cpu":
    problem = ("it takes no document mask (packed rows)" if mask is not None
               else cpu_attention.mesh_problem(query.shape) or cpu_attention.mesh_problem(key.shape)
               or cpu_attention.problem(platform, jnp.dtype(query.dtype).name, query.shape[-3]))
    if problem is None:
      return cpu_attention.attention(query, key, value, causal)
    _warn_once(f"lm's fused CPU attention cannot run here: {problem}; using XLA's attention instead: same "
               "result, no fused kernel. Set model.attention_impl=xla to silence this.")
    impl = "xla"
  if impl == "cudnn" and mask is not None and query.shape[1] % 2:
    # jax checks this only when differentiating (check_is_flash_attention: a bias needs even lengths in
    # training), which under remat or scan happens after this function returns: too late to fall back.
    _warn_once(f"cuDNN attention with a document mask needs an even sequence length, and this one's is "
               f"{query.shape[1]}; using XLA's attention instead: same result, no flash kernel. Set "
               "model.attention_impl=xla to silence this.")
    impl = "xla"
  if impl == "cudnn":
    try:
      return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=causal, implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError) as error:
      masked = "" if mask is None else " with a document mask"
      _warn_once(f"cuDNN attention cannot take query {tuple(query.shape)} {jnp.dtype(query.dtype).name}{masked} "
                 f"on {platform} ({error}); using XLA's attention instead: same result, no flash kernel. Set "
                 "model.attention_impl=xla to silence this.")
  if mask is not None:
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")
  return jax.nn.dot_product_attention(query, key, value, is_causal=causal, implementation="xla")


def param_init(std: float, axes: tuple[str, ...]) -> Initializer:
  """Normal(0, std) initializer that records the parameter's logical axes."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def zeros_init(axes: tuple[str, ...]) -> Initializer:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: tuple[str, ...]) -> Initializer:
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


class Projection(nn.Module):
  """A linear map between named axes, `y = einsum(x, kernel) + bias`.

  flax's DenseGeneral initializes its kernel flattened to 2-D, which breaks
  logical sharding constraints on 3-D kernels; this creates the kernel in its
  real shape (`in_features + out_features`) so every axis keeps its name.
  """

  out_features: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  num_in_axes: int = 1
  use_bias: bool = True
  std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.num_in_axes:]
    kernel = self.param("kernel", param_init(self.std, self.kernel_axes), in_shape + tuple(self.out_features),
                        self.param_dtype)

    def add_bias(y: jax.Array) -> jax.Array:
      if self.use_bias:
        bias_axes = self.kernel_axes[self.num_in_axes:]
        bias = self.param("bias", zeros_init(bias_axes), tuple(self.out_features), self.param_dtype)
        y = y + bias.astype(self.dtype)
      return y

    batch_shape = x.shape[:x.ndim - self.num_in_axes]
    rows, in_size, out_size = math.prod(batch_shape), math.prod(in_shape), math.prod(self.out_features)
    if is_quantized(kernel):  # int8 values and per-channel scales (lm.models.quantize)
      x2d = x.astype(self.dtype).reshape(rows, in_size)
      y = projection_matmul(x2d, kernel, in_size, out_size, self.dtype)
      return add_bias(y.reshape(batch_shape + tuple(self.out_features)))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    # The same contraction as one 2-D matmul [rows, in] @ [in, out]: reshapes of
    # contiguous axes are free, and XLA:CPU lowers a 2-D dot (and its two
    # gradients) to plain GEMMs. With the leading [batch, length] axes kept, the
    # kernel gradient contracts two axes, and XLA fused that transpose into the
    # GELU's backward as one slow strided loop (BENCHMARKS.md, CPU section).
    y = jnp.dot(x.reshape(rows, in_size), kernel.reshape(in_size, out_size))
    return add_bias(y.reshape(batch_shape + tuple(self.out_features)))


def token_embedding(config: TransformerConfig) -> nn.Embed:
  """The token table [vocab, embed], named "embed" in the calling module (the LM's and the VAE encoder's)."""
  return nn.Embed(
      num_embeddings=config.vocab_size,
      features=config.width,
      dtype=config.compute_dtype,
      param_dtype=config.weight_dtype,
      embedding_init=param_init(config.init_std, ("vocab", "embed")),
      name="embed",
  )


def add_learned_positions(module: nn.Module, config: TransformerConfig, x: jax.Array,
                          positions: jax.Array) -> jax.Array:
  """x + the learned position table's rows [batch, length, embed] when `config.position` is "learned".

  The table [max_len, embed] is the calling `module`'s "position_embedding"
  parameter, so checkpoints keep their parameter names.
  """
  if config.position != "learned":
    return x
  table = module.param("position_embedding", param_init(config.init_std, ("length", "embed")),
                       (config.max_len, config.width), config.weight_dtype)
  return x + jnp.take(table, positions, axis=0).astype(config.compute_dtype)


def settle_norm_impl(config: TransformerConfig, platform: str) -> tuple[str, str | None]:
  """What `config.norm_impl` runs on `platform`: (xla or cpu, why not the kernel asked for, or None)."""
  if config.norm_impl == "xla":
    return "xla", None
  if config.norm != "layernorm":
    return "xla", f"lm's norm kernel is a LayerNorm, and model.norm={config.norm}"
  problem = cpu_layernorm.problem(platform, config.dtype)
  return ("xla", problem) if problem else ("cpu", None)


class KernelLayerNorm(nn.Module):
  """flax's `nn.LayerNorm` (the same parameters, names and float32 arithmetic) through lm's XLA:CPU kernel.

  `make_norm` builds it for float32 models where the kernel can run. Where
  it cannot at trace time (a mesh splitting the normalized axis) flax's
  formula computes it here, with a warning.
  """

  epsilon: float
  use_bias: bool
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    scale = self.param("scale", ones_init(("embed",)), features, self.param_dtype)
    bias = self.param("bias", zeros_init(("embed",)), features, self.param_dtype) if self.use_bias else None
    # make_norm builds this module only for float32 compute; parameters stored in another dtype (param_dtype)
    # are computed with in float32, as flax's LayerNorm does.
    x, scale = x.astype(jnp.float32), scale.astype(jnp.float32)
    bias = None if bias is None else bias.astype(jnp.float32)
    axes = ("batch", "length", "embed")[-x.ndim:]
    problem = (cpu_layernorm.mesh_problem(axes, x.shape) if x.ndim <= 3
               else "it takes [batch, length, embed] activations")
    if problem is None:
      return cpu_layernorm.layer_norm(x, scale, bias, self.epsilon, axes)
    _warn_once(f"lm's LayerNorm kernel cannot run here: {problem}; using flax's LayerNorm instead: same result. "
               "Set model.norm_impl=xla to silence this.")
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(x * x, -1, keepdims=True) - mean * mean)
    y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale)
    return y if bias is None else y + bias


def make_norm(config: TransformerConfig, name: str) -> nn.Module:
  """LayerNorm (GPT-2; flax's, or lm's CPU kernel with norm_impl cpu) or RMSNorm (Llama), parameters on the
  `embed` axis."""
  if config.norm == "layernorm":
    impl, problem = settle_norm_impl(config, jax.default_backend())
    if problem and config.norm_impl == "cpu":
      _warn_once(f"lm's LayerNorm kernel cannot run here: {problem}; using flax's LayerNorm instead: same "
                 "result. Set model.norm_impl=xla to silence this.")
    if impl == "cpu":
      return KernelLayerNorm(epsilon=config.norm_eps, use_bias=config.use_bias, param_dtype=config.weight_dtype,
                             name=name)
    return nn.LayerNorm(
        epsilon=config.norm_eps,
        use_bias=config.use_bias,
        dtype=config.compute_dtype,
        param_dtype=config.weight_dtype,
        scale_init=ones_init(("embed",)),
        bias_init=zeros_init(("embed",)),
        name=name,
    )
  return nn.RMSNorm(
      epsilon=config.norm_eps,
      dtype=config.compute_dtype,
      param_dtype=config.weight_dtype,
      scale_init=ones_init(("embed",)),
      name=name,
  )


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), rotate-half convention.

  Args:
    x: [batch, length, heads, head_dim].
    positions: [batch, length] integer positions.
    theta: base of the geometric frequency progression.
  Returns:
    [batch, length, heads, head_dim], same dtype as `x`.
  """
  head_dim = x.shape[-1]
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, l, half]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class Attention(nn.Module):
  """Multi-head (or grouped-query) self-attention with a KV cache.

  Causal by default; `causal=False` gives the bidirectional attention of an
  encoder. In decode mode the keys and values of every call are written into
  the `cache` collection at the running `cache_index`, so a prompt can be
  prefilled in one call and then extended one token at a time (decoding is
  always causal).

  Two optional inputs, both None for a plain LM (then the computation is the
  unchanged fast path):
    * `memory` [batch, embed]: one extra key/value slot, made by this layer's
      own key and value projections, that every query attends to and no mask
      hides (the latent "memory" of Optimus, Li et al. 2020). It is not
      written into the cache: pass it on every decoding call.
    * `key_mask` [batch, length] bool: False hides that key (padding in an
      encoder's batch). Not for decode mode.
    * `segment_ids` [batch, length] int: the document of each token when a
      row packs several; a query then sees only its own document's keys
      (`segment_mask`). Not for decode mode.
  """

  config: TransformerConfig
  decode: bool = False
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, deterministic: bool, memory: jax.Array | None = None,
               key_mask: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """x: [batch, length, embed], positions: [batch, length] -> [batch, length, embed]."""
    cfg = self.config
    head_dim = cfg.width // cfg.num_heads
    def dense(features, axes, name, num_in_axes=1, std=cfg.init_std):
      return Projection(features, axes, num_in_axes=num_in_axes, use_bias=cfg.use_bias, std=std,
                        dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name=name)

    if self.decode and key_mask is not None:
      raise ValueError("Attention(decode=True) takes no key_mask: the cache already hides the positions not "
                       "yet written; pass key_mask only to a full (encoder) forward.")
    if self.decode and segment_ids is not None:
      raise ValueError("Attention(decode=True) takes no segment_ids: decoding continues one document; pass "
                       "segment_ids only to a full forward over packed windows.")
    key_projection = dense((cfg.kv_heads, head_dim), ("embed", "heads", "kv"), "key")
    value_projection = dense((cfg.kv_heads, head_dim), ("embed", "heads", "kv"), "value")
    query = checkpoint_name(dense((cfg.num_heads, head_dim), ("embed", "heads", "kv"), "query")(x), QKV_NAMES[0])
    key = checkpoint_name(key_projection(x), QKV_NAMES[1])
    value = checkpoint_name(value_projection(x), QKV_NAMES[2])
    if cfg.position == "rope":
      query = apply_rope(query, positions, cfg.rope_theta)
      key = apply_rope(key, positions, cfg.rope_theta)
    axes = ("batch", "length", "heads", "kv")
    query = nn.with_logical_constraint(query, axes)
    key = nn.with_logical_constraint(key, axes)
    value = nn.with_logical_constraint(value, axes)

    if self.decode:
      key, value, mask = self._update_cache(key, value)
    elif memory is None and key_mask is None:
      mask = None if segment_ids is None else segment_mask(segment_ids, self.causal)
    else:
      length = key.shape[1]
      visible = jnp.ones((length, length), bool)
      mask = (jnp.tril(visible) if self.causal else visible)[None, None]
      if key_mask is not None:
        mask = mask & key_mask.astype(bool)[:, None, None, :]
      if segment_ids is not None:
        mask = mask & segment_mask(segment_ids, causal=False)
    if memory is not None:
      # The memory key is not rotated: under RoPE it sits at position 0, so
      # the full forward and cached decoding score it identically.
      memory_key = nn.with_logical_constraint(key_projection(memory[:, None]).astype(key.dtype), axes)
      memory_value = nn.with_logical_constraint(value_projection(memory[:, None]).astype(value.dtype), axes)
      key = jnp.concatenate([memory_key, key], axis=1)
      value = jnp.concatenate([memory_value, value], axis=1)
      mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (1,), bool), mask], axis=-1)

    if mask is None:
      out = _attention(query, key, value, self.causal, cfg)
    elif not self.decode and memory is None and key_mask is None:
      # Packed documents (segment_ids) alone: a square mask that cuDNN's kernel takes too (`_attention`).
      out = _attention(query, key, value, self.causal, cfg, mask=mask)
    else:
      # An explicit mask (cache, memory slot, padding) with key length !=
      # query length: XLA's implementation takes any mask; the fused cuDNN
      # kernel is kept for the plain causal path that training uses.
      out = jax.nn.dot_product_attention(
          query, key, value, mask=mask, implementation=cfg.attention_impl_for_decode)
    out = nn.with_logical_constraint(out, axes)
    # GPT-2 scales the residual projections by 1/sqrt(2 * num_layers) so the
    # residual stream's variance does not grow with depth.
    residual_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    out = dense((cfg.width,), ("heads", "kv", "embed"), "out", num_in_axes=2, std=residual_std)(out)
    return nn.Dropout(rate=cfg.dropout)(out, deterministic=deterministic)

  def _update_cache(self, key: jax.Array, value: jax.Array):
    """Writes [batch, new, kv_heads, head_dim] keys/values at the cache index.

    Returns the full cached keys and values [batch, max_len, kv_heads,
    head_dim] and the mask [1, 1, new, max_len] that lets each new token see
    every cached position up to and including its own.
    """
    batch, new, kv_heads, head_dim = key.shape
    max_len = self.config.max_len
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, (batch, max_len, kv_heads, head_dim), key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, (batch, max_len, kv_heads, head_dim), value.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
    index = cache_index.value
    if initialized:
      cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
      cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, index, 0, 0))
      cache_index.value = index + new
    query_positions = index + jnp.arange(new)
    mask = jnp.arange(max_len)[None, :] <= query_positions[:, None]
    return cached_key.value, cached_value.value, mask[None, None]


def settle_gelu_impl(config: TransformerConfig, platform: str) -> tuple[str, str | None]:
  """What `config.gelu_impl` runs on `platform`: (xla or cpu, why not the kernel asked for, or None)."""
  if config.gelu_impl == "xla":
    return "xla", None
  if config.mlp != "gelu" or config.gelu_approximate:
    return "xla", "lm's GELU kernel is the exact GELU, and this model's MLP is " + (
        f"model.mlp={config.mlp}" if config.mlp != "gelu" else "the tanh approximation (model.gelu_approximate)")
  problem = cpu_gelu.problem(platform, config.dtype)
  return ("xla", problem) if problem else ("cpu", None)


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
  """GELU; the exact form as `x/2 * (1 + erf(x/sqrt(2)))`, PyTorch's formula.

  jax.nn.gelu writes it with erfc, which XLA:CPU expands into two branches
  (one with an exp) where erf is one rational polynomial: about 1.5x the
  elementwise work (BENCHMARKS.md, CPU section). The two differ by < 1e-6.
  """
  if approximate:
    return nn.gelu(x, approximate=True)
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


class Mlp(nn.Module):
  """GELU MLP (GPT-2) or SwiGLU (Llama); hidden units on the `mlp` axis."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    """x: [batch, length, embed] -> [batch, length, embed]."""
    cfg = self.config
    def dense(features, axes, name, std=cfg.init_std):
      return Projection((features,), axes, use_bias=cfg.use_bias, std=std, dtype=cfg.compute_dtype,
                        param_dtype=cfg.weight_dtype, name=name)

    if cfg.mlp == "swiglu":
      gate = dense(cfg.hidden_dim, ("embed", "mlp"), "gate")(x)
      up = dense(cfg.hidden_dim, ("embed", "mlp"), "up")(x)
      hidden = nn.silu(gate) * up
    else:
      up = dense(cfg.hidden_dim, ("embed", "mlp"), "up")(x)
      impl, problem = settle_gelu_impl(cfg, jax.default_backend())
      if impl == "cpu":  # what only the traced activation tells: its rank, its split over the mesh
        problem = ("it takes [batch, length, mlp] activations" if up.ndim != 3
                   else cpu_gelu.mesh_problem(("batch", "length", "mlp"), up.shape))
        impl = "xla" if problem else "cpu"
      elif cfg.gelu_impl != "cpu":
        problem = None  # auto chose XLA's GELU, and build_experiment logged why
      if problem:
        _warn_once(f"lm's GELU kernel cannot run here: {problem}; using XLA's GELU instead: same result. Set "
                   "model.gelu_impl=xla to silence this.")
      hidden = cpu_gelu.gelu(up, ("batch", "length", "mlp")) if impl == "cpu" else gelu(
          up, approximate=cfg.gelu_approximate)
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    residual_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    out = dense(cfg.width, ("mlp", "embed"), "down", std=residual_std)(hidden)
    return nn.Dropout(rate=cfg.dropout)(out, deterministic=deterministic)
