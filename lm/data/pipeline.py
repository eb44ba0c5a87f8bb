"""Grain input pipeline: documents -> tokens -> fixed-length windows -> batches.

The training order is a pure function of (seed, step): window `i` of the
shuffled, repeated stream is the same on every run, and process `p` of `P`
reads the windows `p, p + P, p + 2P, ...` of it, so global batch `s` holds the
windows `s*B ... s*B + B - 1` whatever the number of processes. Resuming is
setting the iterator's index; nothing is replayed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import grain
import jax
import numpy as np

from lm.data import sources
from lm.data.tokenizers import Tokenizer


def tokenize_split(source: sources.TextSource, tokenizer: Tokenizer) -> np.ndarray:
  """Tokenizes every document of a split into one token stream [num_tokens] (int32).

  Documents are separated by the tokenizer's end-of-document id, or, for
  tokenizers without one (characters), by the encoded paragraph separator, so
  a corpus split into paragraphs is restored as the original text.
  """
  if tokenizer.eos_id is not None:
    separator = np.array([tokenizer.eos_id], np.int32)
  else:
    separator = tokenizer.encode(sources.PARAGRAPH_SEPARATOR).astype(np.int32)
  pieces = []
  # Iterating the source reads records in batches (~50 us per document); random
  # access through a Grain map costs ~15x more per document on large corpora.
  for index, ids in enumerate(map(tokenizer.encode, source)):
    if index and len(separator):
      pieces.append(separator)
    pieces.append(np.asarray(ids, np.int32))
  if tokenizer.eos_id is not None and pieces:
    pieces.append(separator)
  if not pieces:
    raise sources.DataError(f"{source.name} has no documents; point data.source at a non-empty corpus.")
  return np.concatenate(pieces)


class Windows:
  """Random-access windows of `seq_len + 1` tokens over a token stream.

  Window `i` starts at `i * stride`. Training uses stride 1 (every offset, as
  nanoGPT samples), evaluation uses stride `seq_len` (each target once).
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, stride: int, name: str = "tokens"):
    if len(tokens) < seq_len + 1:
      raise sources.DataError(
          f"{name} has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
          "use a larger corpus or a smaller seq_len.")
    self.tokens = tokens
    self.seq_len = seq_len
    self.stride = stride
    self._count = (len(tokens) - seq_len - 1) // stride + 1
    self._chars_per_token: float | None = None  # computed once: evaluation asks on every eval

  def __len__(self) -> int:
    return self._count

  def chars_per_token(self, tokenizer: Tokenizer) -> float:
    """Characters per token of the stream (1 for character tokenizers), for bits per character."""
    if self._chars_per_token is None:
      chars = len(self.tokens) if tokenizer.kind == "char" else len(tokenizer.decode(self.tokens))
      self._chars_per_token = max(chars, 1) / len(self.tokens)
    return self._chars_per_token

  def __getitem__(self, index: int) -> np.ndarray:
    start = int(index) * self.stride
    return self.tokens[start:start + self.seq_len + 1]


def _split_inputs_targets(windows: np.ndarray) -> dict[str, np.ndarray]:
  """[batch, seq_len + 1] -> {'inputs': [batch, seq_len], 'targets': [batch, seq_len]}."""
  return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


@dataclasses.dataclass(frozen=True)
class ProcessSlice:
  """Which rows of every global batch this process reads."""

  index: int
  count: int

  @classmethod
  def current(cls) -> ProcessSlice:
    return cls(jax.process_index(), jax.process_count())


def train_dataset(
    windows: Windows, *, seed: int, global_batch_size: int, process: ProcessSlice | None = None
) -> grain.MapDataset:
  """Infinite map dataset: element `s` is this process's part of global batch `s`.

  Returns dicts of int32 arrays [global_batch_size / process count, seq_len].
  """
  process = process or ProcessSlice.current()
  if global_batch_size % process.count:
    raise ValueError(
        f"batch_size={global_batch_size} is not divisible by the {process.count} processes; "
        "set batch_size to a multiple of the process count.")
  local_batch = global_batch_size // process.count
  dataset = grain.MapDataset.source(windows).shuffle(seed=seed).repeat(None)
  dataset = dataset[process.index::process.count]
  return dataset.batch(local_batch, drop_remainder=True).map(_split_inputs_targets)


def eval_dataset(
    windows: Windows, *, global_batch_size: int, num_batches: int | None = None,
    process: ProcessSlice | None = None,
) -> grain.MapDataset:
  """Finite map dataset over non-overlapping windows, in corpus order.

  The final partial batch is dropped (at most `global_batch_size - 1` windows)
  so every process runs the same number of steps.
  """
  process = process or ProcessSlice.current()
  local_batch = global_batch_size // process.count
  dataset = grain.MapDataset.source(windows)[process.index::process.count]
  dataset = dataset.batch(local_batch, drop_remainder=True).map(_split_inputs_targets)
  if num_batches is not None:
    dataset = dataset[:num_batches]
  return dataset


class BatchIterator:
  """Checkpointable iterator of global `jax.Array` batches.

  Wraps a Grain iterator (with background prefetch) and assembles each
  process's rows into global arrays sharded as `sharding`.
  """

  def __init__(self, dataset: grain.MapDataset, sharding: jax.sharding.Sharding, *,
               global_batch_size: int, prefetch: int = 4, threads: int = 1):
    self._dataset = dataset
    self._sharding = sharding
    self._global_batch_size = global_batch_size
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    self._iterator = iter(dataset.to_iter_dataset(options))

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    local = next(self._iterator)
    return {key: to_global(value, self._sharding, self._global_batch_size) for key, value in local.items()}

  def get_state(self) -> dict[str, Any]:
    return self._iterator.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._iterator.set_state(state)


def to_global(local: np.ndarray, sharding: jax.sharding.Sharding, global_batch_size: int) -> jax.Array:
  """This process's rows [local_batch, ...] -> a global array [global_batch, ...]."""
  global_shape = (global_batch_size,) + tuple(local.shape[1:])
  return jax.make_array_from_process_local_data(sharding, np.asarray(local), global_shape)
