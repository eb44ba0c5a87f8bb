"""Hugging Face GPT-2 and Llama checkpoints in and out of lm, through safetensors only.

  cfg, params = load_model("path/to/hf_dir")        # TransformerConfig + numpy tree
  logits = TransformerLM(cfg).apply({"params": params}, tokens)
  export(params, cfg, "path/to/out_dir")            # config.json + model.safetensors

`params` is the tree `TransformerLM(cfg).init(...)["params"]` has, unboxed
(per-layer `layer_{i}`, or stacked `layers` with `cfg.scan_layers`), as numpy
arrays in `cfg.param_dtype`. A training run starts from a directory with
`--config.init_from=hf:DIR` (lm.experiment.model, lm.experiment.runs) and writes one
with `--mode export` (lm.app.export.export_checkpoint). The name mapping and
what is refused are in lm.interop.hf_layout; the files in lm.interop.hf_files.
No network is used anywhere: DIR is a local folder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.data import tokenizers as tokenizers_lib
from lm.interop import hf_layout
from lm.interop.hf_files import (CONFIG_FILE, DequantizedFiles, HFError, WeightFiles, check_directory, read_config,
                                 write_json, write_weights)
from lm.models import TransformerConfig, TransformerLM
from lm.models import quantize as quantize_lib

HF_PREFIX = "hf:"
LM_TOKENIZER_DIR = "lm_tokenizer"  # lm's own tokenizer folder, written beside an export
HF_TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
# TransformerConfig fields the checkpoint decides (the rest: dtype, remat, scan, dropout, ... are the run's).
CHECKPOINT_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "width", "mlp_dim", "vocab_size", "max_len",
                     "position", "norm", "mlp", "use_bias", "tie_embeddings", "norm_eps", "rope_theta",
                     "gelu_approximate")
# An int8 export (`export.quantize=int8`): config.json's quantization_config names this method, and each int8
# weight NAME has its per-channel float32 scales in NAME + SCALE_SUFFIX (shaped to broadcast over it).
# transformers has no such method (untested here: not installed); lm reads it back (init_from=hf:DIR).
QUANT_METHOD = "lm_int8"
SCALE_SUFFIX = "_scale"


def quantization_of(hf_config: dict[str, Any]) -> str:
  """"int8" for an lm int8 export's config.json, "none" for a float one."""
  quantization = hf_config.get("quantization_config")
  if quantization is None:
    return "none"
  if not isinstance(quantization, dict) or quantization.get("quant_method") != QUANT_METHOD:
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
    raise HFError(f"config.json's quantization_config (quant_method {method!r}) is not one lm reads: it reads "
                  f"float weights and its own int8 exports ({QUANT_METHOD!r}). Fix: point hf:DIR at float weights.")
  return "int8"


def hf_directory(source: str | None) -> str | None:
  """DIR of an `hf:DIR` source (e.g. config.init_from), else None."""
  if source and source.startswith(HF_PREFIX):
    return source[len(HF_PREFIX):]
  return None


def model_fields(directory: str | os.PathLike, max_len: int | None = None) -> dict[str, Any]:
  """TransformerConfig fields (variant and CHECKPOINT_FIELDS) of the model in `directory`.

  max_len: for RoPE models, the KV-cache length to use instead of the
  config's max_position_embeddings (GPT-2's position table fixes its own).
  Raises HFError for a missing directory or config.json, or a model lm cannot compute exactly.
  """
  path = check_directory(directory)
  return hf_layout.model_fields(read_config(path), path / CONFIG_FILE, max_len)


def model_config(directory: str | os.PathLike, *, max_len: int | None = None, **overrides: Any) -> TransformerConfig:
  """The TransformerConfig of `directory`'s model; `overrides` set the run's own fields (dtype, scan_layers, ...)."""
  fields = model_fields(directory, max_len)
  fields.update(overrides)
  try:
    return TransformerConfig(**fields)
  except ValueError as error:
    raise HFError(f"The model of {Path(directory) / CONFIG_FILE} cannot be built: {error} Fix: restore the model's "
                  "original config.json, or pass other overrides.") from None


@functools.lru_cache(maxsize=8)
def _abstract_params(cfg: TransformerConfig) -> Any:
  """ShapeDtypeStructs of `TransformerLM(cfg)`'s params, unboxed (nothing is allocated)."""
  variables = jax.eval_shape(lambda: TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return nn.meta.unbox(variables["params"])


def _check_tree(params: Any, cfg: TransformerConfig, what: str) -> None:
  """ValueError unless `params` has exactly the structure, shapes and dtypes of `TransformerLM(cfg)`'s params."""
  expected = _abstract_params(cfg)
  if jax.tree.structure(params) != jax.tree.structure(expected):
    raise ValueError(f"{what} do not have TransformerLM's parameter structure for this config "
                     f"(scan_layers={cfg.scan_layers}); expected {jax.tree.structure(expected)}.")
  for (path, leaf), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(expected)):
    if tuple(leaf.shape) != want.shape or np.dtype(leaf.dtype) != np.dtype(want.dtype):
      raise ValueError(f"{what}: {jax.tree_util.keystr(path)} is {np.dtype(leaf.dtype)}{list(leaf.shape)}, "
                       f"the model needs {np.dtype(want.dtype)}{list(want.shape)}.")


def _per_layer(cfg: TransformerConfig) -> TransformerConfig:
  return dataclasses.replace(cfg, scan_layers=False)


def _load(directory: str | os.PathLike, cfg: TransformerConfig, dry: bool) -> dict[str, Any]:
  path = check_directory(directory)
  config_path = path / CONFIG_FILE
  hf = read_config(path)
  fields = hf_layout.model_fields(hf, config_path, cfg.max_len if cfg.position == "rope" else None)
  actual = dict(dataclasses.asdict(cfg), num_kv_heads=cfg.kv_heads, mlp_dim=cfg.hidden_dim)
  unused = {"rope_theta"} if cfg.position == "learned" else {"gelu_approximate"}  # no effect on this model
  differences = [f"{key}: {config_path.name} {fields[key]!r}, model config {actual[key]!r}"
                 for key in CHECKPOINT_FIELDS if key not in unused and fields[key] != actual[key]]
  if differences:
    raise HFError(f"The model config does not match {config_path} ({'; '.join(differences)}). Fix: build it with "
                  "lm.interop.model_config(DIR) (or --config.init_from=hf:DIR, which does).")
  layer_cfg = _per_layer(cfg)
  shapes = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(_abstract_params(layer_cfg))[0]:
    keys = tuple(k.key for k in key_path)
    shapes[keys[1:] if keys[0].startswith("layer_") else keys] = leaf.shape
  with WeightFiles(path) as files:
    reader = DequantizedFiles(files, SCALE_SUFFIX) if quantization_of(hf) == "int8" else files
    params = hf_layout.import_params(reader, hf_layout.model_type_of(hf, config_path), layer_cfg, config_path,
                                     shapes, dry=dry)
  if dry:  # keep shapes only: stacking zero-stride views would allocate
    params = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), params)
  if cfg.scan_layers:
    layers = [params.pop(f"layer_{i}") for i in range(cfg.num_layers)]
    stack = ((lambda *leaves: jax.ShapeDtypeStruct((len(leaves),) + leaves[0].shape, leaves[0].dtype)) if dry else
             (lambda *leaves: np.stack(leaves)))
    params["layers"] = jax.tree.map(stack, *layers)
  _check_tree(params, cfg, f"The weights read from {path}")
  return params


def load_params(directory: str | os.PathLike, cfg: TransformerConfig) -> dict[str, Any]:
  """The parameters of `directory`'s model for `TransformerLM(cfg)`: numpy arrays in cfg.param_dtype.

  Args:
    directory: a local Hugging Face model folder (config.json + model.safetensors
      or sharded *.safetensors with model.safetensors.index.json).
    cfg: from `model_config(directory, ...)`; its scan_layers picks the layout
      (`layer_{i}` or stacked `layers` [num_layers, ...]).
  Returns:
    The tree `TransformerLM(cfg).init(...)["params"]` has, unboxed; e.g.
    embed/embedding [vocab, width], layer_0/attn/query/kernel [width, heads, head_dim].
  Raises:
    HFError: missing or unreadable files, only pickle weights, an unsupported
      model, a missing or unexpected tensor, a wrong shape or an unsupported dtype.
  """
  return _load(directory, cfg, dry=False)


def check_weights(directory: str | os.PathLike, cfg: TransformerConfig) -> None:
  """Every check of `load_params` (names, shapes, dtypes) without reading the tensors' data."""
  _load(directory, cfg, dry=True)


def load_model(directory: str | os.PathLike, **overrides: Any) -> tuple[TransformerConfig, dict[str, Any]]:
  """(TransformerConfig, numpy params) of `directory`'s model; `overrides` as in `model_config`."""
  cfg = model_config(directory, **overrides)
  return cfg, load_params(directory, cfg)


def place_params(params: Any, abstract: Any) -> Any:
  """Numpy params -> jax Arrays with each abstract leaf's sharding (ShapeDtypeStructs with `.sharding`).

  Each process gives only the shards its devices hold, so this works on a
  multi-process mesh too.
  """
  def place(array: np.ndarray, leaf: jax.ShapeDtypeStruct) -> jax.Array:
    array = np.asarray(array, dtype=leaf.dtype)
    return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: array[index])

  return jax.tree.map(place, params, abstract)


def load_sharded_params(directory: str | os.PathLike, cfg: TransformerConfig, abstract: Any) -> Any:
  """`load_params` placed on devices as `abstract` says (ShapeDtypeStructs with `.sharding`, e.g. a run's
  abstract params, or the part of them a head fills from a language model)."""
  params = load_params(directory, cfg)
  if jax.tree.structure(params) != jax.tree.structure(abstract):
    raise HFError(f"The language model in {directory} does not fit the parameters to fill (expected "
                  f"{jax.tree.structure(abstract)}). Fix: start a head='lm' run from it.")
  return place_params(params, abstract)


def _int8_tensors(params: dict[str, Any], cfg: TransformerConfig) -> dict[str, np.ndarray]:
  """`export_tensors` of per-layer params with int8 projections: NAME int8, NAME + SCALE_SUFFIX its scales.

  The int8 values go through the float layout's own mapping (transposes,
  GPT-2's fused c_attn); so do the scales, broadcast to the kernels' shapes,
  and each is then cut back to the axis it varies along (an output channel's
  scale is the same all along its inputs).
  """
  quantized = quantize_lib.quantize_params(params, "int8", field="export.quantize")
  is_q = quantize_lib.is_quantized
  values = jax.tree.map(lambda leaf: np.asarray(leaf.qvalue) if is_q(leaf) else leaf, quantized, is_leaf=is_q)
  scales = jax.tree.map(lambda leaf: np.broadcast_to(np.asarray(leaf.scale), leaf.shape) if is_q(leaf) else leaf,
                        quantized, is_leaf=is_q)
  tensors = hf_layout.export_tensors(values, cfg)
  scale_tensors = hf_layout.export_tensors(scales, cfg)
  for name in [name for name, array in tensors.items() if array.dtype == np.int8]:
    full = scale_tensors[name]
    for axis in range(full.ndim):  # the first axis the scales do not vary along: the inputs
      first = full.take([0], axis=axis)
      if np.array_equal(full, np.broadcast_to(first, full.shape)):
        tensors[name + SCALE_SUFFIX] = np.ascontiguousarray(first, np.float32)
        break
    else:  # every projection's scales are constant along its inputs; a layout mapping that mixed them would land here
      raise HFError(f"The int8 scales of {name} vary along every axis of {list(full.shape)}, so they are not "
                    "per-channel there. Fix: export this model with --config.export.quantize=none.")
  return tensors


def export(params: Any, model_config: TransformerConfig, out_dir: str | os.PathLike, max_shard_size: int = 0, *,
           eos_token_id: int | None = None, quantize: str = "none") -> list[str]:
  """Writes `params` of `TransformerLM(model_config)` as a Hugging Face GPT-2 or Llama directory.

  Args:
    params: the unboxed parameter tree (numpy or jax arrays, per-layer or
      stacked as model_config.scan_layers says); written in its dtype.
    model_config: the model; it must be GPT-2's layout (learned positions,
      LayerNorm, GELU, no grouped-query attention; absent biases are written
      as zeros) or Llama's (RoPE, RMSNorm, SwiGLU, no biases).
    out_dir: created if needed; must be empty.
    max_shard_size: bytes per .safetensors shard (0: one model.safetensors).
    eos_token_id: written into config.json as bos/eos (None: unset).
    quantize: "int8" writes each projection's weight as int8 with its float32
      per-channel scales beside it (NAME + SCALE_SUFFIX) and says so in
      config.json's quantization_config; embeddings and norms stay float.
      lm reads it back (`load_params`, init_from=hf:DIR); transformers has no such method.
  Returns:
    The file names written, config.json first.
  Raises:
    HFError: a non-empty out_dir, or a model that is neither layout (naming the field).
  """
  out = Path(out_dir)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise HFError(f"Export directory {out} is not empty. Fix: point the export at a new or empty folder "
                  "(nothing is overwritten).")
  hf_config = hf_layout.hf_config_for(model_config, eos_token_id)
  params = jax.tree.map(np.asarray, jax.device_get(params))
  _check_tree(params, model_config, "The parameters to export")
  if model_config.scan_layers:
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(model_config.num_layers):
      params[f"layer_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
  if quantize == "none":
    tensors = hf_layout.export_tensors(params, _per_layer(model_config))
  else:
    tensors = _int8_tensors(params, _per_layer(model_config))
    hf_config["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": 8, "symmetric": True,
                                        "granularity": "per_output_channel", "scale_suffix": SCALE_SUFFIX,
                                        "scale_dtype": "float32", "library": "qwix"}
  out.mkdir(parents=True, exist_ok=True)
  files = write_weights(tensors, out, max_shard_size)
  write_json(out / CONFIG_FILE, hf_config)  # last: a config.json beside the weights marks a complete export
  return [CONFIG_FILE] + files


def read_tokenizer(directory: str | os.PathLike) -> tokenizers_lib.Tokenizer | None:
  """The tokenizer of a model directory, or None if it has none.

  In order: `lm_tokenizer/` (written by `export`: lm's exact ids),
  `tokenizer.json` (Hugging Face `tokenizers`; its EOS from config.json's
  eos_token_id or tokenizer_config.json's eos_token), `tokenizer.model`
  (SentencePiece).
  """
  path = check_directory(directory)
  if (path / LM_TOKENIZER_DIR / tokenizers_lib.CONFIG_FILENAME).is_file():
    return tokenizers_lib.load_tokenizer(path / LM_TOKENIZER_DIR)
  if (path / HF_TOKENIZER_FILE).is_file():
    probe = tokenizers_lib.HFTokenizer.from_file(path / HF_TOKENIZER_FILE)
    eos_id, unk_id = _special_ids(path, probe)
    return tokenizers_lib.HFTokenizer(probe.tokenizer_json, eos_id=eos_id, unk_id=unk_id)
  if (path / SENTENCEPIECE_FILE).is_file():
    return tokenizers_lib.SentencePieceTokenizer.from_file(path / SENTENCEPIECE_FILE)
  return None


def _special_ids(path: Path, tokenizer: tokenizers_lib.HFTokenizer) -> tuple[int | None, int | None]:
  """(eos id, unk id) of a Hugging Face tokenizer: config.json's eos_token_id, else tokenizer_config.json's tokens."""
  settings: dict[str, Any] = {}
  settings_path = path / "tokenizer_config.json"
  if settings_path.is_file():
    try:
      settings = json.loads(settings_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # also UTF-8 and JSON errors, huge integers, deep nesting
      raise HFError(f"{settings_path} is not valid JSON ({' '.join(str(error).split())[:160]}). Fix: restore the "
                    "model's original file, or delete it.") from None
    if not isinstance(settings, dict):
      raise HFError(f"{settings_path} holds a {type(settings).__name__}, not a JSON object. Fix: restore the model's "
                    "original file, or delete it.")

  def token_id(entry: Any) -> int | None:
    text = entry.get("content") if isinstance(entry, dict) else entry
    return tokenizer.token_to_id(text) if isinstance(text, str) else None

  eos = read_config(path).get("eos_token_id") if (path / CONFIG_FILE).is_file() else None
  eos = eos[0] if isinstance(eos, list) and eos else eos
  if not isinstance(eos, int) or not 0 <= eos < tokenizer.vocab_size:
    eos = token_id(settings.get("eos_token"))
  return eos, token_id(settings.get("unk_token"))


def write_tokenizer(tokenizer: tokenizers_lib.Tokenizer, out_dir: str | os.PathLike) -> list[str]:
  """Writes `tokenizer` beside an export: tokenizer.json (Hugging Face) or tokenizer.model (SentencePiece)
  when it is one, and always lm's own folder `lm_tokenizer/`. Returns the names written."""
  out = Path(out_dir)
  written = []
  if isinstance(tokenizer, tokenizers_lib.HFTokenizer):
    (out / HF_TOKENIZER_FILE).write_text(tokenizer.tokenizer_json, encoding="utf-8")
    written.append(HF_TOKENIZER_FILE)
  elif isinstance(tokenizer, tokenizers_lib.SentencePieceTokenizer):
    (out / SENTENCEPIECE_FILE).write_bytes(tokenizer.model_proto)
    written.append(SENTENCEPIECE_FILE)
  tokenizer.save(out / LM_TOKENIZER_DIR)
  return written + [LM_TOKENIZER_DIR + "/"]

