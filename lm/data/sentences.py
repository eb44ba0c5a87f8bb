"""Sentence examples (`config.data.format = "sentences"`): one record -> one padded example.

A sentence VAE encodes and generates whole sentences, and a GAN's
discriminator judges them, so their data is not a token stream cut into
windows but one example per record (a line of a .txt corpus, the text field
of a .jsonl row, the text column of a .tsv: SST-2's `sentence`):

  inputs  = BOS s_1 ... s_n  PAD ...     (what the decoder reads)
  targets = s_1 ... s_n EOS  PAD ...     (what it predicts; also what the VAE's encoder reads)
  mask    = 1   ...  1   1   0   ...     (targets that count)
  index   = the record's position in the split (per-example randomness in evaluation)

each [seq_len] int32, so a sentence keeps at most seq_len - 1 tokens (longer
ones are cropped, their EOS included, and counted). The four special ids
come after the tokenizer's (`SentenceVocab`): PAD, BOS, EOS and MASK (the
token word dropout puts in place of a decoder input). They decode to nothing.

A plain LM trained on the same examples (`head = "lm"`) predicts the same
targets, so its per-sentence NLL is directly comparable with a VAE's bound.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lm.data import sources
from lm.data.tokenizers import Tokenizer

NUM_SPECIALS = 4
KEYS = ("inputs", "targets", "mask", "index")


@dataclasses.dataclass(frozen=True)
class SentenceVocab:
  """The tokenizer's ids [0, base) followed by PAD, BOS, EOS and MASK."""

  base: int  # the tokenizer's vocab_size

  @property
  def pad(self) -> int:
    return self.base

  @property
  def bos(self) -> int:
    return self.base + 1

  @property
  def eos(self) -> int:
    return self.base + 2

  @property
  def mask(self) -> int:
    return self.base + 3

  @property
  def size(self) -> int:
    return self.base + NUM_SPECIALS

  @classmethod
  def for_tokenizer(cls, tokenizer: Tokenizer) -> SentenceVocab:
    return cls(tokenizer.vocab_size)

  def sentence_ids(self, ids: Any) -> np.ndarray:
    """Generated ids -> the sentence's ids: up to the first EOS (or PAD), specials dropped."""
    ids = np.asarray(ids).reshape(-1)
    stops = np.nonzero((ids == self.eos) | (ids == self.pad))[0]
    if len(stops):
      ids = ids[:stops[0]]
    return ids[(ids >= 0) & (ids < self.base)]

  def decode(self, tokenizer: Tokenizer, ids: Any) -> str:
    return tokenizer.decode(self.sentence_ids(ids))


class Sentences:
  """Random-access sentence examples of one split (see the module docstring).

  Every record is tokenized once, up front, into one flat array with offsets.
  Empty records (nothing left after tokenization) are skipped and counted.
  """

  def __init__(self, source: sources.TextSource | list[str], tokenizer: Tokenizer, seq_len: int, *,
               name: str | None = None):
    if seq_len < 2:
      raise sources.DataError(f"seq_len={seq_len} leaves no room for a sentence: BOS/EOS take one position; "
                              "set seq_len >= 2 (e.g. 64 for SST-2).")
    self.name = name or getattr(source, "name", "sentences")
    self.vocab = SentenceVocab.for_tokenizer(tokenizer)
    self.seq_len = seq_len
    pieces, lengths = [], []
    self.empty = self.cropped = 0
    chars = 0
    for text in source:
      ids = np.asarray(tokenizer.encode(text), np.int32)
      if len(ids) == 0:
        self.empty += 1
        continue
      if len(ids) > seq_len - 1:
        self.cropped += 1
        ids = ids[:seq_len - 1]
        chars += len(tokenizer.decode(ids))  # the characters of what is kept
      else:
        chars += len(text)
      pieces.append(ids)
      lengths.append(len(ids))
    if not pieces:
      raise sources.DataError(f"{self.name} has no sentences (after tokenization); point data.source at a corpus "
                              "with one sentence per record (data.format=sentences).")
    self._ids = np.concatenate(pieces)
    self.lengths = np.asarray(lengths, np.int32)
    self._offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
    # Targets per sentence = its tokens + EOS; a character per target for bits per character (EOS ~ the newline).
    self._chars_per_token = (chars + len(lengths)) / float(self.lengths.sum() + len(lengths))

  def __len__(self) -> int:
    return len(self.lengths)

  @property
  def num_targets(self) -> int:
    """Target tokens of the whole split (sentence tokens + one EOS each)."""
    return int(self.lengths.sum()) + len(self)

  def chars_per_token(self, tokenizer: Tokenizer) -> float:  # pylint: disable=unused-argument
    return self._chars_per_token

  def tokens(self, index: int) -> np.ndarray:
    """The (cropped) token ids of sentence `index`, without specials."""
    return self._ids[self._offsets[index]:self._offsets[index + 1]]

  def empty_example(self, index: int) -> dict[str, np.ndarray]:
    """A row with nothing to predict (mask all 0), to fill the last evaluation batch."""
    return empty_example(self.vocab, self.seq_len, index)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    return encode_example(self.vocab, self.seq_len, self.tokens(index), index)


class PaddedToBatches:
  """A `Sentences` split (or any examples with `empty_example`) lengthened with empty rows to a multiple of
  `batch_size`, so evaluation sees every sentence."""

  def __init__(self, sentences: Any, batch_size: int):
    self.sentences = sentences
    self.name = sentences.name
    self._length = -(-len(sentences) // batch_size) * batch_size

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if index < len(self.sentences):
      return self.sentences[index]
    return self.sentences.empty_example(index)

  def chars_per_token(self, tokenizer: Tokenizer) -> float:
    return self.sentences.chars_per_token(tokenizer)


def encode_example(vocab: SentenceVocab, seq_len: int, ids: np.ndarray, index: int) -> dict[str, np.ndarray]:
  """One padded example from a sentence's ids (at most seq_len - 1 of them)."""
  n = len(ids)
  if n > seq_len - 1:
    raise ValueError(f"{n} tokens do not fit seq_len={seq_len} with BOS/EOS; crop them to seq_len - 1.")
  inputs = np.full(seq_len, vocab.pad, np.int32)
  targets = np.full(seq_len, vocab.pad, np.int32)
  mask = np.zeros(seq_len, np.int32)
  inputs[0] = vocab.bos
  inputs[1:n + 1] = ids
  targets[:n] = ids
  targets[n] = vocab.eos
  mask[:n + 1] = 1
  return {"inputs": inputs, "targets": targets, "mask": mask, "index": np.asarray(index, np.int32)}


def empty_example(vocab: SentenceVocab, seq_len: int, index: int) -> dict[str, np.ndarray]:
  """A row with nothing to predict (mask all 0)."""
  pad = np.full(seq_len, vocab.pad, np.int32)
  return {"inputs": pad, "targets": pad.copy(), "mask": np.zeros(seq_len, np.int32),
          "index": np.asarray(index, np.int32)}


def examples_for_texts(tokenizer: Tokenizer, seq_len: int, texts: list[str]) -> dict[str, np.ndarray]:
  """Examples for given texts (notebooks, --mode sample), stacked: each key [len(texts), seq_len]."""
  vocab = SentenceVocab.for_tokenizer(tokenizer)
  rows = []
  for i, text in enumerate(texts):
    ids = np.asarray(tokenizer.encode(text), np.int32)[:seq_len - 1]
    if len(ids) == 0:
      raise sources.DataError(f"The sentence {text!r} encodes to no tokens; give at least one word.")
    rows.append(encode_example(vocab, seq_len, ids, i))
  return {key: np.stack([row[key] for row in rows]) for key in KEYS}
