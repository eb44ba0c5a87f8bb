"""Labeled sentences for a classifier (`config.head = "classifier"`): one record -> one example with its class.

  inputs = BOS s_1 ... s_n EOS PAD ...   [seq_len] int32 (sentence vocabulary: lm.data.sentences)
  mask   = 1   1  ...  1   1   0   ...   [seq_len] the positions pooled over
  label  = the class id                   [] int32 (class order: `classes`)
  index  = the record's position in the split

A sentence keeps at most seq_len - 2 tokens (longer ones are cropped and
counted). Classes are label strings as written in the data ("0", "1" for
SST-2): `config.classifier.labels`, or the training split's distinct labels,
sorted (numerically when all are integers). A row whose label is not a class
is refused with the file and line it came from.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from lm.data import sources
from lm.core.errors import DataError
from lm.data.sentences import SentenceVocab
from lm.data.tokenizers import Tokenizer

KEYS = ("inputs", "mask", "label", "index")
BATCH_RANKS = {"inputs": 2, "mask": 2, "label": 1, "index": 1}


def encode(vocab: SentenceVocab, seq_len: int, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, mask) [seq_len] int32 of a sentence's tokens (at most seq_len - 2 of them are kept)."""
  tokens = np.asarray(tokens, np.int32)[:seq_len - 2]
  n = len(tokens)
  inputs = np.full(seq_len, vocab.pad, np.int32)
  inputs[0], inputs[1:n + 1], inputs[n + 1] = vocab.bos, tokens, vocab.eos
  mask = np.zeros(seq_len, np.int32)
  mask[:n + 2] = 1
  return inputs, mask


def _sort_key(label: str) -> tuple[int, Any]:
  try:
    return 0, int(label)
  except ValueError:
    return 1, label


def derive_classes(labels: Sequence[str]) -> list[str]:
  """The distinct labels, sorted: numerically when they are all integers, else as strings."""
  distinct = set(labels)
  if all(_sort_key(label)[0] == 0 for label in distinct):
    return sorted(distinct, key=lambda label: int(label))
  return sorted(distinct)


class Subset:
  """Some documents of a LabeledSource (cross-validation folds), in the order of `indices`."""

  def __init__(self, source: sources.LabeledSource, indices: Sequence[int], name: str):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.name = name

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> str:
    return self.source[int(self.indices[index])]

  def __iter__(self):
    for start in range(0, len(self), 1024):
      yield from self.source.__getitems__(self.indices[start:start + 1024])

  def labels(self) -> list[str]:
    labels = self.source.labels()
    return [labels[i] for i in self.indices]

  def where(self, index: int) -> str:
    return self.source.where(int(self.indices[index]))


class LabeledSentences:
  """Random-access classifier examples of one split (module docstring); tokenized once, up front."""

  def __init__(self, source: sources.LabeledSource | Subset, tokenizer: Tokenizer, seq_len: int,
               classes: Sequence[str]):
    if seq_len < 3:
      raise DataError(f"seq_len={seq_len} leaves no room for a sentence between BOS and EOS; set seq_len >= 3.")
    self.name = getattr(source, "name", "labeled")
    self.vocab = SentenceVocab.for_tokenizer(tokenizer)
    self.seq_len = seq_len
    self.classes = list(classes)
    class_ids = {label: i for i, label in enumerate(self.classes)}
    labels = source.labels()
    ids, self.labels, self.cropped, self.empty = [], [], 0, 0
    for position, (text, label) in enumerate(zip(source, labels)):
      if label not in class_ids:
        raise DataError(
            f"{source.where(position)} ({self.name}) has label {label!r}, which is not one of the classes "
            f"{self.classes}. Fix: correct the label, or list every class in config.classifier.labels "
            "(the classes are otherwise the training split's labels).")
      tokens = np.asarray(tokenizer.encode(text), np.int32)
      if len(tokens) == 0:
        self.empty += 1  # kept: the classifier must still answer for it (from BOS/EOS alone)
      if len(tokens) > seq_len - 2:
        self.cropped += 1
        tokens = tokens[:seq_len - 2]
      ids.append(tokens)
      self.labels.append(class_ids[label])
    if not ids:
      raise DataError(f"{self.name} has no examples; point data.source at a labeled .tsv/.jsonl corpus.")
    self.labels = np.asarray(self.labels, np.int32)
    self._lengths = np.asarray([len(x) for x in ids], np.int64)
    self._ids = np.concatenate(ids) if self._lengths.sum() else np.zeros(0, np.int32)
    self._offsets = np.concatenate([[0], np.cumsum(self._lengths)])

  def __len__(self) -> int:
    return len(self.labels)

  def chars_per_token(self, tokenizer: Tokenizer) -> float:  # pylint: disable=unused-argument
    return 1.0  # not a language-modelling figure here

  def empty_example(self, index: int) -> dict[str, np.ndarray]:
    """A row with nothing to classify (mask all 0), to fill the last evaluation batch (PaddedToBatches)."""
    pad = np.full(self.seq_len, self.vocab.pad, np.int32)
    return {"inputs": pad, "mask": np.zeros_like(pad), "label": np.asarray(0, np.int32),
            "index": np.asarray(index, np.int32)}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    inputs, mask = encode(self.vocab, self.seq_len, self._ids[self._offsets[index]:self._offsets[index + 1]])
    return {"inputs": inputs, "mask": mask, "label": np.asarray(self.labels[index], np.int32),
            "index": np.asarray(index, np.int32)}
