"""Tests for lm.data.tokenizers: char, byte and SentencePiece tokenizers and their files."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from lm.data import tokenizers
from lm.data.tokenizers import TokenizerError

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def corpus(num_lines: int = 120, seed: int = 0) -> list[str]:
  """A few KB of deterministic English-like paragraphs."""
  rng = np.random.default_rng(seed)
  words = ("the king and queen of a small town said that we will go to see it now, my lord; "
           "what light through yonder window breaks? first citizen: before we proceed any further, "
           "hear me speak. you are all resolved rather to die than famish! speak, speak.").split()
  lines = [" ".join(rng.choice(words, size=rng.integers(4, 12))).capitalize() for _ in range(num_lines)]
  return ["\n".join(lines[i:i + 4]) for i in range(0, num_lines, 4)]


# ----------------------------------------------------------------------------- char


def test_char_vocabulary_is_sorted_characters_plus_unk():
  tokenizer = tokenizers.build_tokenizer("char", ["hello", "world\n"])
  assert tokenizer.chars == sorted(set("helloworld\n"))
  assert tokenizer.vocab_size == len(tokenizer.chars) + 1
  assert tokenizer.unk_id == len(tokenizer.chars) and tokenizer.eos_id is None
  ids = tokenizer.encode("hello\nworld")
  assert ids.dtype == np.int32 and ids.shape == (11,)
  assert ids.tolist() == [tokenizer.chars.index(char) for char in "hello\nworld"]
  assert tokenizer.decode(ids) == "hello\nworld"


def test_char_unseen_characters_are_unk_and_decode_to_nothing():
  tokenizer = tokenizers.build_tokenizer("char", ["abc"])
  ids = tokenizer.encode("a☃zb\U0001F600")
  assert ids.tolist() == [0, tokenizer.unk_id, tokenizer.unk_id, 1, tokenizer.unk_id]
  assert tokenizer.decode(ids) == "ab"
  # Out-of-range ids (e.g. a model with a padded vocabulary) are dropped too.
  assert tokenizer.decode(np.array([2, -1, 99, 0])) == "ca"
  assert tokenizer.decode([]) == ""


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"Tiny Shakespeare not found at {SHAKESPEARE}")
def test_char_tiny_shakespeare_has_65_characters_plus_unk():
  text = SHAKESPEARE.read_text(encoding="utf-8")
  tokenizer = tokenizers.build_tokenizer("char", [text])
  assert tokenizer.vocab_size == 66
  ids = tokenizer.encode(text)
  assert len(ids) == len(text) and tokenizer.decode(ids) == text


def test_char_decode_accepts_jax_arrays():
  jnp = pytest.importorskip("jax.numpy")
  tokenizer = tokenizers.build_tokenizer("char", ["xyz"])
  assert tokenizer.decode(jnp.array([2, 1, 0])) == "zyx"


# ----------------------------------------------------------------------------- byte


def test_byte_round_trip_and_specials():
  tokenizer = tokenizers.build_tokenizer("byte", None)
  assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.unk_id) == (257, 256, None)
  text = "naïve ☃ \U0001F600\n"
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids.tolist() == list(text.encode("utf-8"))
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(list(ids) + [256, 300, -5]) == text
  # A character cut short (as sampling may leave it) shows as U+FFFD, not an error.
  assert tokenizer.decode(ids[:-2]).endswith("\ufffd")


# ----------------------------------------------------------------------------- sentencepiece


def test_sentencepiece_round_trip_keeps_text_exactly():
  tokenizer = tokenizers.build_tokenizer("sentencepiece", corpus(), vocab_size=100)
  assert tokenizer.vocab_size == 100 and tokenizer.eos_id == 1 and tokenizer.unk_id == 0
  for text in corpus()[:3] + ["The  king\n\nsaid  it, now.", " my lord\n"]:
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    assert tokenizer.decode(ids) == text
  # Specials and out-of-range ids decode to nothing.
  assert tokenizer.decode([tokenizer.eos_id, tokenizer.unk_id, 10_000, -1]) == ""


def test_sentencepiece_unseen_characters_do_not_crash():
  small = tokenizers.build_tokenizer("sentencepiece", corpus(), vocab_size=100)
  assert small.unk_id in small.encode("☃").tolist()  # no room for byte pieces: unk
  assert small.decode(small.encode("king ☃ queen")) == "king  queen"
  # With room for the 256 byte pieces, unseen characters fall back to bytes and round-trip.
  large = tokenizers.build_tokenizer("sentencepiece", corpus(), vocab_size=340)
  assert large.decode(large.encode("king ☃ queen 42")) == "king ☃ queen 42"


def test_sentencepiece_training_is_deterministic():
  first = tokenizers.build_tokenizer("sentencepiece", corpus(), vocab_size=100)
  second = tokenizers.build_tokenizer("sentencepiece", iter(corpus()), vocab_size=100)
  assert first.model_proto == second.model_proto
  other = tokenizers.build_tokenizer("sentencepiece", corpus(seed=1), vocab_size=100)
  assert other.model_proto != first.model_proto


def test_sentencepiece_bpe_and_training_char_cap():
  bpe = tokenizers.build_tokenizer("sentencepiece", corpus(), vocab_size=100, sentencepiece_model_type="bpe")
  assert bpe.decode(bpe.encode(corpus()[0])) == corpus()[0]
  capped = tokenizers.build_tokenizer("sentencepiece", corpus(), vocab_size=60, max_sentencepiece_training_chars=500)
  assert capped.model_proto != tokenizers.build_tokenizer("sentencepiece", corpus(), vocab_size=60).model_proto


def test_sentencepiece_model_file(tmp_path):
  trained = tokenizers.build_tokenizer("sentencepiece", corpus(), vocab_size=100)
  model_file = tmp_path / "my.model"
  model_file.write_bytes(trained.model_proto)
  loaded = tokenizers.build_tokenizer("sentencepiece", None, model_file=str(model_file))
  assert loaded.encode("the king").tolist() == trained.encode("the king").tolist()
  with pytest.raises(TokenizerError, match=r"missing\.model does not exist"):
    tokenizers.build_tokenizer("sentencepiece", None, model_file=str(tmp_path / "missing.model"))
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(TokenizerError, match=r"junk\.model is not a valid SentencePiece model"):
    tokenizers.build_tokenizer("sentencepiece", None, model_file=str(tmp_path / "junk.model"))


def test_sentencepiece_vocab_too_large_is_a_clear_error():
  with pytest.raises(TokenizerError, match=r"SentencePiece training failed.*vocab_size"):
    tokenizers.build_tokenizer("sentencepiece", ["tiny text"], vocab_size=5000)


def test_sentencepiece_pickles_by_model_bytes():
  tokenizer = tokenizers.build_tokenizer("sentencepiece", corpus(), vocab_size=100)
  copy = pickle.loads(pickle.dumps(tokenizer))
  assert copy.encode("the queen").tolist() == tokenizer.encode("the queen").tolist()


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind, vocab_size", [("char", None), ("byte", None), ("sentencepiece", 100)])
def test_save_load_round_trip(tmp_path, kind, vocab_size):
  tokenizer = tokenizers.build_tokenizer(kind, corpus(), vocab_size=vocab_size)
  tokenizer.save(str(tmp_path / "tok"))
  config = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
  assert config == tokenizer.to_json() and config["format"] == 1 and config["kind"] == kind
  loaded = tokenizers.load_tokenizer(str(tmp_path / "tok"))
  assert type(loaded) is type(tokenizer)
  for attribute in ("vocab_size", "eos_id", "unk_id"):
    assert getattr(loaded, attribute) == getattr(tokenizer, attribute)
  text = corpus()[1] + " ☃"
  assert loaded.encode(text).tolist() == tokenizer.encode(text).tolist()
  assert (tmp_path / "tok" / "spm.model").exists() == (kind == "sentencepiece")


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(TokenizerError, match=r"No tokenizer at .*tokenizer\.json"):
    tokenizers.load_tokenizer(str(tmp_path / "nothing"))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(TokenizerError, match=r"tokenizer\.json is corrupt"):
    tokenizers.load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text(json.dumps({"format": 99, "kind": "char"}))
  with pytest.raises(TokenizerError, match=r"need format 1"):
    tokenizers.load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text(json.dumps({"format": 1, "kind": "char", "vocab_size": 3}))
  with pytest.raises(TokenizerError, match=r"missing 'chars'"):
    tokenizers.load_tokenizer(str(tmp_path))


def test_load_sentencepiece_without_model_file(tmp_path):
  tokenizers.build_tokenizer("sentencepiece", corpus(), vocab_size=100).save(str(tmp_path))
  (tmp_path / "spm.model").unlink()
  with pytest.raises(TokenizerError, match=r"spm\.model does not exist"):
    tokenizers.load_tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- build_tokenizer


def test_workdir_tokenizer_is_saved_then_reused(tmp_path):
  workdir = str(tmp_path / "run")
  first = tokenizers.build_tokenizer("char", ["abc"], workdir_dir=workdir)
  # A resumed run must keep its ids, even if the texts it is handed now differ.
  again = tokenizers.build_tokenizer("char", ["xyz"], workdir_dir=workdir)
  assert again.chars == first.chars == ["a", "b", "c"]
  with pytest.raises(TokenizerError, match=r"already holds a char tokenizer.*new workdir"):
    tokenizers.build_tokenizer("byte", None, workdir_dir=workdir)


@pytest.mark.parametrize(
    "kind, texts, kwargs, pattern",
    [
        ("words", ["x"], {}, r"Unknown tokenizer kind 'words'"),
        ("char", None, {}, r"built from the training texts"),
        ("char", ["", ""], {}, r"No characters"),
        ("sentencepiece", ["x"], {}, r"needs vocab_size"),
        ("sentencepiece", ["", "\n"], {"vocab_size": 10}, r"No text to train"),
    ],
)
def test_build_errors(kind, texts, kwargs, pattern):
  with pytest.raises(TokenizerError, match=pattern):
    tokenizers.build_tokenizer(kind, texts, **kwargs)


# ----------------------------------------------------------------------------- many texts at once
_SURROGATE = re.compile("[\ud800-\udfff]")
_TEXTS = st.lists(st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=12), max_size=8)


@pytest.fixture(scope="module")
def every_kind():
  return [tokenizers.build_tokenizer("char", corpus()), tokenizers.ByteTokenizer(),
          tokenizers.build_tokenizer("sentencepiece", corpus(), vocab_size=100)]


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(texts=_TEXTS)
def test_encoding_a_batch_gives_each_texts_ids(every_kind, texts):
  # Empty texts, non-ASCII and lone surrogates (which byte and char tokenizers pass through) included.
  for tokenizer in every_kind:
    if tokenizer.kind == "sentencepiece" and any(_SURROGATE.search(text) for text in texts):
      continue  # SentencePiece takes UTF-8 only: a lone surrogate is refused by encode and encode_batch alike
    ids, lengths = tokenizer.encode_batch(texts)
    alone = [tokenizer.encode(text) for text in texts]
    assert lengths.dtype == np.int64 and lengths.tolist() == [len(one) for one in alone], tokenizer
    expected = np.concatenate(alone) if alone else np.zeros(0, np.int32)
    np.testing.assert_array_equal(ids.astype(np.int64), expected.astype(np.int64))
