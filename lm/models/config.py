"""`TransformerConfig`: the backbone's static hyperparameters, and the `model` group of the run config.

The dataclass is the one place the model's defaults are written: the run
config's `model.*` fields (`CONFIG`) are derived from it, with the fields a
variant decides (position, norm, mlp, use_bias, tie_embeddings) left unset
until `TransformerConfig.from_config` fills them from `VARIANT_DEFAULTS`:

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

import jax.numpy as jnp
import ml_collections
from ml_collections.config_dict import placeholder

from lm.core.configs import ConfigPart, require

VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False),
}
# `model.remat_policy` names; what each keeps is `lm.models.transformer.REMAT_POLICIES`.
REMAT_POLICY_NAMES = ("none", "full", "nothing_saveable", "minimal", "dots_with_no_batch_dims_saveable",
                      "dots_saveable", "qkv_proj", "everything_saveable")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CHOICES = {
    "variant": tuple(VARIANT_DEFAULTS),
    "position": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu"),
    "attention_impl": ("xla", "cudnn", "cpu", "auto"),
    "norm_impl": ("xla", "cpu", "auto"),
    "gelu_impl": ("xla", "cpu", "auto"),
    "loss_impl": ("auto", "fused", "logits"),
    "remat_policy": REMAT_POLICY_NAMES,
    "dtype": tuple(DTYPES),
    "param_dtype": tuple(DTYPES),
}


# Model fields that change parameter shapes: a checkpoint written with other
# values cannot be restored into this model (lm.experiment.build; a distillation
# run's teacher, lm.tasks.distill).
SHAPE_FIELDS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "width", "mlp_dim", "max_len", "position",
                "norm", "mlp", "use_bias", "tie_embeddings", "scan_layers", "param_dtype")


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
  # xla | cudnn (flash attention on NVIDIA GPUs) | cpu (lm's fused float32 attention kernel for XLA:CPU,
  # lm/kernels) | auto (cudnn where it can run, else cpu where it can, else xla); `resolve_attention`
  # settles it for the devices at hand and says why it falls back.
  attention_impl: str = "xla"
  # xla (flax's LayerNorm) | cpu (lm's float32 LayerNorm kernel for XLA:CPU, lm/kernels) | auto (cpu where it
  # can run, else xla); `resolve_kernel` settles it and says why it falls back. RMSNorm is always flax's.
  norm_impl: str = "xla"
  # The exact GELU (gelu_approximate=False): xla | cpu (lm's float32 kernel for XLA:CPU) | auto, as norm_impl.
  gelu_impl: str = "xla"
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


# -- the `model` group of the run config -------------------------------------------------------------
# The shape of a run's model when the experiment does not set it (the dataclass has no default for these).
SHAPE_DEFAULTS = {"num_layers": 4, "num_heads": 4, "width": 128}
# Set from the data (tokenizer size, seq_len) when left unset: `lm.experiment.build.model_config_for`.
DERIVED = ("vocab_size", "max_len")
# Computed from vocab_size and vocab_multiple, never configured.
NOT_CONFIGURED = ("valid_vocab_size",)
# Read by lm.experiment, not by the model: pad the vocabulary to a multiple of this (128 on accelerators).
RUN_FIELDS = {"vocab_multiple": 1}


def _model_fields() -> dict[str, Any]:
  fields: dict[str, Any] = {}
  for field in dataclasses.fields(TransformerConfig):
    name = field.name
    if name in NOT_CONFIGURED:
      continue
    if name in DERIVED:
      fields[name] = placeholder(int)
    elif name in SHAPE_DEFAULTS:
      fields[name] = SHAPE_DEFAULTS[name]
    elif name in VARIANT_DEFAULTS["gpt2"]:
      fields[name] = placeholder(type(VARIANT_DEFAULTS["gpt2"][name]))  # None: the variant's choice
    elif field.default is None:
      fields[name] = placeholder(int)
    else:
      fields[name] = field.default
  fields.update(RUN_FIELDS)
  return {f"model.{name}": value for name, value in fields.items()}


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  """The `model` group: positive sizes, known choices, divisible widths (TransformerConfig checks the rest)."""
  del mode
  model = config.model
  for key in ("num_layers", "num_heads", "width"):
    require(int(model[key]) > 0, f"config.model.{key} must be a positive integer (got {model[key]!r}).")
  for key, allowed in CHOICES.items():
    value = model.get(key)
    require(value is None or value in allowed, f"config.model.{key}={value!r} is not one of {allowed}.")
  require(model.width % model.num_heads == 0,
          f"config.model.width={model.width} must be divisible by config.model.num_heads={model.num_heads}.")
  for key in ("num_kv_heads", "mlp_dim", "vocab_size", "max_len"):
    require(model[key] is None or model[key] >= 1,
            f"config.model.{key}={model[key]!r} must be a positive integer (or unset: None).")
  if model.num_kv_heads:
    require(model.num_heads % model.num_kv_heads == 0,
            f"config.model.num_heads={model.num_heads} must be a multiple of "
            f"config.model.num_kv_heads={model.num_kv_heads}.")
  require(0.0 <= model.dropout < 1.0, f"config.model.dropout must be in [0, 1) (got {model.dropout}).")
  require(model.vocab_multiple >= 1, "config.model.vocab_multiple must be >= 1.")
  require(int(model.loss_chunk_len) >= 1,
          f"config.model.loss_chunk_len must be >= 1 positions (got {model.loss_chunk_len}).")
  require(float(model.fused_loss_min_mb) >= 0,
          f"config.model.fused_loss_min_mb must be >= 0 MB (got {model.fused_loss_min_mb}).")
  if model.max_len is not None:
    require(model.max_len >= config.seq_len,
            f"config.model.max_len={model.max_len} is shorter than config.seq_len={config.seq_len}.")


CONFIG = ConfigPart("lm.models", _model_fields(), validate)
