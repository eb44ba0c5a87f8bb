"""lm.interop.hf: Hugging Face GPT-2 and Llama weights in and out, checked against transformers itself.

The reference models are tiny random GPT2LMHeadModel / LlamaForCausalLM built
from configs (no downloads), with initializer_range 0.1 so attention is far
from uniform: a wrong RoPE convention, head order or GQA grouping then moves
the logits by ~1, against the 1e-4 tolerance.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from lm import interop  # noqa: E402
from lm.data import tokenizers  # noqa: E402
from lm.interop import HFError  # noqa: E402
from lm.models import TransformerConfig, TransformerLM  # noqa: E402

VOCAB = 300
TOLERANCE = 1e-4  # max |logit difference| in float32 (measured: < 1e-5)


def _gpt2(tie: bool = True):
  return transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=64, initializer_range=0.1,
      bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, tie_word_embeddings=tie))


def _llama(tie: bool):
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=160,
      vocab_size=VOCAB, rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=128,
      tie_word_embeddings=tie, initializer_range=0.1, bos_token_id=1, eos_token_id=2))


BUILDERS = {"gpt2": _gpt2, "gpt2_untied": lambda: _gpt2(tie=False), "llama": lambda: _llama(tie=False),
            "llama_tied": lambda: _llama(tie=True)}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """name -> (directory, the transformers model in eval mode); gpt2_sharded is gpt2 saved in ~50 KB shards."""
  root = tmp_path_factory.mktemp("hf")
  dirs = {}
  for index, (name, build) in enumerate(BUILDERS.items()):
    torch.manual_seed(index)
    model = build().eval()
    model.save_pretrained(root / name, safe_serialization=True)
    dirs[name] = (root / name, model)
    if name == "gpt2":
      model.save_pretrained(root / "gpt2_sharded", safe_serialization=True, max_shard_size="50KB")
      dirs["gpt2_sharded"] = (root / "gpt2_sharded", model)
  assert (root / "gpt2_sharded" / "model.safetensors.index.json").is_file()
  return dirs


def _tokens(seed: int = 0, length: int = 48) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (2, length))


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _lm_logits(cfg: TransformerConfig, params, tokens: np.ndarray) -> np.ndarray:
  return np.asarray(TransformerLM(cfg).apply({"params": params}, jnp.asarray(tokens, jnp.int32)))


def _assert_trees_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(x, y)


# ---------------------------------------------------------------------------------------------------- config


def test_config_fields_follow_the_hf_config(hf_dirs):
  assert interop.model_fields(hf_dirs["gpt2"][0]) == dict(
      variant="gpt2", num_layers=2, num_heads=4, num_kv_heads=4, width=64, mlp_dim=256, vocab_size=VOCAB, max_len=64,
      position="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True, norm_eps=1e-5,
      rope_theta=10_000.0, gelu_approximate=True)
  assert interop.model_fields(hf_dirs["llama"][0]) == dict(
      variant="llama", num_layers=2, num_heads=4, num_kv_heads=2, width=64, mlp_dim=160, vocab_size=VOCAB,
      max_len=128, position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False,
      norm_eps=1e-6, rope_theta=10_000.0, gelu_approximate=False)
  assert interop.model_fields(hf_dirs["llama_tied"][0], max_len=32)["max_len"] == 32  # a shorter KV cache
  cfg = interop.model_config(hf_dirs["llama"][0], dtype="bfloat16", scan_layers=True)
  assert cfg.dtype == "bfloat16" and cfg.scan_layers and cfg.kv_heads == 2


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scan"])
@pytest.mark.parametrize("name", ["gpt2", "gpt2_sharded", "gpt2_untied", "llama", "llama_tied"])
def test_logits_match_transformers(hf_dirs, name, scan_layers):
  directory, model = hf_dirs[name]
  cfg, params = interop.load_model(directory, scan_layers=scan_layers)
  # Exactly the tree (and dtypes) TransformerLM.init makes for this config.
  init = jax.eval_shape(lambda: TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  expected = jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), nn.meta.unbox(init["params"]))
  assert jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), params) == expected
  assert ("layers" in params) == scan_layers
  tokens = _tokens()
  reference = _hf_logits(model, tokens)
  difference = np.abs(_lm_logits(cfg, params, tokens) - reference).max()
  assert difference <= TOLERANCE, f"{name}: max |logit difference| {difference:.2e}"
  assert np.abs(reference).max() > 1.0  # logits large enough for a layout error to show


def test_lower_precision_files_load_into_the_param_dtype(hf_dirs, tmp_path):
  directory, model = hf_dirs["llama"]
  for torch_dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "f16")):
    low = transformers.LlamaForCausalLM(model.config).eval()
    low.load_state_dict(model.state_dict())
    low.to(torch_dtype).save_pretrained(tmp_path / name, safe_serialization=True)
    cfg, params = interop.load_model(tmp_path / name)
    assert jax.tree.leaves(params)[0].dtype == np.float32
    want = low.model.embed_tokens.weight.detach().float().numpy()
    assert np.array_equal(params["embed"]["embedding"], want)  # widened exactly
    cfg16, params16 = interop.load_model(tmp_path / name, param_dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(params16)} == {np.dtype(jnp.bfloat16)}


# ---------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name, scan_layers, max_shard_size", [
    ("gpt2", False, 0), ("gpt2_untied", True, 0), ("llama", False, 40_000), ("llama_tied", True, 0)])
def test_export_round_trip_is_bit_identical_and_loads_in_transformers(hf_dirs, tmp_path, name, scan_layers,
                                                                      max_shard_size):
  directory, model = hf_dirs[name]
  cfg, params = interop.load_model(directory, scan_layers=scan_layers)
  out = tmp_path / "export"
  files = interop.export(params, cfg, out, max_shard_size=max_shard_size)
  assert files[0] == "config.json" and sorted(files) == sorted(p.name for p in out.iterdir())
  assert ("model.safetensors.index.json" in files) == (max_shard_size > 0)
  written = json.loads((out / "config.json").read_text())
  assert written["model_type"] == ("gpt2" if name.startswith("gpt2") else "llama")
  assert written["architectures"] and written["torch_dtype"] == "float32"
  cfg_again, params_again = interop.load_model(out, scan_layers=scan_layers)
  assert cfg_again == cfg
  _assert_trees_equal(params, params_again)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = _tokens(seed=1)
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(model, tokens), rtol=0, atol=1e-6)


def test_export_of_a_gpt2_layout_without_biases_writes_zero_biases(tmp_path):
  cfg = TransformerConfig(vocab_size=VOCAB, num_layers=1, num_heads=4, width=32, max_len=16, use_bias=False,
                          tie_embeddings=False)
  shapes = jax.eval_shape(lambda: TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  rng = np.random.default_rng(0)  # random numbers, not init: compiling the initializers costs seconds on CPU
  params = jax.tree.map(lambda leaf: rng.normal(0, 0.3, leaf.shape).astype(leaf.dtype), nn.meta.unbox(shapes["params"]))
  interop.export(params, cfg, tmp_path / "out")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  tokens = _tokens(length=16)
  difference = np.abs(_hf_logits(reloaded, tokens) - _lm_logits(cfg, params, tokens)).max()
  assert difference <= TOLERANCE


def test_export_refuses_a_non_empty_directory_and_models_of_neither_layout(hf_dirs, tmp_path):
  cfg, params = interop.load_model(hf_dirs["gpt2"][0])
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("keep me")
  with pytest.raises(HFError, match="busy is not empty"):
    interop.export(params, cfg, tmp_path / "busy")
  assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
  rope_layernorm = TransformerConfig(vocab_size=VOCAB, num_layers=1, num_heads=4, width=32, max_len=16,
                                     position="rope", norm="layernorm", mlp="swiglu", use_bias=False)
  with pytest.raises(HFError, match=r"model.norm='layernorm' \(the llama layout needs 'rmsnorm'\)"):
    interop.export({}, rope_layernorm, tmp_path / "new")
  gqa_gpt2 = TransformerConfig(vocab_size=VOCAB, num_layers=1, num_heads=4, num_kv_heads=2, width=32, max_len=16)
  with pytest.raises(HFError, match="model.num_kv_heads=2"):
    interop.export({}, gqa_gpt2, tmp_path / "new")
  assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------------- bad input


def _copy(hf_dirs, name: str, tmp_path: Path) -> Path:
  target = tmp_path / name
  shutil.copytree(hf_dirs[name][0], target)
  return target


def _edit_config(directory: Path, **changes) -> None:
  config = json.loads((directory / "config.json").read_text())
  config.update(changes)
  (directory / "config.json").write_text(json.dumps(config))


def _edit_weights(directory: Path, edit) -> None:
  path = directory / "model.safetensors"
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path), metadata={"format": "pt"})


def _load(directory: Path):
  return interop.load_model(directory)


def test_missing_directory_config_or_weights(hf_dirs, tmp_path):
  with pytest.raises(HFError, match=r"nowhere' does not exist.*lm never downloads"):
    _load(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(HFError, match=r"empty/config.json does not exist"):
    _load(tmp_path / "empty")
  directory = _copy(hf_dirs, "llama", tmp_path)
  (directory / "model.safetensors").unlink()
  with pytest.raises(HFError, match=r"llama has no model.safetensors and no model.safetensors.index.json.*"
                                    r"save_pretrained"):
    _load(directory)


def test_pickle_weights_are_refused_with_the_conversion(hf_dirs, tmp_path):
  directory = _copy(hf_dirs, "gpt2", tmp_path)
  (directory / "model.safetensors").unlink()
  (directory / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "read"}))
  with pytest.raises(HFError, match=r"only pickle weights \(pytorch_model.bin\).*safe_serialization=True"):
    _load(directory)


def test_index_naming_a_missing_shard(hf_dirs, tmp_path):
  directory = _copy(hf_dirs, "gpt2_sharded", tmp_path)
  shard = sorted(directory.glob("model-*.safetensors"))[1]
  shard.unlink()
  with pytest.raises(HFError, match=rf"model.safetensors.index.json names the shard '{shard.name}'"):
    _load(directory)


@pytest.mark.parametrize("changes, pattern", [
    ({"model_type": "qwen2"}, r"model_type 'qwen2' is not supported \(Qwen2 adds biases"),
    ({"architectures": ["LlamaForSequenceClassification"]}, r"architecture 'LlamaForSequenceClassification'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, r"rope_scaling=.*no frequency scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, r"rope_parameters.rope_type='llama3'"),
    ({"attention_bias": True}, r"attention_bias=True is not supported"),
    ({"mlp_bias": True}, r"mlp_bias=True"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"head_dim": 32}, r"head_dim=32"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 64},
     r"sliding_window=64 .*all 128 positions"),
])
def test_unsupported_configs(hf_dirs, tmp_path, changes, pattern):
  directory = _copy(hf_dirs, "llama", tmp_path)
  _edit_config(directory, **changes)
  with pytest.raises(HFError, match=r"llama/config.json: " + pattern):
    _load(directory)


def test_mistral_without_a_short_window_loads_as_llama(hf_dirs, tmp_path):
  directory = _copy(hf_dirs, "llama", tmp_path)
  _edit_config(directory, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4096)
  cfg, params = _load(directory)
  tokens = _tokens()
  assert np.abs(_lm_logits(cfg, params, tokens) - _hf_logits(hf_dirs["llama"][1], tokens)).max() <= TOLERANCE


def test_gpt2_options_lm_cannot_compute_are_refused(hf_dirs, tmp_path):
  directory = _copy(hf_dirs, "gpt2", tmp_path)
  for changes, pattern in (({"activation_function": "relu"}, "activation_function='relu'"),
                           ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True")):
    _edit_config(directory, **changes)
    with pytest.raises(HFError, match=pattern):
      _load(directory)
    _edit_config(directory, **{"activation_function": "gelu_new", "scale_attn_by_inverse_layer_idx": False})
  with pytest.raises(HFError, match=r"n_positions=64 .* use seq_len <= 64"):
    interop.model_fields(directory, max_len=128)


def test_missing_unexpected_misshapen_and_unsupported_tensors(hf_dirs, tmp_path):
  directory = _copy(hf_dirs, "llama", tmp_path)
  original = load_file(str(directory / "model.safetensors"))
  name = "model.layers.1.mlp.up_proj.weight"
  cases = [
      (lambda t: t.pop(name), rf"model.safetensors has no tensor '{name}'"),
      (lambda t: t.update({"model.layers.0.adapter.weight": np.zeros(3, np.float32)}),
       r"model.safetensors: unexpected tensor 'model.layers.0.adapter.weight'"),
      (lambda t: t.update({name: np.zeros((160, 32), np.float32)}),
       rf"tensor '{name}' has shape \[160, 32\], but the model of .*config.json needs \[160, 64\]"),
      (lambda t: t.update({name: t[name].astype(np.float64)}), rf"tensor '{name}' has dtype F64; lm reads F32, F16"),
  ]
  for edit, pattern in cases:
    _edit_weights(directory, edit)
    with pytest.raises(HFError, match=pattern):
      _load(directory)
    cfg = interop.model_config(directory)
    with pytest.raises(HFError, match=pattern):  # the dry check finds the same, reading nothing
      interop.check_weights(directory, cfg)
    save_file(original, str(directory / "model.safetensors"), metadata={"format": "pt"})
  _load(directory)  # restored: loads again


def test_tied_checkpoint_with_a_saved_lm_head_and_old_buffers_loads(hf_dirs, tmp_path):
  directory = _copy(hf_dirs, "gpt2", tmp_path)
  def add_extras(tensors):
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]  # some saves keep the tied copy
    tensors["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # old causal-mask buffer
  _edit_weights(directory, add_extras)
  cfg, params = _load(directory)
  tokens = _tokens()
  assert np.abs(_lm_logits(cfg, params, tokens) - _hf_logits(hf_dirs["gpt2"][1], tokens)).max() <= TOLERANCE


def test_params_for_another_config_are_refused(hf_dirs):
  cfg = interop.model_config(hf_dirs["llama"][0], norm_eps=1e-5)
  with pytest.raises(HFError, match=r"norm_eps: config.json 1e-06, model config 1e-05"):
    interop.load_params(hf_dirs["llama"][0], cfg)


# ---------------------------------------------------------------------------------------------------- tokenizers


def _hf_tokenizer_json() -> str:
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders  # pylint: disable=g-import-not-at-top
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): 3 + i for i, c in enumerate(range(ord("a"), ord("z") + 1))}}
  vocab["▁"] = len(vocab)
  tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
  tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  tokenizer.decoder = decoders.Fuse()
  tokenizer.add_special_tokens(["<s>", "</s>"])
  return tokenizer.to_str()


def test_hf_tokenizer_encodes_a_batch_as_each_text():
  tokenizer = tokenizers.HFTokenizer(_hf_tokenizer_json(), eos_id=2, unk_id=0)
  texts = ["hello world", "", "abc", "zz top?"]
  ids, lengths = tokenizer.encode_batch(texts)
  alone = [tokenizer.encode(text) for text in texts]
  assert lengths.tolist() == [len(one) for one in alone]
  np.testing.assert_array_equal(ids, np.concatenate(alone))


def test_hf_tokenizer_from_a_model_directory_and_back(tmp_path):
  directory = tmp_path / "model"
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 2}))
  (directory / "tokenizer.json").write_text(_hf_tokenizer_json())
  (directory / "tokenizer_config.json").write_text(json.dumps({"unk_token": "<unk>", "eos_token": "</s>"}))
  tokenizer = interop.read_tokenizer(directory)
  assert isinstance(tokenizer, tokenizers.HFTokenizer)
  assert (tokenizer.eos_id, tokenizer.unk_id, tokenizer.vocab_size) == (2, 0, 30)
  ids = tokenizer.encode("abcz")
  assert ids.dtype == np.int32 and ids.tolist() == [3, 4, 5, 28]
  assert tokenizer.decode([1, 3, 0, 4, 2, 999, -1]) == "ab"  # specials, unk and out-of-range ids drop out
  tokenizer.save(tmp_path / "saved")
  again = tokenizers.load_tokenizer(tmp_path / "saved")
  assert again.to_json() == tokenizer.to_json() and again.encode("zz").tolist() == [28, 28]
  assert pickle.loads(pickle.dumps(tokenizer)).decode(ids) == "abcz"
  out = tmp_path / "export"
  out.mkdir()
  assert interop.write_tokenizer(tokenizer, out) == ["tokenizer.json", "lm_tokenizer/"]
  assert (out / "tokenizer.json").read_text() == tokenizer.tokenizer_json
  # lm's own folder wins over tokenizer.json: ids exactly as the run used them.
  assert interop.read_tokenizer(out).to_json() == tokenizer.to_json()


def test_sentencepiece_and_lm_tokenizers_beside_a_model(tmp_path):
  texts = ["the quick brown fox jumps over the lazy dog\n", "pack my box with five dozen liquor jugs\n"] * 10
  sentencepiece = tokenizers.build_tokenizer("sentencepiece", texts, vocab_size=32)
  (tmp_path / "spm").mkdir()
  (tmp_path / "spm" / "tokenizer.model").write_bytes(sentencepiece.model_proto)
  loaded = interop.read_tokenizer(tmp_path / "spm")
  assert isinstance(loaded, tokenizers.SentencePieceTokenizer) and loaded.model_proto == sentencepiece.model_proto
  (tmp_path / "byte").mkdir()
  assert interop.read_tokenizer(tmp_path / "byte") is None
  assert interop.write_tokenizer(tokenizers.ByteTokenizer(), tmp_path / "byte") == ["lm_tokenizer/"]
  assert isinstance(interop.read_tokenizer(tmp_path / "byte"), tokenizers.ByteTokenizer)
