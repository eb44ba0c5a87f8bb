"""Tokenizers: characters, UTF-8 bytes, SentencePiece, Hugging Face; saved as small versioned JSON.

Every tokenizer maps a ``str`` to ``int32`` ids ``[num_tokens]`` and back. ``encode``
never appends an end-of-document id: the pipeline joins documents, with ``eos_id``
where the tokenizer has one, else with the encoded text separator.

Ids a tokenizer cannot turn back into text — ``unk_id``, end-of-document and other
control ids, ids outside ``[0, vocab_size)`` — decode to nothing, for every kind, so
sampled ids always decode without error.

A saved tokenizer is a directory holding ``tokenizer.json`` (``{"format": 1, "kind": ...}``)
and, for SentencePiece, the model file ``spm.model``; for a Hugging Face ``tokenizers``
tokenizer (kind "hf", taken from an imported model, never trained here), ``hf_tokenizer.json``.
"""

from __future__ import annotations

import abc
import hashlib
import io
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from lm.core.errors import TokenizerError

FORMAT_VERSION = 1
CONFIG_FILENAME = "tokenizer.json"
SENTENCEPIECE_FILENAME = "spm.model"
HF_TOKENIZER_FILENAME = "hf_tokenizer.json"
KINDS = ("char", "byte", "sentencepiece", "hf")
BUILDABLE_KINDS = ("char", "byte", "sentencepiece")  # "hf" comes with an imported model (lm.interop)
_NUM_BYTES = 256
# The trained model depends on the thread count, so it is fixed for reproducibility.
_SENTENCEPIECE_THREADS = 2
# Longest training line SentencePiece keeps (bytes); its default 4192 drops long JSONL/TSV rows.
_SENTENCEPIECE_MAX_LINE_BYTES = 1 << 16
# SentencePiece's reserved pieces: unk (id 0), eos (id 1), and "\n" as a piece of its
# own, because training sees text line by line and would otherwise never learn a newline.
_SENTENCEPIECE_UNK_ID = 0
_SENTENCEPIECE_EOS_ID = 1
_SENTENCEPIECE_SPECIALS = 3


def _id_array(ids: Any) -> np.ndarray:
  """Any 1-D sequence of ints (list, numpy, jax) -> int64 numpy array [num_tokens]."""
  array = np.asarray(ids)
  if array.ndim > 1:
    raise ValueError(f"decode takes one sequence of ids, got shape {array.shape}; decode each row.")
  return np.atleast_1d(array).astype(np.int64)


def _codepoints(text: str) -> np.ndarray:
  """Unicode code points of ``text`` [len(text)] (uint32); lone surrogates pass through."""
  return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")


class Tokenizer(abc.ABC):
  """Maps text to int32 ids and back."""

  kind: str
  vocab_size: int
  eos_id: int | None
  unk_id: int | None

  @abc.abstractmethod
  def encode(self, text: str) -> np.ndarray:
    """``text`` -> ids [num_tokens] (int32), no end-of-document id appended."""

  def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Many texts at once: (their ids one after another [sum of lengths], each text's length [len(texts)]
    int64), the same ids as ``encode`` of each. Tokenizers override it to encode a batch in one call (a
    token cache's workers encode millions of short documents; a Python call each was most of their time).
    The ids' dtype may be narrower than int32 (bytes: uint8)."""
    encoded = [np.asarray(self.encode(text), np.int32).reshape(-1) for text in texts]
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    return (np.concatenate(encoded) if encoded else np.zeros(0, np.int32)), lengths

  @abc.abstractmethod
  def decode(self, ids: Any) -> str:
    """Ids [num_tokens] -> text; ids with no text (see module docstring) are dropped."""

  @abc.abstractmethod
  def to_json(self) -> dict[str, Any]:
    """Small JSON-serialisable description, as written to ``tokenizer.json``."""

  def save(self, directory: str | os.PathLike) -> None:
    """Writes the tokenizer into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self._save_files(directory)
    # Written last: its presence means every file it refers to is complete.
    _atomic_write(directory / CONFIG_FILENAME, json.dumps(self.to_json(), indent=1).encode("utf-8"))

  def _save_files(self, directory: Path) -> None:
    """Writes files besides ``tokenizer.json``; most tokenizers have none."""

  def __repr__(self) -> str:
    return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
  """One id per character of a fixed vocabulary, plus ``<unk>`` as the last id.

  Characters outside the vocabulary encode to ``unk_id`` and decode to nothing.
  There is no end-of-document id: documents are joined with the text separator.
  """

  kind = "char"
  eos_id = None

  def __init__(self, chars: Iterable[str]):
    self.chars = list(chars)
    if not self.chars or any(len(char) != 1 for char in self.chars):
      raise TokenizerError("A char vocabulary must be a non-empty list of single characters.")
    if len(set(self.chars)) != len(self.chars):
      raise TokenizerError("A char vocabulary lists a character twice; each must appear once.")
    codepoints = _codepoints("".join(self.chars))
    # searchsorted needs sorted code points; _sorted_ids maps them back to vocabulary ids.
    self._sorted_ids = np.argsort(codepoints, kind="stable").astype(np.int32)
    self._sorted_codepoints = codepoints[self._sorted_ids]
    self._codepoints = codepoints
    self.unk_id = len(self.chars)
    self.vocab_size = len(self.chars) + 1

  @classmethod
  def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
    """Vocabulary: the sorted characters of ``texts`` (as nanoGPT's char baseline)."""
    seen = np.zeros(0, np.uint32)
    for text in texts:
      seen = np.union1d(seen, np.unique(_codepoints(text)))
    if not len(seen):
      raise TokenizerError("No characters to build a char vocabulary from. Fix: pass non-empty training texts.")
    return cls(seen.astype("<u4").tobytes().decode("utf-32-le", errors="surrogatepass"))

  def encode(self, text: str) -> np.ndarray:
    codepoints = _codepoints(text)
    positions = np.searchsorted(self._sorted_codepoints, codepoints)
    positions = np.minimum(positions, len(self._sorted_codepoints) - 1)
    known = self._sorted_codepoints[positions] == codepoints
    return np.where(known, self._sorted_ids[positions], self.unk_id).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    # One id per code point, so the joined text's ids split at the texts' lengths.
    return self.encode("".join(texts)), np.fromiter(map(len, texts), np.int64, len(texts))

  def decode(self, ids: Any) -> str:
    ids = _id_array(ids)
    ids = ids[(ids >= 0) & (ids < len(self.chars))]
    return self._codepoints[ids].astype("<u4").tobytes().decode("utf-32-le", errors="surrogatepass")

  def to_json(self) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "kind": self.kind, "vocab_size": self.vocab_size,
            "unk_id": self.unk_id, "eos_id": self.eos_id, "chars": self.chars}


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes 0..255, and 256 as the end-of-document id (vocab_size 257)."""

  kind = "byte"
  vocab_size = _NUM_BYTES + 1
  eos_id = _NUM_BYTES
  unk_id = None

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", errors="surrogatepass"), np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    # UTF-8 encodes each code point on its own (a lone surrogate too, with surrogatepass), so the joined
    # text's bytes are the texts' bytes one after another; ASCII text has one byte per character.
    joined = "".join(texts)
    data = joined.encode("utf-8", errors="surrogatepass")
    if len(data) == len(joined):
      lengths = np.fromiter(map(len, texts), np.int64, len(texts))
    else:
      lengths = np.fromiter((len(text.encode("utf-8", errors="surrogatepass")) for text in texts), np.int64,
                            len(texts))
    return np.frombuffer(data, np.uint8), lengths

  def decode(self, ids: Any) -> str:
    ids = _id_array(ids)
    # A sampled sequence may cut a character's bytes short; "replace" shows that as U+FFFD.
    return ids[(ids >= 0) & (ids < _NUM_BYTES)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def to_json(self) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "kind": self.kind, "vocab_size": self.vocab_size,
            "unk_id": self.unk_id, "eos_id": self.eos_id}


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model (``spm.model`` bytes), used as is."""

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes):
    self._model_proto = bytes(model_proto)
    self._processor = spm.SentencePieceProcessor(model_proto=self._model_proto)
    self.vocab_size = self._processor.get_piece_size()
    self.eos_id = self._processor.eos_id() if self._processor.eos_id() >= 0 else None
    self.unk_id = self._processor.unk_id() if self._processor.unk_id() >= 0 else None
    # Ids with no text of their own: unk and control pieces (eos, bos, pad).
    self._textless = np.array(
        [i for i in range(self.vocab_size) if self._processor.is_unknown(i) or self._processor.is_control(i)],
        np.int64)

  @property
  def model_proto(self) -> bytes:
    """The serialized SentencePiece model, as written to ``spm.model``."""
    return self._model_proto

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._processor.encode(text, out_type=int), np.int32).reshape(-1)

  def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    # One call into SentencePiece's C++ for the batch, on one thread (a token cache runs a worker per core).
    encoded = self._processor.encode(list(texts), out_type=int, num_threads=1)
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    return np.fromiter(itertools.chain.from_iterable(encoded), np.int32, int(lengths.sum())), lengths

  def decode(self, ids: Any) -> str:
    ids = _id_array(ids)
    ids = ids[(ids >= 0) & (ids < self.vocab_size) & ~np.isin(ids, self._textless)]
    return self._processor.decode(ids.tolist())

  def to_json(self) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "kind": self.kind, "vocab_size": self.vocab_size,
            "unk_id": self.unk_id, "eos_id": self.eos_id, "model_file": SENTENCEPIECE_FILENAME}

  def _save_files(self, directory: Path) -> None:
    _atomic_write(directory / SENTENCEPIECE_FILENAME, self._model_proto)

  # Worker processes (e.g. Grain's) receive the tokenizer by value: send the model bytes.
  def __getstate__(self) -> dict[str, Any]:
    return {"model_proto": self._model_proto}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["model_proto"])

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
    path = Path(path)
    if not path.is_file():
      raise TokenizerError(
          f"SentencePiece model file {path} does not exist. Fix: check the path, or leave "
          "model_file unset to train a model on the training split.")
    try:
      return cls(path.read_bytes())
    except (RuntimeError, OSError) as error:
      raise TokenizerError(
          f"{path} is not a valid SentencePiece model ({error}). Fix: point at a .model file "
          "written by SentencePiece, or retrain it.") from None

  @classmethod
  def train(cls, texts: Iterable[str], *, vocab_size: int, model_type: str = "unigram",
            max_training_chars: int = 10_000_000) -> SentencePieceTokenizer:
    """Trains a model on the lines of ``texts``; the same texts give the same model bytes.

    Training reads the first ``max_training_chars`` characters of non-blank lines, in
    order (no random sampling, so the result does not depend on a seed). Byte fallback
    (unseen characters -> UTF-8 byte pieces) is on whenever ``vocab_size`` has room for
    the 256 byte pieces and every character seen; otherwise unseen characters are unk.
    """
    lines = list(_training_lines(texts, max_training_chars))
    if not lines:
      raise TokenizerError("No text to train SentencePiece on. Fix: pass non-empty training texts.")
    num_chars = len(set().union(*map(set, lines)))
    byte_fallback = vocab_size >= _NUM_BYTES + num_chars + _SENTENCEPIECE_SPECIALS
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
          model_type=model_type, byte_fallback=byte_fallback, character_coverage=1.0,
          unk_id=_SENTENCEPIECE_UNK_ID, eos_id=_SENTENCEPIECE_EOS_ID, bos_id=-1, pad_id=-1,
          user_defined_symbols=["\n"],
          # Keep text exactly as written, so decode(encode(text)) == text.
          normalization_rule_name="identity", remove_extra_whitespaces=False,
          allow_whitespace_only_pieces=True, split_digits=True,
          # We cap the input ourselves, so SentencePiece's (seeded-by-clock) sampling stays off.
          input_sentence_size=0, shuffle_input_sentence=False,
          max_sentence_length=_SENTENCEPIECE_MAX_LINE_BYTES,
          num_threads=_SENTENCEPIECE_THREADS, train_extremely_large_corpus=False, minloglevel=2)
    except RuntimeError as error:
      message = str(error).strip().splitlines()[-1]
      raise TokenizerError(
          f"SentencePiece training failed: {message} Fix: choose a vocab_size that suits the "
          f"training text ({sum(map(len, lines))} characters, {num_chars} distinct).") from None
    return cls(model.getvalue())


class HFTokenizer(Tokenizer):
  """A Hugging Face ``tokenizers`` tokenizer (a model directory's ``tokenizer.json``), used as is.

  ``encode`` adds no special tokens (BOS is the model's business, EOS the
  pipeline's); special tokens and ``unk_id`` decode to nothing.
  """

  kind = "hf"

  def __init__(self, tokenizer_json: str, *, eos_id: int | None = None, unk_id: int | None = None):
    from tokenizers import Tokenizer as _HFTokenizer  # pylint: disable=g-import-not-at-top
    self._json = tokenizer_json
    try:
      self._tokenizer = _HFTokenizer.from_str(tokenizer_json)
    except Exception as error:  # tokenizers raises a bare Exception for malformed JSON
      raise TokenizerError(f"Not a Hugging Face tokenizer.json ({error}). Fix: copy the model's original "
                           "tokenizer.json.") from None
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    for name, value in (("eos_id", eos_id), ("unk_id", unk_id)):
      if value is not None and not 0 <= value < self.vocab_size:
        raise TokenizerError(f"{name}={value} is outside the tokenizer's {self.vocab_size} ids. Fix: check the "
                             "model's config.json / tokenizer_config.json.")
    self.eos_id, self.unk_id = eos_id, unk_id
    # Ids with no text of their own: unk and the special added tokens (bos, eos, pad, ...).
    special = [i for i, token in self._tokenizer.get_added_tokens_decoder().items() if token.special]
    self._textless = np.array(sorted(set(special) | ({unk_id} if unk_id is not None else set())), np.int64)

  def __getstate__(self) -> dict[str, Any]:  # picklable (Beam workers encode with it)
    return {"tokenizer_json": self._json, "eos_id": self.eos_id, "unk_id": self.unk_id}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["tokenizer_json"], eos_id=state["eos_id"], unk_id=state["unk_id"])

  @property
  def tokenizer_json(self) -> str:
    """The serialized tokenizer, as written to ``hf_tokenizer.json``."""
    return self._json

  def token_to_id(self, token: str) -> int | None:
    """The id of one token's text (e.g. "</s>"), None if it is not in the vocabulary."""
    return self._tokenizer.token_to_id(token)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32).reshape(-1)

  def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    return np.fromiter(itertools.chain.from_iterable(encoded), np.int32, int(lengths.sum())), lengths

  def decode(self, ids: Any) -> str:
    ids = _id_array(ids)
    ids = ids[(ids >= 0) & (ids < self.vocab_size) & ~np.isin(ids, self._textless)]
    return self._tokenizer.decode(ids.tolist(), skip_special_tokens=False)

  def to_json(self) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "kind": self.kind, "vocab_size": self.vocab_size,
            "unk_id": self.unk_id, "eos_id": self.eos_id, "model_file": HF_TOKENIZER_FILENAME}

  def _save_files(self, directory: Path) -> None:
    _atomic_write(directory / HF_TOKENIZER_FILENAME, self._json.encode("utf-8"))

  # Worker processes (e.g. Grain's) receive the tokenizer by value: send the JSON.
  def __getstate__(self) -> dict[str, Any]:
    return {"tokenizer_json": self._json, "eos_id": self.eos_id, "unk_id": self.unk_id}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["tokenizer_json"], eos_id=state["eos_id"], unk_id=state["unk_id"])

  @classmethod
  def from_file(cls, path: str | os.PathLike, *, eos_id: int | None = None,
                unk_id: int | None = None) -> HFTokenizer:
    path = Path(path)
    if not path.is_file():
      raise TokenizerError(f"Hugging Face tokenizer file {path} does not exist. Fix: copy the model's "
                           "tokenizer.json there, or rebuild the tokenizer folder.")
    try:
      return cls(path.read_text(encoding="utf-8"), eos_id=eos_id, unk_id=unk_id)
    except UnicodeDecodeError as error:
      raise TokenizerError(f"{path} is not UTF-8 text ({error}). Fix: copy the model's original "
                           "tokenizer.json.") from None
    except TokenizerError as error:
      raise TokenizerError(f"{path}: {error}") from None


def _training_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """Non-blank lines of ``texts``, stopping once ``max_chars`` characters are reached."""
  total = 0
  for text in texts:
    for line in text.split("\n"):
      if not line.strip():
        continue
      yield line
      total += len(line)
      if total >= max_chars:
        return


def _atomic_write(path: Path, data: bytes) -> None:
  """Writes via a temporary file, so a reader never sees a half-written file."""
  temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
  temporary.write_bytes(data)
  os.replace(temporary, path)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
  """Reads a tokenizer written by ``Tokenizer.save``.

  Raises:
    TokenizerError: ``tokenizer.json`` or the model file is missing or corrupt.
  """
  config_path = Path(directory) / CONFIG_FILENAME
  if not config_path.is_file():
    raise TokenizerError(
        f"No tokenizer at {config_path}. Fix: point at a directory written by Tokenizer.save "
        "(a training workdir holds one), or build a tokenizer first.")
  try:
    config = json.loads(config_path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise TokenizerError(
        f"{config_path} is corrupt ({error}). Fix: delete it and rebuild the tokenizer.") from None
  if not isinstance(config, dict) or config.get("format") != FORMAT_VERSION or config.get("kind") not in KINDS:
    raise TokenizerError(
        f"{config_path} is not a tokenizer this code reads (need format {FORMAT_VERSION} and kind in "
        f"{KINDS}). Fix: rebuild the tokenizer with this version of lm.")
  kind = config["kind"]
  try:
    if kind == "char":
      tokenizer: Tokenizer = CharTokenizer(config["chars"])
    elif kind == "byte":
      tokenizer = ByteTokenizer()
    elif kind == "hf":
      tokenizer = HFTokenizer.from_file(config_path.parent / config.get("model_file", HF_TOKENIZER_FILENAME),
                                        eos_id=config.get("eos_id"), unk_id=config.get("unk_id"))
    else:
      model_path = config_path.parent / config.get("model_file", SENTENCEPIECE_FILENAME)
      tokenizer = SentencePieceTokenizer.from_file(model_path)
  except (KeyError, TypeError) as error:
    raise TokenizerError(f"{config_path} is missing {error} for a {kind} tokenizer. Fix: rebuild it.") from None
  if config.get("vocab_size") != tokenizer.vocab_size:
    raise TokenizerError(
        f"{config_path} says vocab_size {config.get('vocab_size')} but its vocabulary has "
        f"{tokenizer.vocab_size}. Fix: the files were mixed up; rebuild the tokenizer.")
  return tokenizer


def identity(tokenizer: Tokenizer) -> dict[str, Any]:
  """What makes two tokenizers the same: their description and, for SentencePiece and Hugging Face
  tokenizers, a hash of the model."""
  described = dict(tokenizer.to_json())
  if isinstance(tokenizer, SentencePieceTokenizer):
    described["model_sha256"] = hashlib.sha256(tokenizer.model_proto).hexdigest()
  if isinstance(tokenizer, HFTokenizer):
    described["model_sha256"] = hashlib.sha256(tokenizer.tokenizer_json.encode("utf-8")).hexdigest()
  return described


def build_tokenizer(
    kind: str,
    texts: Iterable[str] | None,
    *,
    vocab_size: int | None = None,
    model_file: str | None = None,
    workdir_dir: str | None = None,
    sentencepiece_model_type: str = "unigram",
    max_sentencepiece_training_chars: int = 10_000_000,
) -> Tokenizer:
  """Builds the tokenizer ``kind`` from the training texts, or reuses the workdir's.

  Args:
    kind: "char", "byte" or "sentencepiece".
    texts: the training split's documents (not needed for "byte", for a given
      ``model_file``, or when ``workdir_dir`` already holds a tokenizer).
    vocab_size: SentencePiece vocabulary size to train; char and byte derive theirs.
    model_file: an existing SentencePiece model to use instead of training one.
    workdir_dir: where the run keeps its tokenizer. If it already holds one it is
      loaded (a resumed run must keep its ids); otherwise the new one is saved there.
    sentencepiece_model_type: "unigram", "bpe", "char" or "word".
    max_sentencepiece_training_chars: SentencePiece trains on at most this many characters.
  Raises:
    TokenizerError: unknown kind, missing inputs, or a workdir tokenizer of another kind.
  """
  if kind not in BUILDABLE_KINDS:
    raise TokenizerError(f"Unknown tokenizer kind {kind!r}. Fix: use one of {BUILDABLE_KINDS}.")
  if workdir_dir is not None and (Path(workdir_dir) / CONFIG_FILENAME).is_file():
    tokenizer = load_tokenizer(workdir_dir)
    if tokenizer.kind != kind or (kind == "sentencepiece" and model_file is None
                                  and vocab_size not in (None, tokenizer.vocab_size)):
      raise TokenizerError(
          f"{workdir_dir} already holds a {tokenizer.kind} tokenizer (vocab_size {tokenizer.vocab_size}), "
          f"but a {kind} tokenizer{f' of vocab_size {vocab_size}' if vocab_size else ''} was asked for. "
          "Fix: use a new workdir, or match the tokenizer settings of the run in it.")
    return tokenizer
  if kind == "byte":
    tokenizer = ByteTokenizer()
  elif kind == "sentencepiece" and model_file is not None:
    tokenizer = SentencePieceTokenizer.from_file(model_file)
  elif texts is None:
    raise TokenizerError(f"A {kind} tokenizer is built from the training texts, but none were given. "
                         "Fix: pass the training split's documents.")
  elif kind == "char":
    tokenizer = CharTokenizer.from_texts(texts)
  elif vocab_size is None:
    raise TokenizerError("Training a SentencePiece tokenizer needs vocab_size. Fix: set vocab_size "
                         "(e.g. 8000), or pass model_file= to use an existing model.")
  else:
    tokenizer = SentencePieceTokenizer.train(texts, vocab_size=vocab_size, model_type=sentencepiece_model_type,
                                             max_training_chars=max_sentencepiece_training_chars)
  if workdir_dir is not None:
    tokenizer.save(workdir_dir)
  return tokenizer
