"""Fuzzed bad inputs at every boundary where input enters (issue 16, item 7).

The rule (lm.core.errors): bad input is a `UserError` whose message is one
line naming the problem and the fix, raised where the input enters, before
anything is written; `lm.main` prints it as `error: ...` and exits 2. Anything
else is a bug. Hypothesis throws generated inputs at each boundary, in process
(fast), and asserts a UserError (or, where the input may happen to be valid,
success), never another exception:

  1. config overrides: wrong types, out-of-range values, unknown enum values
     and keys (`lm.config.load_config` / `apply_overrides` + `validate`, what
     the CLI runs before a mode touches its workdir);
  2. prompts files (`lm.inference.prompts.read_prompts_file`, then the prompt's
     tokens against the model's context);
  3. .txt/.jsonl/.tsv corpora (`lm.data.local_files.read_documents`, and a
     `Split`'s token cache through `lm.data.prepare.token_stream`: no manifest
     is written);
  4. Hugging Face folders (`lm.interop.model_config` / `check_weights` /
     `load_model`): config.json of wrong types or missing fields, garbage or
     truncated safetensors.

Then one `python -m lm.main` per input kind (run side by side): exit code 2,
one `error:` line, no traceback, and the workdir not created (or unchanged).

Examples are few and derandomized (the same inputs on every run), so the file
is fast and never flakes.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lm import interop
from lm.config import apply_overrides, load_config, validate
from lm.core.errors import ConfigError, DataError, UserError
from lm.data import corpus, local_files, prepare, token_cache
from lm.data import tokenizers as tokenizers_lib
from lm.experiment import model_config_for
from lm.experiment.config import PARTS
from lm.inference import prompts as prompts_lib
from lm.models import TransformerConfig, TransformerLM
from lm.tasks.lm import LMTask
from lm.train import sharding
from tests.helpers import ROOT, cli_args, run_cli, snapshot, tiny_overrides


def fuzz(examples: int):
  """Hypothesis settings: `examples` derandomized examples, no deadline, no example database."""
  return settings(max_examples=examples, derandomize=True, deadline=None, database=None, print_blob=False,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much, HealthCheck.large_base_example])


MODES = ("train", "prepare", "online", "eval", "sample", "bench", "crossval", "ab", "export")
EXPERIMENT = str(ROOT / "experiments" / "shakespeare_char.py")


def check_message(error: BaseException, *names: str) -> str:
  """`error` is a UserError whose message is one sensible line naming one of `names`."""
  assert isinstance(error, UserError), f"{type(error).__name__} is not a UserError: {error}"
  message = str(error)
  assert message and message == message.strip(), f"blank or padded message: {message!r}"
  assert "\n" not in message and "\r" not in message, f"message of several lines: {message!r}"
  assert "Traceback" not in message
  assert message[0].isalnum() or message[0] in "'\"/.~-", f"message starts oddly: {message!r}"
  if names:
    assert any(name in message for name in names), f"message names none of {names}: {message!r}"
  return message


def user_error_or_ok(call, *names: str):
  """call()'s result, or None when it raises a UserError (checked as `check_message` says)."""
  try:
    return call()
  except UserError as error:
    check_message(error, *names)
    return None


def expect_user_error(call, *names: str) -> UserError:
  """The UserError call() must raise (its message checked as `check_message` says)."""
  try:
    result = call()
  except UserError as error:
    check_message(error, *names)
    return error
  raise AssertionError(f"accepted without a UserError (got {result!r:.200})")


def fresh_dir(root: Path) -> Path:
  return Path(tempfile.mkdtemp(dir=root))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
  """A folder the examples make their own folders in (hypothesis examples cannot take tmp_path)."""
  return tmp_path_factory.mktemp("fuzz")


# -- 1. config overrides ----------------------------------------------------------------------------------------
# What --mode online, ab and export need set (else their own check, not the fuzzed field's, would speak first).
BASE = load_config(EXPERIMENT, tiny_overrides(**{"online.stream": "dir:/nonexistent", "ab.a": "/a", "ab.b": "/b",
                                                 "export.dir": "/out"}))
DEFAULTS = {dotted: default for part in PARTS for dotted, default in part.fields.items()}


def _resolved(default):
  """(the default's value, whether it is an unset placeholder) for a field default (FieldReference or value)."""
  if hasattr(default, "get_type"):
    value = default.get()
    return (default.get_type()() if value is None and default.get_type() else value), value is None
  return default, False


def _wrong_values(default) -> st.SearchStrategy | None:
  """Values of another type than `default`'s that no coercion turns into one (None: any type goes)."""
  value, placeholder = _resolved(default)
  texts = st.text(max_size=12)
  non_integral = st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not float(x).is_integer())
  containers = st.one_of(st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2))
  none = st.nothing() if placeholder else st.none()
  if isinstance(value, bool):
    return st.one_of(st.integers(), texts, non_integral, containers, none)
  if isinstance(value, int):
    return st.one_of(texts, non_integral, st.booleans(), containers, none)
  if isinstance(value, float):  # (ConfigDict turns an int, and so a bool, into a float)
    return st.one_of(texts, containers, none)
  if isinstance(value, str):
    return st.one_of(st.integers(), st.floats(), st.booleans(), containers, none)
  if isinstance(value, tuple):
    if value and all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value):
      return st.one_of(st.integers(), texts.filter(bool), none,
                       st.lists(texts, min_size=1, max_size=3).map(tuple))  # items of another type
    return st.one_of(st.integers(), texts.filter(bool), none)
  return None


TYPED_FIELDS = sorted(key for key, default in DEFAULTS.items() if _wrong_values(default) is not None)


def _set_and_validate(overrides: dict, mode: str) -> None:
  validate(apply_overrides(BASE, overrides), mode)


def test_the_baseline_and_every_experiment_validate():
  """The checks below reject only what they should: the configs the project ships pass them."""
  for path in sorted((ROOT / "experiments").glob("*.py")):
    validate(load_config(str(path)), "train")
  for mode in MODES:
    validate(BASE, mode)


@pytest.mark.parametrize("key", TYPED_FIELDS)
@fuzz(2)
@given(st.data())
def test_overrides_of_the_wrong_type_are_config_errors(key, data):
  """Every field, set in a notebook (`load_config(path, overrides)`) to a value of another type."""
  value = data.draw(_wrong_values(DEFAULTS[key]), label="value")
  mode = data.draw(st.sampled_from(MODES), label="mode")
  error = expect_user_error(lambda: _set_and_validate({key: value}, mode), key.split(".")[-1])
  assert isinstance(error, ConfigError), error


_NONPOSITIVE = st.integers(-10**12, 0)
_NEGATIVE = st.integers(-10**12, -1)
_NEGATIVE_FLOATS = st.floats(max_value=-1e-12, allow_infinity=True)
_NONPOSITIVE_FLOATS = st.one_of(st.floats(max_value=0.0, allow_infinity=True), st.just(math.nan))
_OUTSIDE_0_1 = st.one_of(st.floats(min_value=1.0, allow_infinity=True), _NEGATIVE_FLOATS, st.just(math.nan))
_OUTSIDE_0_1_OPEN = st.one_of(st.floats(min_value=1.0 + 1e-9, allow_infinity=True), _NONPOSITIVE_FLOATS)

OUT_OF_RANGE = {
    **{key: _NONPOSITIVE for key in ("steps", "batch_size", "seq_len", "grad_accum_steps", "log_every", "eval_every",
                                     "checkpoint_every", "keep_checkpoints", "model.num_layers", "model.num_heads",
                                     "model.width", "model.vocab_multiple", "model.loss_chunk_len", "model.mlp_dim",
                                     "model.num_kv_heads", "model.max_len", "model.vocab_size", "data.train_stride",
                                     "data.shard_mb", "data.tokenizer_sample_bytes", "sample.max_tokens",
                                     "sample.num_samples", "sample.beam_size", "bench.steps", "bench.profile_steps", "online.chunks",
                                     "online.replay_capacity", "distributed.initialization_timeout",
                                     "distributed.heartbeat_timeout", "vae.latent_size", "gan.critic_steps")},
    "optim.lr": _NONPOSITIVE_FLOATS,
    "optim.min_lr": _NEGATIVE_FLOATS,
    "optim.warmup_steps": _NEGATIVE,
    "optim.b1": _OUTSIDE_0_1,
    "optim.b2": _OUTSIDE_0_1,
    "optim.weight_decay": _NEGATIVE_FLOATS,
    "optim.grad_clip": _NEGATIVE_FLOATS,
    "model.dropout": _OUTSIDE_0_1,
    "model.fused_loss_min_mb": _NEGATIVE_FLOATS,
    "data.prepare_workers": _NEGATIVE,
    "eval.folds": st.integers(-10**6, 1),
    "eval.stride": st.one_of(_NEGATIVE, st.integers(BASE.seq_len + 1, 10**9)),
    "sample.temperature": _NEGATIVE_FLOATS,
    "sample.top_p": _OUTSIDE_0_1_OPEN,
    "sample.top_k": _NEGATIVE,
    "sample.interpolation_steps": st.integers(-10**6, 1),
    "sample.length_penalty": _NEGATIVE_FLOATS,
    "bench.warmup_steps": _NEGATIVE,
    "online.replay_fraction": _OUTSIDE_0_1,
    "online.heldout_fraction": _OUTSIDE_0_1_OPEN,
    "ab.confidence": _OUTSIDE_0_1_OPEN,
    "export.max_shard_size": _NEGATIVE,
    "clean.min_chars": _NEGATIVE,
    "clean.near_dup_threshold": st.one_of(st.floats(min_value=1.0 + 1e-9, allow_infinity=True), _NEGATIVE_FLOATS),
    "vae.word_dropout": _OUTSIDE_0_1,
    "denoise.rate": _OUTSIDE_0_1,
    "classifier.label_smoothing": _OUTSIDE_0_1,
    "distill.temperature": _NONPOSITIVE_FLOATS,
    "distill.alpha": st.one_of(st.floats(min_value=1.0 + 1e-9, allow_infinity=True), _NEGATIVE_FLOATS, st.just(math.nan)),
}

ENUMS = ("head", "mesh.preset", "data.tokenizer", "data.format", "optim.name", "optim.schedule", "model.variant", "model.position",
         "model.norm", "model.mlp", "model.dtype", "model.attention_impl", "model.loss_impl", "model.remat_policy",
         "sample.kind", "xla.preset", "online.lr_schedule", "clean.normalization", "vae.injection", "vae.pooling",
         "gan.kind", "classifier.pooling")


def test_the_fuzzed_fields_exist():
  assert not [key for key in (*OUT_OF_RANGE, *ENUMS) if key not in DEFAULTS]


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
@fuzz(4)
@given(st.data())
def test_out_of_range_values_are_config_errors(key, data):
  value = data.draw(OUT_OF_RANGE[key], label="value")
  mode = data.draw(st.sampled_from(MODES), label="mode")
  expect_user_error(lambda: _set_and_validate({key: value}, mode), key.split(".")[-1])


@pytest.mark.parametrize("key", ENUMS)
@fuzz(2)
@given(st.text(max_size=10), st.sampled_from(MODES))
def test_unknown_enum_values_are_config_errors(key, tail, mode):
  value = "bogus" + tail  # never one of the names a field takes
  expect_user_error(lambda: _set_and_validate({key: value}, mode), key.split(".")[-1])


@fuzz(15)
@given(st.sampled_from(sorted(DEFAULTS)), st.text("xyz0", min_size=1, max_size=6), st.booleans())
def test_unknown_keys_are_config_errors(key, typo, deeper):
  wrong = f"{key}.{typo}" if deeper else f"{key}_{typo}"  # below a leaf, or a misspelt leaf
  expect_user_error(lambda: apply_overrides(BASE, {wrong: 1}), wrong)


@fuzz(20)
@given(st.one_of(st.integers(), st.text(max_size=6), st.none(),
                 st.lists(st.one_of(st.integers(), st.text(max_size=4), st.none()), min_size=1, max_size=3)),
       st.booleans())
@example(rule=5, wrap=True)
@example(rule="fsdp", wrap=True)
@example(rule=["data", 3], wrap=False)
def test_malformed_mesh_rules_are_config_errors(rule, wrap):
  """What validate accepts, building the run's mesh accepts too (lm.experiment.build reads the rules)."""
  rules = ((rule,) if wrap else (("batch", rule),))
  config = apply_overrides(BASE, {"mesh.rules": rules})
  try:
    validate(config, "train")
  except UserError as error:
    check_message(error, "rules")
    return
  sharding.mesh_settings(config.mesh)


# -- 2. prompts files ------------------------------------------------------------------------------------------
_JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                            lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                            max_leaves=6)
_BAD_BYTES = st.sampled_from([b"\xff", b"\xfe\xfe", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                              b"\xc0\xaf", b"\x80"])


def _json_line(field: str) -> st.SearchStrategy[bytes]:
  """A .jsonl line: an object with `field` (of any type), without it, or no object at all; or a tricky one."""
  objects = st.one_of(st.dictionaries(st.sampled_from([field, "label", "other"]), _JSON_VALUES, max_size=3),
                      st.fixed_dictionaries({field: st.text(max_size=20)}), _JSON_VALUES)
  tricky = st.sampled_from([
      b'{"%s": "\\ud800 half a pair"}' % field.encode(), b'{"%s": "ok", "n": %s}' % (field.encode(), b"9" * 5000),
      b"[" * 3000 + b"]" * 3000, b'{"%s": "unterminated' % field.encode(), b"NaN", b'{"%s": "\\u0000nul"}' %
      field.encode()])
  return st.one_of(objects.map(lambda value: json.dumps(value).encode()), tricky)


def _file_bytes(lines: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
  """A file of such lines, with bad bytes, NULs, huge or blank lines among them, \\n or \\r\\n endings."""
  line = st.one_of(lines, lines, _BAD_BYTES, st.just(b""), st.just(b"   "), st.just(b"\x00\x00"),
                   st.binary(max_size=24), st.integers(1, 200_000).map(lambda n: b"x" * n),
                   st.text(max_size=24).map(lambda text: text.encode("utf-8", "surrogatepass")))
  return st.tuples(st.lists(line, max_size=6), st.sampled_from([b"\n", b"\r\n"]), st.booleans()).map(
      lambda parts: parts[1].join(parts[0]) + (parts[1] if parts[2] else b""))


_TEXT_LINES = st.text(max_size=40).map(lambda text: text.encode("utf-8", "surrogatepass"))
_HUGE_INT = b"9" * 5000  # past Python's 4300 digits for int(str): json.loads raises ValueError, not JSONDecodeError
_DEEP = b"[" * 100_000 + b"]" * 100_000  # deeper than the stack: RecursionError


def with_examples(cases):
  """Hypothesis `@example`s, one per case: the known-tricky inputs run on every run, whatever is generated."""
  def decorate(test):
    for case in reversed(cases):
      test = example(case)(test)
    return test
  return decorate


def _cases(extensions, content):
  """(extension, file content) pairs, the content drawn for the extension."""
  return st.sampled_from(extensions).flatmap(lambda extension: st.tuples(st.just(extension), content(extension)))


@pytest.fixture(scope="module")
def prompt_heads():
  """Language-model tasks (char and byte tokenizers, a 16-token context) to encode read prompts with."""
  heads = []
  for tokenizer in (tokenizers_lib.CharTokenizer.from_texts(["abcdefgh :\n"]), tokenizers_lib.ByteTokenizer()):
    config = apply_overrides(BASE, {"seq_len": 16})
    heads.append(LMTask(config, model_config_for(config, tokenizer), tokenizer))
  return heads


def _prompts(extension: str) -> st.SearchStrategy[bytes]:
  return _file_bytes(_json_line("prompt") if extension == ".jsonl" else _TEXT_LINES)


@fuzz(40)
@given(_cases([".txt", ".jsonl"], _prompts))
@with_examples([
    (".jsonl", b'{"prompt": "\\ud800 half of a pair"}\n'), (".jsonl", b'{"prompt": "ROMEO:", "n": ' + _HUGE_INT + b"}"),
    (".jsonl", _DEEP), (".jsonl", b'["prompt"]\n{"prompt": 3}'), (".txt", b"x" * 300_000), (".txt", b"\x00\n\x00\x00"),
    (".txt", b"ROMEO\\n:\r\n\xef\xbb\xbf"), (".txt", b""), (".jsonl", b"\xef\xbb\xbf\n \n")])
def test_prompts_files_read_or_are_config_errors(scratch, prompt_heads, case):
  extension, content = case
  path = fresh_dir(scratch) / f"prompts{extension}"
  path.write_bytes(content)
  read = user_error_or_ok(lambda: prompts_lib.read_prompts_file(str(path)), path.name, "prompts_file")
  if read is None:
    return
  assert read and all(isinstance(prompt.text, str) and prompt.where.startswith(path.name) for prompt in read)
  for prompt in read:
    prompt.text.encode("utf-8")  # text, printable with the sample
    for head in prompt_heads:
      encode = head._prompt_ids  # pylint: disable=protected-access  (what LMTask.sample checks each prompt with)
      user_error_or_ok(lambda encode=encode, prompt=prompt: encode(prompt), prompt.where)


@fuzz(20)
@given(st.sampled_from([".txt", ".jsonl"]), _file_bytes(_TEXT_LINES), _BAD_BYTES, st.data())
def test_prompts_files_that_are_not_utf8_or_blank_are_config_errors(scratch, extension, content, bad, data):
  lines = content.split(b"\n")
  at = data.draw(st.integers(0, len(lines)), label="bad line")
  broken = b"\n".join(lines[:at] + [b"x" + bad] + lines[at:])
  path = fresh_dir(scratch) / f"p{extension}"
  path.write_bytes(broken)
  message = expect_user_error(lambda: prompts_lib.read_prompts_file(str(path)), path.name)
  assert any(word in str(message) for word in ("UTF-8", "JSON", "prompt")), message
  for blank in (b"", b"\n\n", b"\r\n  \r\n" if extension == ".jsonl" else b"\n\r\n"):
    path.write_bytes(blank)
    error = expect_user_error(lambda: prompts_lib.read_prompts_file(str(path)), "prompts_file")
    assert "holds no prompts" in str(error)


# -- 3. corpora ------------------------------------------------------------------------------------------------
def _tsv_line() -> st.SearchStrategy[bytes]:
  cell = st.text(st.characters(blacklist_characters="\t\n\r"), max_size=8)
  return st.lists(cell, max_size=4).map(lambda cells: "\t".join(cells).encode("utf-8", "surrogatepass"))


def _corpus(extension: str) -> st.SearchStrategy[bytes]:
  if extension == ".jsonl":
    return _file_bytes(_json_line("text"))
  if extension == ".tsv":
    header = st.sampled_from([b"label\tsentence", b"text", b"a\tb\tc", b"", b"sentence\tlabel\ttext"])
    return st.tuples(header, _file_bytes(_tsv_line())).map(lambda parts: parts[0] + b"\n" + parts[1])
  return _file_bytes(_TEXT_LINES)


_EXTENSIONS = st.sampled_from([".txt", ".jsonl", ".tsv"])


CORPUS_EXAMPLES = [
    (".jsonl", b'{"text": "\\udc00 half of a pair"}\n'), (".jsonl", b'{"text": "fine", "n": ' + _HUGE_INT + b"}\n"),
    (".jsonl", _DEEP + b"\n"), (".jsonl", b"[1, 2]\n"), (".jsonl", b'{"other": 1}\n'), (".jsonl", b'{"text": 5}\n'),
    (".jsonl", b'{"text": "a\\u0000b"}\n'), (".tsv", b"a\tb\nx\ty\n"), (".tsv", b"text\tlabel\nx\n"),
    (".tsv", b"text\n\x00\n"), (".txt", b"\x00\n"), (".txt", b"x" * 300_000), (".txt", b""),
    (".txt", b"\xef\xbb\xbf\r\n"), (".txt", b"caf\xc3"),
]


@fuzz(60)
@given(_cases([".txt", ".jsonl", ".tsv"], _corpus))
@with_examples(CORPUS_EXAMPLES)
def test_corpora_read_or_are_data_errors(scratch, case):
  extension, content = case
  path = fresh_dir(scratch) / f"corpus{extension}"
  path.write_bytes(content)
  documents = user_error_or_ok(lambda: list(local_files.read_documents(path)), path.name)
  if documents is not None:
    assert any(document.strip() for document in documents)
    for document in documents:
      document.encode("utf-8")  # text the tokenizers and TFDS take


@fuzz(25)
@given(_EXTENSIONS, st.data(), _BAD_BYTES)
def test_corpora_with_bad_bytes_or_no_text_are_data_errors(scratch, extension, data, bad):
  content = data.draw(_corpus(extension), label="content")
  path = fresh_dir(scratch) / f"corpus{extension}"
  path.write_bytes(content + b"\n" + bad + b"\n")
  error = expect_user_error(lambda: list(local_files.read_documents(path)), path.name)
  assert isinstance(error, DataError), error
  for blank in (b"", b"\n\n \n", b"\r\n"):
    path.write_bytes(blank if extension != ".tsv" else b"text\n" + blank)
    assert "holds no text" in str(expect_user_error(lambda: list(local_files.read_documents(path)), path.name))


def _token_stream(scratch: Path, extension: str, content: bytes):
  """(the stream or None on a UserError, the cache folder) of a corpus file of `content` through Beam."""
  folder = fresh_dir(scratch)
  path = folder / f"train{extension}"
  path.write_bytes(content)
  cache = folder / "cache"
  split = corpus.Split(str(path), "train", cache_dir=str(cache))
  options = prepare.PrepareOptions(cache_dir=str(cache), workers=1)
  stream = user_error_or_ok(lambda: prepare.token_stream(split, tokenizers_lib.ByteTokenizer(), options), path.name,
                            "no documents")
  return stream, cache


def _manifests(cache: Path) -> list[Path]:
  return list(cache.rglob(token_cache.MANIFEST))


@fuzz(6)
@given(_cases([".txt", ".jsonl", ".tsv"], _corpus))
@with_examples([CORPUS_EXAMPLES[0], CORPUS_EXAMPLES[1]])
def test_token_caches_of_corpora_prepare_or_are_data_errors_without_a_manifest(scratch, case):
  stream, cache = _token_stream(scratch, *case)
  if stream is None:
    assert not _manifests(cache)
  else:
    assert _manifests(cache) and len(stream) > 0


@fuzz(6)
@given(_EXTENSIONS, _BAD_BYTES, st.booleans())
def test_token_caches_of_bad_corpora_are_data_errors_without_a_manifest(scratch, extension, bad, blank):
  header = b"text\n" if extension == ".tsv" else b""
  good = b'{"text": "fine"}\n' if extension == ".jsonl" else b"fine\n"
  content = header + (b"\n \n" if blank else good * 3 + b"x" + bad + b"\n" + good)
  stream, cache = _token_stream(scratch, extension, content)
  assert stream is None and not _manifests(cache)


# -- 4. Hugging Face folders -----------------------------------------------------------------------------------
def _export(directory: Path, variant: str) -> Path:
  cfg = TransformerConfig.from_config(dict(variant=variant, num_layers=1, num_heads=2, width=8), vocab_size=11,
                                      max_len=16)
  shapes = jax.eval_shape(TransformerLM(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(np.float32), nn.meta.unbox(shapes))
  interop.export(params, cfg, directory)
  return directory


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
  """Tiny valid GPT-2 and Llama folders (config.json + model.safetensors), to corrupt copies of."""
  root = tmp_path_factory.mktemp("hf")
  folders = {variant: _export(root / variant, variant) for variant in ("gpt2", "llama")}
  for folder in folders.values():  # they load
    cfg = interop.model_config(folder)
    interop.check_weights(folder, cfg)
  return folders


def _copy(scratch: Path, folder: Path) -> Path:
  target = fresh_dir(scratch) / "model"
  shutil.copytree(folder, target)
  return target


def _load_checked(folder: Path) -> None:
  cfg = interop.model_config(folder)
  interop.check_weights(folder, cfg)


_HF_KEYS = ("model_type", "architectures", "n_embd", "n_head", "n_layer", "n_positions", "n_ctx", "n_inner",
            "vocab_size", "activation_function", "layer_norm_epsilon", "hidden_size", "num_attention_heads",
            "num_hidden_layers", "num_key_value_heads", "intermediate_size", "max_position_embeddings",
            "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "sliding_window", "head_dim",
            "hidden_act", "tie_word_embeddings", "attention_bias")
_HF_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.sampled_from([0, 2**31, 10**30, -10**30]),
                       st.floats(allow_nan=False), st.text(max_size=8), st.lists(st.integers(-2, 4), max_size=3),
                       st.dictionaries(st.sampled_from(["rope_type", "rope_theta", "x"]),
                                       st.one_of(st.text(max_size=4), st.integers(-1, 3)), max_size=2))


@fuzz(40)
@given(st.sampled_from(["gpt2", "llama"]),
       st.lists(st.tuples(st.sampled_from(_HF_KEYS), st.one_of(st.just("delete"), _HF_VALUES)), min_size=1,
                max_size=3))
@example(variant="gpt2", edits=[("n_embd", "wide")])
@example(variant="gpt2", edits=[("n_head", 0)])
@example(variant="gpt2", edits=[("n_layer", 10**30)])
@example(variant="gpt2", edits=[("layer_norm_epsilon", "tiny")])
@example(variant="gpt2", edits=[("model_type", ["gpt2"])])
@example(variant="gpt2", edits=[("n_positions", None), ("n_ctx", 2.5)])
@example(variant="llama", edits=[("rope_parameters", [1])])
@example(variant="llama", edits=[("architectures", 5)])
@example(variant="llama", edits=[("sliding_window", "x")])
@example(variant="llama", edits=[("num_key_value_heads", 3)])
@example(variant="llama", edits=[("rope_theta", "big")])
@example(variant="llama", edits=[("hidden_size", 6)])
def test_hf_config_json_of_wrong_types_or_missing_fields_are_hf_errors(scratch, hf_folders, variant, edits):
  folder = _copy(scratch, hf_folders[variant])
  config = json.loads((folder / "config.json").read_text())
  for key, value in edits:
    if value == "delete":
      config.pop(key, None)
    else:
      config[key] = value
  (folder / "config.json").write_text(json.dumps(config))
  user_error_or_ok(lambda: _load_checked(folder), "config.json", "model.safetensors", str(folder))


_BAD_CONFIG_JSON = [b"", b"{", b'{"model_type": "gpt2"', b"\xff\xfe{}", b'{"model_type": ["gpt2"]}',
                    b'{"model_type": "gpt2", "n_embd": ' + b"9" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000,
                    b"\xef\xbb\xbf{}", b"NaN"]


@fuzz(20)
@given(st.sampled_from(["gpt2", "llama"]),
       st.one_of(st.binary(max_size=64), _JSON_VALUES.filter(lambda value: not isinstance(value, dict)).map(
           lambda value: json.dumps(value).encode()), st.sampled_from(_BAD_CONFIG_JSON)))
def test_hf_config_json_that_is_not_a_json_object_is_an_hf_error(scratch, hf_folders, variant, content):
  folder = _copy(scratch, hf_folders[variant])
  (folder / "config.json").write_bytes(content)
  expect_user_error(lambda: _load_checked(folder), "config.json")
  expect_user_error(lambda: interop.load_model(folder), "config.json")


@fuzz(25)
@given(st.sampled_from(["gpt2", "llama"]), st.sampled_from(["truncate", "garbage", "flip"]), st.data())
def test_garbage_or_truncated_safetensors_are_hf_errors(scratch, hf_folders, variant, how, data):
  folder = _copy(scratch, hf_folders[variant])
  weights = folder / "model.safetensors"
  content = weights.read_bytes()
  if how == "truncate":
    content = content[:data.draw(st.integers(0, len(content) - 1), label="length")]
  elif how == "garbage":
    content = data.draw(st.binary(max_size=200), label="garbage")
  else:  # bytes of the header (length, then JSON) or of the tensors replaced: may still be a valid file
    header_end = 8 + int.from_bytes(content[:8], "little")
    at = data.draw(st.integers(0, min(len(content) - 1, header_end + 16)), label="at")
    new = data.draw(st.binary(min_size=1, max_size=4), label="bytes")
    content = content[:at] + new + content[at + len(new):]
  weights.write_bytes(content)
  if how == "flip":
    user_error_or_ok(lambda: interop.load_model(folder), "model.safetensors")
  else:
    expect_user_error(lambda: interop.load_model(folder), "model.safetensors")


# -- the command line: one run per kind of input, side by side ---------------------------------------------------
@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, hf_folders):
  """name -> (workdir, its snapshot before, the CompletedProcess) of `python -m lm.main` on bad inputs."""
  root = tmp_path_factory.mktemp("cli")
  (root / "bad_prompts.txt").write_bytes(b"ROMEO:\nJULI\xffET:\n")
  (root / "bad_corpus.jsonl").write_bytes(b'{"text": "To be"}\n[1, 2]\n')
  hf = root / "hf"
  shutil.copytree(hf_folders["gpt2"], hf)
  (hf / "config.json").write_text('{"model_type": "gpt2", "n_embd": "wide"}')
  existing = root / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("kept\n")
  cases = {
      "override_type": (root / "w1", ["--config.steps=many"]),
      "override_range": (existing, cli_args(**{"model.dropout": 1.5})),
      "prompts_file": (root / "w3", ["--mode", "sample",
                                     *cli_args(**{"sample.prompts_file": root / "bad_prompts.txt"})]),
      "corpus": (root / "w4", cli_args(**{"data.source": root / "bad_corpus.jsonl", "data.cache_dir": root / "cache"})),
      "hf_folder": (root / "w5", cli_args(**{"init_from": f"hf:{hf}", "data.tokenizer": "byte"})),
  }
  before = {name: snapshot(workdir) for name, (workdir, _) in cases.items()}

  def run(item):
    workdir, args = item
    return run_cli("--config", EXPERIMENT, "--workdir", str(workdir), *args, timeout=240)

  with ThreadPoolExecutor(max_workers=len(cases)) as pool:
    results = dict(zip(cases, pool.map(run, cases.values())))
  return {name: (cases[name][0], before[name], results[name]) for name in cases}


@pytest.mark.parametrize("name, names", [
    ("override_type", ("steps",)),
    ("override_range", ("dropout",)),
    ("prompts_file", ("bad_prompts.txt", "UTF-8")),
    ("corpus", ("bad_corpus.jsonl",)),
    ("hf_folder", ("config.json", "n_embd")),
])
def test_the_command_line_prints_one_error_line_and_writes_nothing(cli_runs, name, names):
  workdir, before, result = cli_runs[name]
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert all(part in errors[0] for part in names), errors[0]
  assert snapshot(workdir) == before and (workdir.exists() == bool(before))
