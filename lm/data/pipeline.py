"""Grain input pipeline: documents -> tokens -> fixed-length windows -> batches.

The training order is a pure function of (seed, step): window `i` of the
shuffled, repeated stream is the same on every run, and global batch `s` is
the windows `s*B ... s*B + B - 1`, in that order, whatever the number of
processes. Each process reads only the rows of every global batch that its
own devices hold (`ProcessRows`, from the batch sharding), so the assembled
global array is the same as a single process would build. Resuming is setting
the iterator's index (= the global step); nothing is replayed, and a run may
resume with another process count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np

from lm.data import corpus, prepare, sources, synthetic, token_cache
from lm.data.tokenizers import Tokenizer


def tokenize_split(source: sources.TextSource, tokenizer: Tokenizer) -> np.ndarray:
  """Tokenizes every document of a split in memory into one token stream [num_tokens] (int32).

  Documents are separated by the tokenizer's end-of-document id, or, for
  tokenizers without one (characters), by the encoded paragraph separator, so
  a corpus split into paragraphs is restored as the original text. (Training
  splits go through a token cache instead: `lm.data.prepare.token_stream`.)
  """
  if isinstance(source, synthetic.SyntheticSource):
    return source.tokens  # already token ids
  stream = prepare.tokenize_documents(source, tokenizer, name=getattr(source, "name", "documents"))
  return stream[0:len(stream)]


class Windows:
  """Random-access windows of `seq_len + 1` tokens over a token stream.

  Window `i` starts at `i * stride`. Training uses stride 1 (every offset, as
  nanoGPT samples), evaluation uses stride `seq_len` (each target once).
  `tokens` is a `lm.data.token_cache.TokenStream` (a prepared cache, memory-
  mapped; or documents tokenized in memory) or an int array. With
  `document_mask`, a window also carries the document of each of its tokens,
  from which `_split_inputs_targets` makes the batch's mask, segment ids and
  positions.
  """

  def __init__(self, tokens: token_cache.TokenStream | np.ndarray, seq_len: int, stride: int, name: str = "tokens",
               document_mask: bool = False):
    if len(tokens) < seq_len + 1:
      raise sources.DataError(
          f"{name} has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
          "use a larger corpus or a smaller seq_len.")
    if document_mask and not isinstance(tokens, token_cache.TokenStream):
      tokens = token_cache.TokenStream.in_memory(tokens, np.zeros(1, np.int64), name=name, num_chars=len(tokens))
    self.tokens = tokens
    self.seq_len = seq_len
    self.stride = stride
    self.document_mask = document_mask
    self._count = (len(tokens) - seq_len - 1) // stride + 1
    self._chars_per_token: float | None = None  # computed once: evaluation asks on every eval

  def __len__(self) -> int:
    return self._count

  def chars_per_token(self, tokenizer: Tokenizer) -> float:
    """Characters per token of the stream (1 for character tokenizers), for bits per character."""
    if self._chars_per_token is None:
      if isinstance(self.tokens, token_cache.TokenStream):
        self._chars_per_token = self.tokens.chars_per_token
      else:
        tokens = np.asarray(self.tokens)
        chars = len(tokens) if tokenizer.kind == "char" else len(tokenizer.decode(tokens))
        self._chars_per_token = max(chars, 1) / len(tokens)
    return self._chars_per_token

  def __getitem__(self, index: int) -> np.ndarray | dict[str, np.ndarray]:
    start = int(index) * self.stride
    window = self.tokens[start:start + self.seq_len + 1]
    if not self.document_mask:
      return window
    return {"window": window, "documents": self.tokens.document_ids(start, start + self.seq_len + 1)}


def _split_inputs_targets(windows: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """[batch, seq_len + 1] -> {'inputs': [batch, seq_len], 'targets': [batch, seq_len]}.

  Document-masked windows also give (all [batch, seq_len] int32) 'mask' (0
  where the target starts another document than its input's: not predicted),
  'segment_ids' (each input's document, counted from 0 in the row) and
  'positions' (each input's place in its document, from 0 at the document's
  start or the row's).
  """
  if not isinstance(windows, dict):
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
  tokens, documents = windows["window"], windows["documents"]
  length = tokens.shape[1] - 1
  inputs_documents = documents[:, :-1]
  starts = np.ones(inputs_documents.shape, bool)
  starts[:, 1:] = inputs_documents[:, 1:] != inputs_documents[:, :-1]
  index = np.arange(length)
  last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "mask": (documents[:, 1:] == inputs_documents).astype(np.int32),
      "segment_ids": (inputs_documents - inputs_documents[:, :1]).astype(np.int32),
      "positions": (index - last_start).astype(np.int32),
  }


def window_examples(source: Any, tokenizer: Tokenizer, seq_len: int, stride: int, *,
                    options: prepare.PrepareOptions | None = None, document_mask: bool = False) -> Any:
  """A split's windows: its token cache's stream (a `lm.data.corpus.Split`, prepared if it must be), documents
  tokenized in memory (lists, cleaned splits, folds), or synthetic ids; a mixture's, per source."""
  if isinstance(source, corpus.Mixture):
    return MixedExamples([(name, window_examples(part, tokenizer, seq_len, stride, options=options,
                                                 document_mask=document_mask), weight)
                          for name, part, weight in source.parts])
  name = getattr(source, "name", "documents")
  if isinstance(source, synthetic.SyntheticSource):
    tokens: Any = source.tokens
  else:
    tokens = prepare.token_stream(source, tokenizer, options)
  return Windows(tokens, seq_len, stride, name=name, document_mask=document_mask)


class MixedExamples:
  """Training examples of several sources drawn in given proportions (data.mixture)."""

  def __init__(self, parts: Sequence[tuple[str, Any, float]]):
    self.parts = list(parts)  # (name, examples, weight)

  @property
  def names(self) -> list[str]:
    return [name for name, _, _ in self.parts]

  def __len__(self) -> int:
    return sum(len(examples) for _, examples, _ in self.parts)


@dataclasses.dataclass(frozen=True)
class ProcessRows:
  """The rows `[start, stop)` of every global batch that this process reads.

  With the mesh's devices ordered by process (as `jax.devices()` is), a
  process's devices hold one contiguous block of the batch; processes whose
  devices hold the same rows (the batch replicated over a `tensor` axis that
  spans processes) read the same block.
  """

  start: int
  stop: int
  global_batch_size: int

  @property
  def size(self) -> int:
    return self.stop - self.start

  @classmethod
  def everything(cls, global_batch_size: int) -> ProcessRows:
    return cls(0, global_batch_size, global_batch_size)

  @classmethod
  def for_sharding(cls, sharding: jax.sharding.Sharding, global_batch_size: int) -> ProcessRows:
    """The block of rows of a [global_batch_size, ...] batch that this process's devices hold."""
    ranges = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size, 1)).values():
      start, stop, _ = index[0].indices(global_batch_size)
      ranges.add((start, stop))
    start, stop = min(r[0] for r in ranges), max(r[1] for r in ranges)
    covered = sum(b - a for a, b in sorted(ranges))
    size = stop - start
    if covered != size or global_batch_size % size or start % size:
      raise ValueError(
          f"process {jax.process_index()} holds rows {sorted(ranges)} of the batch of {global_batch_size}, not "
          "one aligned block: the mesh places other processes' devices between its own. Order the mesh's "
          "devices by process (the default of lm.train.sharding.make_mesh).")
    return cls(start, stop, global_batch_size)


def _rows(rows: ProcessRows | None, global_batch_size: int) -> ProcessRows:
  if rows is None:
    if jax.process_count() > 1:
      raise ValueError("With several processes, pass rows=ProcessRows.for_sharding(batch_sharding, batch_size) "
                       "so each process reads the rows its devices hold.")
    return ProcessRows.everything(global_batch_size)
  if rows.global_batch_size != global_batch_size:
    raise ValueError(f"rows were computed for a batch of {rows.global_batch_size}, not {global_batch_size}.")
  return rows


def _local_batches(dataset: grain.MapDataset, rows: ProcessRows, windows: bool) -> grain.MapDataset:
  """Element `s` -> this process's rows of global batch `s` (Grain sharding by process)."""
  # Batching by the block size first means a process fetches only its own windows.
  blocks_per_batch = rows.global_batch_size // rows.size
  dataset = dataset.batch(rows.size, drop_remainder=True)[rows.start // rows.size::blocks_per_batch]
  # Windows become inputs/targets; sentence examples (lm.data.sentences) are dicts already.
  return dataset.map(_split_inputs_targets) if windows else dataset


Examples = Any  # Windows, or any random-access source of dicts of arrays (lm.data.sentences.Sentences)


def train_dataset(
    windows: Examples, *, seed: int, global_batch_size: int, rows: ProcessRows | None = None
) -> grain.MapDataset:
  """Infinite map dataset: element `s` is this process's rows of global batch `s`.

  Returns dicts of int32 arrays [rows.size, seq_len] ('inputs', 'targets';
  sentence examples also 'mask' and 'index').
  """
  rows = _rows(rows, global_batch_size)
  if isinstance(windows, MixedExamples):
    # Each source is shuffled and repeated on its own, then drawn in the mixture's proportions: element i
    # of the mixture is a pure function of (seed, i), so data order and resume work as for one source.
    parts = [grain.MapDataset.source(examples).shuffle(seed=(seed + index) % 2**32).repeat(None)
             for index, (_, examples, _) in enumerate(windows.parts)]
    dataset = grain.MapDataset.mix(parts, [weight for _, _, weight in windows.parts])
    return _local_batches(dataset, rows, True)
  dataset = grain.MapDataset.source(windows).shuffle(seed=seed).repeat(None)
  return _local_batches(dataset, rows, isinstance(windows, Windows))


class _EpochBatches:
  """Global batch s of a private run: epoch e = s // nb is a permutation of the N examples drawn from
  (seed, e), cut into nb = N // B batches of B; batch s is its (s % nb)-th. Each example is in at most one
  batch per epoch (lm.train.privacy's accountant counts epochs), and batch s depends on (seed, s) alone."""

  def __init__(self, examples: Any, seed: int, batch_size: int):
    self.examples, self.seed, self.batch_size = examples, int(seed), int(batch_size)
    self.per_epoch = len(examples) // self.batch_size
    self._permutations: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self.per_epoch * 2**31  # unbounded for any run: steps are int32

  def _permutation(self, epoch: int) -> np.ndarray:
    permutation = self._permutations.get(epoch)
    if permutation is None:
      permutation = np.random.default_rng([self.seed, epoch, 0xD95]).permutation(len(self.examples))
      self._permutations = {epoch: permutation}  # the loader reads epochs in order: keep one
    return permutation

  def rows(self, step: int) -> np.ndarray:
    """The example indices of global batch `step`."""
    epoch, batch = divmod(int(step), self.per_epoch)
    return self._permutation(epoch)[batch * self.batch_size:(batch + 1) * self.batch_size]

  def __getitem__(self, step: int) -> Any:
    return [self.examples[int(index)] for index in self.rows(step)]


def private_train_dataset(examples: Examples, *, seed: int, global_batch_size: int,
                          rows: ProcessRows | None = None) -> grain.MapDataset:
  """`train_dataset` for DP-SGD: shuffled fixed-size batches, each example at most once per epoch.

  Element s is this process's rows of global batch s, as in `train_dataset`; the N mod B examples a
  permutation leaves over sit that epoch out (another set each epoch).
  """
  rows = _rows(rows, global_batch_size)
  if isinstance(examples, MixedExamples):
    raise ValueError("DP-SGD's accountant counts epochs of one corpus; a mixture draws each source at its own rate. "
                     "Fix: train the private run on one data.source.")
  if len(examples) < global_batch_size:
    raise ValueError(f"DP-SGD needs at least one whole batch per epoch: {len(examples)} training examples, batch "
                     f"{global_batch_size}. Fix: a smaller config.batch_size.")
  batches = _EpochBatches(examples, seed, global_batch_size)

  def local(global_batch: list[Any]) -> Any:
    mine = global_batch[rows.start:rows.start + rows.size]
    stacked = np.stack(mine) if isinstance(mine[0], np.ndarray) else {
        key: np.stack([example[key] for example in mine]) for key in mine[0]}
    return _split_inputs_targets(stacked) if isinstance(examples, Windows) else stacked

  return grain.MapDataset.source(batches).map(local)


def poisson_rows(size: int, rate: float, limit: int, rng: np.random.Generator) -> np.ndarray:
  """Poisson sampling of `size` items at `rate`, truncated to `limit`: a binomial count, then that many
  distinct indices, uniformly (the same law as drawing each item independently), at most `limit` of them (a
  uniform subset when more are drawn). Their order is random."""
  count = min(int(rng.binomial(size, rate)), int(limit))
  return rng.choice(size, size=count, replace=False)


class _PoissonBatches:
  """Global batch s of a Poisson-sampled private run: each of the N examples joins independently with
  probability q (a binomial count, then that many distinct indices, uniformly: the same law), at most
  `batch_size` of them (a uniform subset when more are drawn), from (seed, s) alone."""

  def __init__(self, examples: Any, seed: int, batch_size: int, sampling_rate: float):
    self.examples, self.seed, self.batch_size, self.rate = examples, int(seed), int(batch_size), float(sampling_rate)

  def __len__(self) -> int:
    return 2**31  # unbounded for any run: steps are int32

  def rows(self, step: int) -> np.ndarray:
    """The example indices of global batch `step` (at most batch_size; their order is random)."""
    rng = np.random.default_rng([self.seed, int(step), 0x9015])
    return poisson_rows(len(self.examples), self.rate, self.batch_size, rng)

  def __getitem__(self, step: int) -> tuple[list[Any], int]:
    chosen = self.rows(step)
    padding = [self.examples[int(chosen[0]) if len(chosen) else 0]] * (self.batch_size - len(chosen))
    return [self.examples[int(index)] for index in chosen] + padding, len(chosen)


def poisson_train_dataset(examples: Examples, *, seed: int, global_batch_size: int, expected_batch_size: float,
                          rows: ProcessRows | None = None) -> grain.MapDataset:
  """`train_dataset` for DP-SGD with Poisson sampling (lm.train.privacy): element s is this process's rows of
  global batch s, `global_batch_size` rows of which the first are the sampled examples and the rest padding
  (a copy of one of them), told apart by the key `dp_real` (int32: 1 sampled, 0 padding)."""
  rows = _rows(rows, global_batch_size)
  if isinstance(examples, MixedExamples):
    raise ValueError("DP-SGD's accountant samples one corpus; a mixture draws each source at its own rate. "
                     "Fix: train the private run on one data.source.")
  if not 0 < expected_batch_size <= global_batch_size or expected_batch_size >= len(examples):
    raise ValueError(f"Poisson sampling's expected batch {expected_batch_size:g} must be in (0, batch size "
                     f"{global_batch_size}] and below the {len(examples)} training examples. Fix: set "
                     "config.privacy.expected_batch_size, or a smaller config.batch_size.")
  batches = _PoissonBatches(examples, seed, global_batch_size, expected_batch_size / len(examples))

  def local(drawn: tuple[list[Any], int]) -> Any:
    global_batch, count = drawn
    mine = global_batch[rows.start:rows.start + rows.size]
    stacked = np.stack(mine) if isinstance(mine[0], np.ndarray) else {
        key: np.stack([example[key] for example in mine]) for key in mine[0]}
    windows = isinstance(examples, Windows) or isinstance(stacked, np.ndarray)  # token windows: inputs, targets
    batch = _split_inputs_targets(stacked) if windows else dict(stacked)
    batch["dp_real"] = (np.arange(rows.start, rows.start + rows.size) < count).astype(np.int32)
    return batch

  return grain.MapDataset.source(batches).map(local)


def eval_dataset(
    windows: Examples, *, global_batch_size: int, num_batches: int | None = None,
    rows: ProcessRows | None = None,
) -> grain.MapDataset:
  """Finite map dataset over non-overlapping windows, in corpus order.

  The final partial batch is dropped (at most `global_batch_size - 1` windows)
  so every process runs the same number of steps.
  """
  rows = _rows(rows, global_batch_size)
  num_global = len(windows) // global_batch_size
  if num_batches is not None:
    num_global = min(num_global, num_batches)
  dataset = grain.MapDataset.source(windows)[:num_global * global_batch_size]
  return _local_batches(dataset, rows, isinstance(windows, Windows))


class BatchIterator:
  """Checkpointable iterator of global `jax.Array` batches.

  Wraps a Grain iterator (with background prefetch) and assembles each
  process's rows into global arrays sharded as `sharding`.
  """

  def __init__(self, dataset: grain.MapDataset, sharding: jax.sharding.Sharding | dict[str, jax.sharding.Sharding], *,
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
    return to_global_batch(local, self._sharding, self._global_batch_size)

  def get_state(self) -> dict[str, Any]:
    return self._iterator.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._iterator.set_state(state)


def to_global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding | dict[str, jax.sharding.Sharding],
                    global_batch_size: int) -> dict[str, jax.Array]:
  """This process's rows of every key -> global arrays; `sharding` is one for all keys or one per key."""
  return {key: to_global(value, sharding[key] if isinstance(sharding, dict) else sharding, global_batch_size)
          for key, value in local.items()}


def to_global(local: np.ndarray, sharding: jax.sharding.Sharding, global_batch_size: int) -> jax.Array:
  """This process's rows [local_batch, ...] -> a global array [global_batch, ...]."""
  global_shape = (global_batch_size,) + tuple(local.shape[1:])
  return jax.make_array_from_process_local_data(sharding, np.asarray(local), global_shape)
