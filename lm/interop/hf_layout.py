"""How GPT-2 and Llama checkpoints of Hugging Face map onto lm's TransformerLM, both ways.

Config: `model_fields` reads a `config.json` into TransformerConfig fields and
refuses what lm's model would compute differently (rope scaling, biases in a
Llama, a sliding window shorter than the context, ...); `hf_config_for`
writes one back.

Tensors (D = width, H = heads, K = kv heads, d = head dim, F = MLP hidden):

| lm parameter              | GPT-2 (Conv1D: [in, out])        | Llama/Mistral (Linear: [out, in])   |
|---------------------------|----------------------------------|-------------------------------------|
| embed/embedding [V, D]    | wte.weight                       | embed_tokens.weight                 |
| position_embedding [P, D] | wpe.weight                       | (RoPE)                              |
| attn/query,key,value      | attn.c_attn [D, 3D], split in 3  | self_attn.{q,k,v}_proj [H*d, D], .T |
|   kernel [D, H|K, d]      |                                  |                                     |
| attn/out/kernel [H, d, D] | attn.c_proj [D, D]               | self_attn.o_proj [D, H*d], .T       |
| mlp/up,gate/kernel [D, F] | mlp.c_fc [D, F] (no gate)        | mlp.{up,gate}_proj [F, D], .T       |
| mlp/down/kernel [F, D]    | mlp.c_proj [F, D]                | mlp.down_proj [D, F], .T            |
| attn_norm, mlp_norm       | ln_1, ln_2 (weight, bias)        | input_layernorm, post_attention_... |
| final_norm                | ln_f                             | norm                                |
| unembed/kernel [D, V]     | lm_head.weight .T (when untied)  | lm_head.weight .T (when untied)     |

Heads are the slow-varying index of every projection (`h * d + i`), as both
libraries split them. No q/k permutation is needed for RoPE: lm's
`layers.apply_rope` rotates halves (`[x1 cos - x2 sin, x2 cos + x1 sin]` with
frequencies `theta ** (-2i / d)`), exactly `transformers`' `rotate_half`
convention, and Hugging Face's Llama checkpoints are stored for that
convention (their conversion script already permuted Meta's interleaved q/k).
Grouped-query attention pairs query head h with kv head h // (H / K) in both.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lm.interop.hf_files import SUPPORTED_DTYPES, HFError, WeightFiles, first_of
from lm.models import TransformerConfig

# model_type -> the architectures lm reads (their weights; heads of other tasks are refused).
ARCHITECTURES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Model"),
    "llama": ("LlamaForCausalLM", "LlamaModel"),
    "mistral": ("MistralForCausalLM", "MistralModel"),  # Llama's architecture, plus an optional sliding window
}
# Tensor name prefix of the body (the LM head, lm_head.weight, has none).
PREFIXES = {"gpt2": "transformer.", "llama": "model.", "mistral": "model."}
# Buffers older saves include that hold no weights (GPT-2's causal mask, Llama's rotary frequencies).
IGNORED = {"gpt2": re.compile(r"h\.\d+\.attn\.(masked_)?bias"),
           "llama": re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
           "mistral": re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq")}
# GPT-2 activation names -> lm's gelu_approximate (gelu_new/fast/pytorch_tanh are the same tanh formula).
GPT2_ACTIVATIONS = {"gelu_new": True, "gelu_fast": True, "gelu_pytorch_tanh": True, "gelu": False}
_HINTS = {
    "qwen2": "Qwen2 adds biases to the q/k/v projections, which lm's Llama layout has not",
    "gemma": "Gemma scales embeddings and offsets its RMSNorm weights",
    "phi": "Phi uses partial rotary embeddings and a parallel block",
    "gpt_neox": "GPT-NeoX runs attention and MLP in parallel",
}


def layout_of(model_type: str) -> str:
  """"gpt2" or "llama" (Mistral checkpoints use Llama's layout)."""
  return "gpt2" if model_type == "gpt2" else "llama"


_MISSING = object()


def _required(hf: dict[str, Any], key: str, path: Path, *alternatives: str) -> Any:
  value = first_of(hf.get(name) for name in (key,) + alternatives)
  if value is None:
    raise HFError(f"{path} has no {key!r}, which lm needs to build the model. Fix: restore the model's "
                  "original config.json.")
  return value


def _malformed(path: Path, key: str, value: Any, wanted: str) -> HFError:
  shown = repr(value)
  shown = shown if len(shown) <= 80 else shown[:77] + "..."
  return HFError(f"{path}: {key}={shown} is not {wanted}. Fix: restore the model's original config.json.")


def _integer(hf: dict[str, Any], key: str, path: Path, *alternatives: str, default: Any = _MISSING,
             minimum: int = 1) -> int:
  """An integer field of config.json (the first of `key`, `alternatives` that is set), >= `minimum`."""
  name = next((name for name in (key,) + alternatives if hf.get(name) is not None), key)
  value = hf.get(name)
  if value is None and default is not _MISSING:
    return default
  value = _required(hf, key, path, *alternatives)
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < 2**31:
    raise _malformed(path, name, value, f"an integer from {minimum} to 2**31 - 1")
  return value


def _real(hf: dict[str, Any], key: str, path: Path, default: float, *, positive: bool = False) -> float:
  """A number of config.json (`default` when unset), finite (and > 0 with `positive`)."""
  value = first_of((hf.get(key), default))
  try:
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
  except OverflowError:  # an integer too large for a float
    number = None
  if number is None or not np.isfinite(number) or (positive and number <= 0):
    raise _malformed(path, key, value, "a positive number" if positive else "a finite number")
  return number


def model_type_of(hf: dict[str, Any], path: Path) -> str:
  """The config's model_type after checking it and its architectures are ones lm reads."""
  model_type = hf.get("model_type")
  if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
    hint = _HINTS.get(str(model_type), "")
    raise HFError(f"{path}: model_type {model_type!r} is not supported{' (' + hint + ')' if hint else ''}. lm "
                  f"reads {', '.join(ARCHITECTURES)} (Mistral as Llama's architecture). Fix: use a GPT-2 or "
                  "Llama-family checkpoint.")
  architectures = hf.get("architectures") or []
  if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
    raise _malformed(path, "architectures", architectures, "a list of class names (e.g. [\"LlamaForCausalLM\"])")
  others = [name for name in architectures if name not in ARCHITECTURES[model_type]]
  if others:
    raise HFError(f"{path}: architecture {others[0]!r} is not a causal language model lm reads; for model_type "
                  f"{model_type!r} it reads {', '.join(ARCHITECTURES[model_type])}. Fix: save the causal LM "
                  "(e.g. AutoModelForCausalLM) instead.")
  return model_type


def model_fields(hf: dict[str, Any], path: Path, max_len: int | None = None) -> dict[str, Any]:
  """TransformerConfig fields for a Hugging Face config.json (`path` is named in errors).

  Args:
    hf: the parsed config.json.
    path: where it came from.
    max_len: for RoPE models, the longest sequence lm will run (KV cache size;
      default the config's max_position_embeddings). A learned position table
      has exactly n_positions rows, so GPT-2 takes no other value.
  Raises:
    HFError: an unsupported model type, architecture or option, naming the key and the fix.
  """
  model_type = model_type_of(hf, path)
  fields = _gpt2_fields(hf, path, max_len) if model_type == "gpt2" else _llama_fields(hf, path, max_len, model_type)
  heads, kv_heads, width = fields["num_heads"], fields["num_kv_heads"], fields["width"]
  if width % heads or heads % kv_heads:
    raise HFError(f"{path}: a width of {width} with {heads} attention heads and {kv_heads} key/value heads does not "
                  "split into whole heads (width must be a multiple of the heads, the heads of the key/value "
                  "heads). Fix: restore the model's original config.json.")
  if fields["position"] == "rope" and (width // heads) % 2:
    raise HFError(f"{path}: RoPE needs an even head dimension, and {width} / {heads} heads = {width // heads}. Fix: "
                  "restore the model's original config.json.")
  return fields


def _refuse(path: Path, key: str, value: Any, why: str) -> None:
  raise HFError(f"{path}: {key}={value!r} is not supported: {why}. Fix: use a checkpoint without it.")


def _gpt2_fields(hf: dict[str, Any], path: Path, max_len: int | None) -> dict[str, Any]:
  width, heads = _integer(hf, "n_embd", path), _integer(hf, "n_head", path)
  positions = _integer(hf, "n_positions", path, "n_ctx")
  if max_len not in (None, positions):
    raise HFError(f"{path}: n_positions={positions} is the size of GPT-2's learned position table, so the model "
                  f"runs at most {positions} positions (asked for {max_len}). Fix: use seq_len <= {positions}.")
  activation = hf.get("activation_function", "gelu_new")
  if not isinstance(activation, str) or activation not in GPT2_ACTIVATIONS:
    _refuse(path, "activation_function", activation, f"lm's GPT-2 MLP computes GELU ({', '.join(GPT2_ACTIVATIONS)})")
  if not hf.get("scale_attn_weights", True):
    _refuse(path, "scale_attn_weights", False, "lm scales attention logits by 1/sqrt(head_dim)")
  if hf.get("scale_attn_by_inverse_layer_idx", False):
    _refuse(path, "scale_attn_by_inverse_layer_idx", True, "lm scales every layer's attention alike")
  if hf.get("add_cross_attention", False):
    _refuse(path, "add_cross_attention", True, "lm's model is decoder-only")
  return dict(variant="gpt2", num_layers=_integer(hf, "n_layer", path), num_heads=heads, num_kv_heads=heads,
              width=width, mlp_dim=_integer(hf, "n_inner", path, default=None, minimum=0) or 4 * width,
              vocab_size=_integer(hf, "vocab_size", path),
              max_len=positions, position="learned", norm="layernorm", mlp="gelu", use_bias=True,
              tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
              norm_eps=_real(hf, "layer_norm_epsilon", path, 1e-5), rope_theta=10_000.0,
              gelu_approximate=GPT2_ACTIVATIONS[activation])


def _llama_fields(hf: dict[str, Any], path: Path, max_len: int | None, model_type: str) -> dict[str, Any]:
  width, heads = _integer(hf, "hidden_size", path), _integer(hf, "num_attention_heads", path)
  positions = _integer(hf, "max_position_embeddings", path)
  max_len = max_len or positions
  if hf.get("hidden_act", "silu") != "silu":
    _refuse(path, "hidden_act", hf["hidden_act"], "lm's SwiGLU MLP gates with SiLU")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      _refuse(path, key, True, "lm's Llama layout has no projection biases")
  if hf.get("head_dim") not in (None, width // heads):
    _refuse(path, "head_dim", hf["head_dim"], f"lm's head dimension is hidden_size / num_attention_heads = "
            f"{width // heads}")
  rope = hf.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling here
  if not isinstance(rope, dict):
    raise _malformed(path, "rope_parameters", rope, "an object (e.g. {\"rope_type\": \"default\"})")
  if hf.get("rope_scaling"):
    _refuse(path, "rope_scaling", hf["rope_scaling"], "lm's RoPE has no frequency scaling")
  if rope.get("rope_type", "default") != "default":
    _refuse(path, "rope_parameters.rope_type", rope["rope_type"], "lm's RoPE has no frequency scaling")
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    _refuse(path, "rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"], "lm rotates whole heads")
  window = _integer(hf, "sliding_window", path, default=None, minimum=0)
  if window is not None and hf.get("use_sliding_window", True) and window < max_len:
    _refuse(path, "sliding_window", window, f"lm attends to all {max_len} positions, so the logits would differ "
            f"past {window} tokens (a checkpoint with sliding_window null, or seq_len/max_len <= {window}, loads)")
  theta_key = "rope_theta" if hf.get("rope_theta") is not None else "rope_parameters.rope_theta"
  return dict(variant="llama", num_layers=_integer(hf, "num_hidden_layers", path), num_heads=heads,
              num_kv_heads=_integer(hf, "num_key_value_heads", path, default=None, minimum=0) or heads, width=width,
              mlp_dim=_integer(hf, "intermediate_size", path), vocab_size=_integer(hf, "vocab_size", path),
              max_len=max_len, position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False,
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
              norm_eps=_real(hf, "rms_norm_eps", path, 1e-6),
              rope_theta=_real({theta_key: first_of((hf.get("rope_theta"), rope.get("rope_theta")))}, theta_key, path,
                               10_000.0, positive=True),
              gelu_approximate=False)


def export_layout(cfg: TransformerConfig) -> str:
  """"gpt2" or "llama": the Hugging Face layout that computes what `cfg` does; HFError naming the fields if none."""
  wanted = {"gpt2": dict(position="learned", norm="layernorm", mlp="gelu", num_kv_heads=cfg.num_heads),
            "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False)}
  layout = "gpt2" if cfg.position == "learned" else "llama"
  actual = dict(position=cfg.position, norm=cfg.norm, mlp=cfg.mlp, use_bias=cfg.use_bias, num_kv_heads=cfg.kv_heads)
  differences = [f"model.{key}={actual[key]!r} (the {layout} layout needs {value!r})"
                 for key, value in wanted[layout].items() if actual[key] != value]
  if differences:
    raise HFError(f"This model is neither GPT-2's layout (position=learned, norm=layernorm, mlp=gelu, no grouped-query "
                  f"attention) nor Llama's (position=rope, norm=rmsnorm, mlp=swiglu, use_bias=False): "
                  f"{'; '.join(differences)}. Fix: export a model trained with --config.model.variant=gpt2 or llama "
                  "and those fields at their defaults.")
  return layout


def hf_config_for(cfg: TransformerConfig, eos_token_id: int | None = None) -> dict[str, Any]:
  """The config.json of `cfg` exported as GPT-2 or Llama (HFError if it is neither)."""
  common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": cfg.param_dtype,
            "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None, "use_cache": True}
  if export_layout(cfg) == "gpt2":
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
            "n_embd": cfg.width, "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_positions": cfg.max_len,
            "n_ctx": cfg.max_len, "n_inner": cfg.hidden_dim, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new" if cfg.gelu_approximate else "gelu",
            # lm's dropout sits where GPT-2's residual and embedding dropout do; it never drops attention weights.
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
          "hidden_size": cfg.width, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.width // cfg.num_heads,
          "intermediate_size": cfg.hidden_dim, "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
          "rope_theta": cfg.rope_theta, "rope_scaling": None, "hidden_act": "silu", "attention_bias": False,
          "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1}


# -- tensors ---------------------------------------------------------------------------------------------------------

# (HF name within a layer, lm path within a layer, transposed: a torch Linear [out, in] rather than [in, out]).
_LLAMA_LAYER = (
    ("input_layernorm.weight", ("attn_norm", "scale"), False),
    ("self_attn.q_proj.weight", ("attn", "query", "kernel"), True),
    ("self_attn.k_proj.weight", ("attn", "key", "kernel"), True),
    ("self_attn.v_proj.weight", ("attn", "value", "kernel"), True),
    ("self_attn.o_proj.weight", ("attn", "out", "kernel"), True),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), False),
    ("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "up", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "down", "kernel"), True),
)
_GPT2_LAYER = (
    ("ln_1.weight", ("attn_norm", "scale"), False),
    ("ln_1.bias", ("attn_norm", "bias"), False),
    ("attn.c_proj.weight", ("attn", "out", "kernel"), False),
    ("attn.c_proj.bias", ("attn", "out", "bias"), False),
    ("ln_2.weight", ("mlp_norm", "scale"), False),
    ("ln_2.bias", ("mlp_norm", "bias"), False),
    ("mlp.c_fc.weight", ("mlp", "up", "kernel"), False),
    ("mlp.c_fc.bias", ("mlp", "up", "bias"), False),
    ("mlp.c_proj.weight", ("mlp", "down", "kernel"), False),
    ("mlp.c_proj.bias", ("mlp", "down", "bias"), False),
)
_GLOBALS = {
    "gpt2": (("wte.weight", ("embed", "embedding"), False), ("wpe.weight", ("position_embedding",), False),
             ("ln_f.weight", ("final_norm", "scale"), False), ("ln_f.bias", ("final_norm", "bias"), False)),
    "llama": (("embed_tokens.weight", ("embed", "embedding"), False), ("norm.weight", ("final_norm", "scale"), False)),
}
_LAYER = {"gpt2": (_GPT2_LAYER, "h.{}."), "llama": (_LLAMA_LAYER, "layers.{}.")}
LM_HEAD = "lm_head.weight"


def _hf_shape(lm_shape: tuple[int, ...], transposed: bool, num_in_axes: int) -> tuple[int, ...]:
  """The 2-D (or 1-D) Hugging Face shape of an lm parameter: [in, out], or [out, in] when transposed."""
  if len(lm_shape) == 1:
    return lm_shape
  rows, cols = int(np.prod(lm_shape[:num_in_axes])), int(np.prod(lm_shape[num_in_axes:]))
  return (cols, rows) if transposed else (rows, cols)


def _in_axes(lm_path: tuple[str, ...]) -> int:
  return 2 if lm_path[-2:] == ("out", "kernel") else 1  # attention's output projection contracts heads and d


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


class _Reader:
  """Takes the tensors of a WeightFiles by canonical name (prefix stripped), checking shape and dtype.

  With `dry`, nothing is read: each tensor is a zero-stride view of one zero,
  which every reshape and transpose below keeps a view (no memory).
  """

  def __init__(self, files: WeightFiles, model_type: str, dtype: np.dtype, config_path: Path, dry: bool = False):
    self.files, self.model_type, self.dtype, self.config_path = files, model_type, dtype, config_path
    self.dry = dry
    prefix = PREFIXES[model_type]
    self.raw = {(name[len(prefix):] if name.startswith(prefix) else name): name for name in files.names}
    self.prefix = prefix
    self.used: set[str] = set()

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    raw = self.raw.get(name)
    if raw is None:
      expected = name if name == LM_HEAD else self.prefix + name
      raise HFError(f"{self.files.source} has no tensor {expected!r}, which the model of {self.config_path} needs. "
                    "Fix: the weights and config.json are from different models, or the save is incomplete; save "
                    "the model again with save_pretrained.")
    found, dtype = self.files.shape(raw), self.files.dtype(raw)
    where = self.files.file_of(raw)
    if found != tuple(shape):
      raise HFError(f"{where}: tensor {raw!r} has shape {list(found)}, but the model of {self.config_path} needs "
                    f"{list(shape)}. Fix: the weights and config.json are from different models; use the "
                    "config.json saved with these weights.")
    if dtype not in SUPPORTED_DTYPES:
      raise HFError(f"{where}: tensor {raw!r} has dtype {dtype}; lm reads F32, F16 and BF16. Fix: save the model "
                    "in one of them (e.g. model.to(torch.bfloat16).save_pretrained(DIR)).")
    self.used.add(raw)
    if self.dry:
      return np.broadcast_to(np.zeros((), self.dtype), found)
    return self.files.read(raw).astype(self.dtype)

  def check_all_used(self, ignore: tuple[str, ...]) -> None:
    ignored = IGNORED[self.model_type]
    left = [raw for name, raw in sorted(self.raw.items())
            if raw not in self.used and name not in ignore and not ignored.fullmatch(name)]
    if left:
      more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
      raise HFError(f"{self.files.file_of(left[0])}: unexpected tensor {left[0]!r}{more}, which the "
                    f"{self.model_type} model of {self.config_path} has no place for. Fix: use the config.json saved "
                    "with these weights, or a checkpoint of the plain causal LM (no extra heads or adapters).")


def _layer_params(read: Callable[[str, tuple[str, ...], bool], np.ndarray], layout: str, cfg: TransformerConfig,
                  index: int) -> dict[str, Any]:
  """One layer's lm parameters, each from `read(hf_name, lm_path, transposed)`."""
  specs, prefix = _LAYER[layout]
  layer: dict[str, Any] = {}
  for hf_name, lm_path, transposed in specs:
    _set(layer, lm_path, read(prefix.format(index) + hf_name, lm_path, transposed))
  if layout == "gpt2":  # one fused [D, 3D] projection for query, key and value
    heads, head_dim = cfg.num_heads, cfg.width // cfg.num_heads
    fused = read(prefix.format(index) + "attn.c_attn.weight", ("fused",), False)
    bias = read(prefix.format(index) + "attn.c_attn.bias", ("fused_bias",), False)
    for name, kernel, b in zip(("query", "key", "value"), np.split(fused, 3, axis=1), np.split(bias, 3)):
      layer["attn"][name] = {"kernel": kernel.reshape(cfg.width, heads, head_dim), "bias": b.reshape(heads, head_dim)}
  return layer


def import_params(files: WeightFiles, model_type: str, cfg: TransformerConfig, config_path: Path,
                  shapes: dict[tuple[str, ...], tuple[int, ...]], dry: bool = False) -> dict[str, Any]:
  """The lm parameter tree (per-layer layout, numpy, cfg's param dtype) from a model's weight files.

  shapes: lm parameter path within a layer (or global) -> lm shape, from the
  model's abstract init; the expected Hugging Face shapes follow from it.
  dry: check names, shapes and dtypes only (the arrays are zero-stride views).
  """
  layout = layout_of(model_type)
  reader = _Reader(files, model_type, np.dtype(cfg.weight_dtype), config_path, dry)

  def read(hf_name: str, lm_path: tuple[str, ...], transposed: bool) -> np.ndarray:
    if lm_path == ("fused",):
      return reader.take(hf_name, (cfg.width, 3 * cfg.width))
    if lm_path == ("fused_bias",):
      return reader.take(hf_name, (3 * cfg.width,))
    lm_shape = shapes[lm_path]
    array = reader.take(hf_name, _hf_shape(lm_shape, transposed, _in_axes(lm_path)))
    return (array.T if transposed else array).reshape(lm_shape)

  params: dict[str, Any] = {}
  for hf_name, lm_path, transposed in _GLOBALS[layout]:
    _set(params, lm_path, read(hf_name, lm_path, transposed))
  for index in range(cfg.num_layers):
    params[f"layer_{index}"] = _layer_params(read, layout, cfg, index)
  if not cfg.tie_embeddings:
    params["unembed"] = {"kernel": read(LM_HEAD, ("unembed", "kernel"), True)}
  # A tied model's saved lm_head (if any) is the embedding again; transformers ignores it as well.
  reader.check_all_used(ignore=(LM_HEAD,) if cfg.tie_embeddings else ())
  return params


def export_tensors(params: dict[str, Any], cfg: TransformerConfig) -> dict[str, np.ndarray]:
  """Hugging Face name -> numpy array for per-layer lm params (`export_layout(cfg)` must hold)."""
  layout = export_layout(cfg)
  prefix = PREFIXES[layout]
  dtype = np.asarray(params["embed"]["embedding"]).dtype
  tensors: dict[str, np.ndarray] = {}

  def write(hf_name: str, tree: dict[str, Any], lm_path: tuple[str, ...], transposed: bool) -> None:
    if lm_path[-1] == "bias" and not cfg.use_bias:  # GPT-2 always has biases: lm's absent ones are zeros
      tensors[prefix + hf_name] = np.zeros((cfg.hidden_dim if lm_path[-2] == "up" else cfg.width,), dtype)
      return
    array = np.asarray(_get(tree, lm_path))
    hf_shape = _hf_shape(array.shape, transposed, _in_axes(lm_path))
    tensors[prefix + hf_name] = np.ascontiguousarray(
        array.reshape(hf_shape[::-1]).T if transposed else array.reshape(hf_shape))

  for hf_name, lm_path, transposed in _GLOBALS[layout]:
    write(hf_name, params, lm_path, transposed)
  specs, layer_prefix = _LAYER[layout]
  for index in range(cfg.num_layers):
    layer = params[f"layer_{index}"]
    for hf_name, lm_path, transposed in specs:
      write(layer_prefix.format(index) + hf_name, layer, lm_path, transposed)
    if layout == "gpt2":
      attn = layer["attn"]
      tensors[prefix + layer_prefix.format(index) + "attn.c_attn.weight"] = np.concatenate(
          [np.asarray(attn[name]["kernel"]).reshape(cfg.width, cfg.width) for name in ("query", "key", "value")], 1)
      tensors[prefix + layer_prefix.format(index) + "attn.c_attn.bias"] = (
          np.concatenate([np.asarray(attn[name]["bias"]).reshape(-1) for name in ("query", "key", "value")])
          if cfg.use_bias else np.zeros((3 * cfg.width,), dtype))
  if not cfg.tie_embeddings:
    tensors[LM_HEAD] = np.ascontiguousarray(np.asarray(params["unembed"]["kernel"]).T)
  return tensors
