"""`data.source="synthetic"`: uniform random token ids, for throughput runs that should not wait on data.

Each split is a fixed stream of `data.synthetic_tokens` ids drawn uniformly
from [0, data.synthetic_vocab_size) by a generator seeded with the run's seed
and the split's name, so two runs (and every process of one run) see the same
tokens, and the usual windows, shuffling and checkpointable iterator apply
unchanged. A model can learn nothing from them beyond the unigram
distribution: the loss settles at ln(vocab) (10.83 for GPT-2's 50,257 ids).

The tokenizer of such a run is the byte tokenizer (samples decode ids 0-255
as bytes and drop the rest); the model's vocabulary is the synthetic one.
"""

from __future__ import annotations

import zlib

import numpy as np

SOURCE = "synthetic"


class SyntheticSource:
  """One split of random tokens. `tokens` is the whole stream [num_tokens] int32."""

  def __init__(self, split: str, *, vocab_size: int, num_tokens: int, seed: int):
    if vocab_size < 1 or num_tokens < 2:
      raise ValueError(f"synthetic data needs vocab_size >= 1 and num_tokens >= 2 (got {vocab_size}, {num_tokens}).")
    self.split = split
    self.name = f"{SOURCE}:{split}"
    self.vocab_size = vocab_size
    self.num_tokens = num_tokens
    self.seed = seed
    self._tokens: np.ndarray | None = None

  @property
  def tokens(self) -> np.ndarray:
    if self._tokens is None:
      # The split's name enters the seed through a stable hash (Python's hash() is salted per process).
      rng = np.random.default_rng([self.seed, zlib.crc32(self.split.encode("utf-8"))])
      self._tokens = rng.integers(0, self.vocab_size, self.num_tokens, dtype=np.int32)
    return self._tokens

  def __len__(self) -> int:
    return 1  # one document: the stream

  def __iter__(self):
    raise TypeError(f"{self.name} holds token ids, not text; read SyntheticSource.tokens.")
