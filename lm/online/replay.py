"""A bounded replay buffer of past training windows, and batches mixing it with new data.

Training on a stream of chunks, a model forgets earlier chunks as it fits the
newest one (catastrophic forgetting, McCloskey & Cohen 1989). Mixing a few
stored past sequences into every batch ("experience replay", Rolnick et al.
2019, "Experience Replay for Continual Learning"; Chaudhry et al. 2019, "On
Tiny Episodic Memories in Continual Learning") is a simple, strong remedy.

What to keep: per domain, a uniform sample of everything offered so far, by
reservoir sampling (Vitter 1985, "Random Sampling with a Reservoir",
algorithm R): item `t` (0-based) fills slot `t` while the buffer is not full,
and afterwards replaces slot `j ~ U[0, t]` if `j < capacity`. The draw of
item `t` is a counter-based hash of (seed, domain, t) (SplitMix64, Steele et
al. 2014), so the content is a pure function of the items offered, in order:
offering 100 windows then 50 stores exactly what offering the 150 at once
does, and a run that resumes from a saved buffer stores what an
uninterrupted one would. Keeping each domain separately, and sampling domains
in equal shares, stops a large domain from crowding out a small one.

Like the pre-training pipeline (`lm.data.pipeline`), every batch is a pure
function of (seed, step), so resumed runs see the same batches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import zipfile
import zlib
from typing import Any, Protocol

import numpy as np

FORMAT_VERSION = 1

# SplitMix64 constants (Steele, Lea & Flood 2014): the golden-ratio increment
# of the counter and the two multipliers of the output mix.
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)

# Distinct first words of the seed sequences, so the replay rows and the new
# rows of a batch never draw from the same random stream for equal seeds.
_SAMPLE_STREAM = 0x5EB1A7
_NEW_WINDOWS_STREAM = 0x0E3C4

# Epoch permutations kept: a batch straddles at most two epochs.
_CACHED_PERMUTATIONS = 2


class WindowSource(Protocol):
  """Random access to windows [window] (an `np.ndarray` [n, window] or `lm.data.pipeline.Windows`)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Any: ...


def _splitmix64(counter: np.ndarray, key: np.uint64) -> np.ndarray:
  """SplitMix64 output number `counter` of the stream `key`: [n] uint64 -> [n] uint64."""
  # uint64 array arithmetic wraps modulo 2**64, as the algorithm requires.
  z = key + (counter + np.uint64(1)) * _GOLDEN_GAMMA
  z = (z ^ (z >> np.uint64(30))) * _MIX_1
  z = (z ^ (z >> np.uint64(27))) * _MIX_2
  return z ^ (z >> np.uint64(31))


def _domain_key(seed: int, domain: str) -> np.uint64:
  """A stream key from (seed, domain) that is the same in every process (unlike `hash`, which is salted)."""
  digest = hashlib.blake2b(json.dumps([seed, domain]).encode(), digest_size=8).digest()
  return np.uint64(int.from_bytes(digest, "little"))


def gather(windows: WindowSource, indices: np.ndarray, window: int) -> np.ndarray:
  """Rows `indices` of `windows` -> [len(indices), window] int32."""
  if isinstance(windows, np.ndarray):
    rows = windows[indices]
  else:
    rows = np.stack([np.asarray(windows[int(i)]) for i in indices]) if len(indices) else np.zeros((0, window))
  if rows.ndim != 2 or rows.shape[1] != window:
    raise ValueError(f"windows have shape {rows.shape[1:]}, not [{window}] (= seq_len + 1); offer windows of "
                     "seq_len + 1 tokens, as lm.data.pipeline.Windows returns, or build the buffer with that window.")
  if not np.issubdtype(rows.dtype, np.integer):
    raise ValueError(f"windows have dtype {rows.dtype}, not an integer type; offer token ids.")
  return rows.astype(np.int32, copy=False)


class ReplayBuffer:
  """Per domain, a uniform sample (reservoir sampling, Vitter's algorithm R) of at most `capacity` training windows [seq_len + 1] int32 out of all windows offered so far.

  capacity: windows kept per domain. window: seq_len + 1. seed: picks which
  windows are kept; the kept set is a pure function of (seed, the windows
  offered to each domain, in order), whatever the sizes of the offers.
  """

  def __init__(self, capacity: int, window: int, seed: int = 0):
    if int(capacity) < 1:
      raise ValueError(f"capacity is {capacity}; a replay buffer keeps at least 1 window per domain. "
                       "Pass capacity >= 1, or use no buffer (replay=None) to train without replay.")
    if int(window) < 2:
      raise ValueError(f"window is {window}; windows hold seq_len + 1 >= 2 tokens (inputs and shifted targets). "
                       "Pass window=seq_len + 1.")
    self.capacity = int(capacity)
    self.window = int(window)
    self.seed = int(seed)
    if not -2**63 <= self.seed < 2**63:
      raise ValueError(f"seed {seed} does not fit in int64, as checkpoints store it; pass a smaller seed.")
    self._stored: dict[str, np.ndarray] = {}  # domain -> [size, window] int32; dicts keep insertion order
    self._seen: dict[str, int] = {}

  @property
  def domains(self) -> list[str]:
    """Domains in order of first appearance (the order `sample` deals rows in)."""
    return list(self._stored)

  def __len__(self) -> int:
    return sum(len(rows) for rows in self._stored.values())

  def size(self, domain: str) -> int:
    """Windows stored for `domain` (0 for a domain never offered)."""
    return len(self._stored.get(domain, ()))

  def seen(self, domain: str) -> int:
    """Windows offered to `domain` so far (0 for a domain never offered)."""
    return self._seen.get(domain, 0)

  def stored(self, domain: str) -> np.ndarray:
    """The windows kept for `domain`, [size, window] int32.

    A read-only view: later `add`s may overwrite rows in place (copying
    hundreds of MB per offer would be the alternative); copy it to keep it.
    """
    view = self._stored[domain].view()
    view.flags.writeable = False
    return view

  def add(self, domain: str, windows: WindowSource) -> None:
    """Offers `windows` [n, window] (int array, or `lm.data.pipeline.Windows`) to `domain`'s reservoir.

    Only the windows that are kept are read, so a `Windows` over a large
    chunk can be offered without materializing it. An empty offer changes
    nothing (and does not register the domain).
    """
    if not isinstance(domain, str):
      raise TypeError(f"domain must be a str, not {type(domain).__name__}.")
    if isinstance(windows, np.ndarray):
      if windows.ndim != 2 or windows.shape[1] != self.window:
        raise ValueError(f"windows have shape {windows.shape}, not [n, {self.window}] (window = seq_len + 1); "
                         "offer a 2-D array of windows of seq_len + 1 tokens.")
      if not np.issubdtype(windows.dtype, np.integer):
        raise ValueError(f"windows have dtype {windows.dtype}, not an integer type; offer token ids.")
    n = len(windows)
    if n == 0:
      return
    seen = self._seen.get(domain, 0)
    stored = self._stored.get(domain, np.zeros((0, self.window), np.int32))
    # Until the reservoir is full every item is kept, in order: slot t = item t.
    fill = min(n, max(self.capacity - seen, 0))
    if fill:
      stored = np.concatenate([stored, gather(windows, np.arange(fill), self.window)])
    if fill < n:
      t = np.arange(seen + fill, seen + n, dtype=np.uint64)
      # j = hash % (t + 1) is uniform on [0, t] up to a bias of (t + 1) / 2**64.
      slots = _splitmix64(t, _domain_key(self.seed, domain)) % (t + np.uint64(1))
      hits = np.nonzero(slots < np.uint64(self.capacity))[0]
      if len(hits):
        # Items replace slots in order, so of several items drawing one slot the
        # last one stays; the earlier ones need not be read at all.
        reversed_slots = slots[hits][::-1]
        kept_slots, first_in_reversed = np.unique(reversed_slots, return_index=True)
        kept_items = hits[::-1][first_in_reversed]
        stored[kept_slots.astype(np.intp)] = gather(windows, fill + kept_items, self.window)
    self._stored[domain] = stored
    self._seen[domain] = seen + n

  def sample(self, count: int, *, step: int, seed: int = 0) -> np.ndarray:
    """`count` stored windows [count, window] int32 for training step `step`.

    A pure function of (step, seed, buffer content). Row `i` comes from
    domain `i % len(domains)` (equal shares, the remainder to the earliest
    domains), uniformly within the domain, with replacement.
    """
    if count < 0:
      raise ValueError(f"count is {count}; ask for count >= 0 windows.")
    if count == 0:
      return np.zeros((0, self.window), np.int32)
    if not self._stored:
      raise ValueError(f"cannot sample {count} windows from an empty replay buffer; add windows first "
                       "(ReplayBuffer.add), or ask for 0 (mixed_batch uses no replay rows while it is empty).")
    if step < 0 or seed < 0:
      raise ValueError(f"step ({step}) and seed ({seed}) must be >= 0; pass the (non-negative) training step and seed.")
    rng = np.random.default_rng([_SAMPLE_STREAM, int(seed), int(step)])
    out = np.empty((count, self.window), np.int32)
    num_domains = len(self._stored)
    for index, rows in enumerate(self._stored.values()):
      positions = np.arange(index, count, num_domains)
      out[positions] = rows[rng.integers(0, len(rows), size=len(positions))]
    return out

  def take(self, indices: np.ndarray) -> np.ndarray:
    """Windows [len(indices), window] int32 at `indices` of all stored windows, domains in order (`domains`):
    index i < size(first domain) is its window i, and so on (what a draw over the whole buffer picks)."""
    indices = np.asarray(indices, np.int64)
    sizes = np.cumsum([0] + [len(rows) for rows in self._stored.values()])
    if len(indices) and (indices.min() < 0 or indices.max() >= sizes[-1]):
      raise ValueError(f"indices must be in [0, {sizes[-1]}), the windows stored; got {indices.min()}..{indices.max()}")
    out = np.empty((len(indices), self.window), np.int32)
    which = np.searchsorted(sizes, indices, side="right") - 1
    for index, rows in enumerate(self._stored.values()):
      mine = which == index
      out[mine] = rows[indices[mine] - sizes[index]]
    return out

  def to_arrays(self) -> dict[str, np.ndarray]:
    """The buffer as plain numpy arrays (for checkpoints); `from_arrays` restores it exactly.

    Domain names are a JSON list encoded as a uint8 array, so the arrays load
    without pickle; domain `i`'s windows are `windows_{i}` [size, window].
    """
    names = json.dumps(self.domains).encode()
    arrays = {
        "format_version": np.asarray(FORMAT_VERSION, np.int64),
        "capacity": np.asarray(self.capacity, np.int64),
        "window": np.asarray(self.window, np.int64),
        "seed": np.asarray(self.seed, np.int64),
        "domains": np.frombuffer(names, np.uint8).copy(),
        "seen": np.asarray([self._seen[d] for d in self._stored], np.int64),
    }
    for index, rows in enumerate(self._stored.values()):
      arrays[f"windows_{index}"] = rows
    return arrays

  @classmethod
  def from_arrays(cls, arrays: dict[str, Any]) -> ReplayBuffer:
    """Inverse of `to_arrays`; raises ValueError if the arrays are inconsistent."""
    try:
      version = int(arrays["format_version"])
      if version != FORMAT_VERSION:
        raise ValueError(f"format version {version}, this code reads version {FORMAT_VERSION}")
      buffer = cls(int(arrays["capacity"]), int(arrays["window"]), int(arrays["seed"]))
      names = json.loads(np.asarray(arrays["domains"], np.uint8).tobytes().decode())
      seen = np.asarray(arrays["seen"], np.int64)
      if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError("'domains' is not a list of distinct names")
      if seen.shape != (len(names),):
        raise ValueError(f"'seen' has shape {seen.shape} for {len(names)} domains")
      for index, name in enumerate(names):
        rows = np.array(arrays[f"windows_{index}"], np.int32)  # a copy: the buffer must not alias the input
        expected = min(int(seen[index]), buffer.capacity)
        if rows.shape != (expected, buffer.window) or expected == 0:
          raise ValueError(f"domain {name!r} stores windows of shape {rows.shape}, expected "
                           f"({expected}, {buffer.window}) after {int(seen[index])} offered")
        buffer._stored[name] = rows
        buffer._seen[name] = int(seen[index])
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as error:
      raise ValueError(f"the arrays are not a saved ReplayBuffer ({error}); pass the dict that "
                       "ReplayBuffer.to_arrays returned (all of its keys, unmodified).") from error
    return buffer

  def save(self, path: str | os.PathLike) -> None:
    """Writes the buffer to one .npz file at `path` (used as given), atomically.

    The file appears complete or not at all: it is written next to `path` and
    renamed over it, so a crash mid-save leaves the previous file intact.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
      with open(tmp, "wb") as f:
        np.savez(f, **self.to_arrays())  # a file object: numpy does not append '.npz'
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  @classmethod
  def load(cls, path: str | os.PathLike) -> ReplayBuffer:
    """Reads a buffer written by `save`; raises ValueError naming the file if it is corrupt."""
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no replay buffer at {path}; pass the path ReplayBuffer.save wrote, "
                              "or start from an empty ReplayBuffer.")
    try:
      with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
      return cls.from_arrays(arrays)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
      raise ValueError(f"{path} is not a readable replay buffer ({error}): it is truncated or corrupt. "
                       "Delete it and restore the buffer saved with an earlier checkpoint, "
                       "or start from an empty ReplayBuffer.") from error


@functools.lru_cache(maxsize=_CACHED_PERMUTATIONS)
def _epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
  """The order of the new windows in epoch `epoch`, [size] int64 (read-only: it is cached)."""
  order = np.random.default_rng([_NEW_WINDOWS_STREAM, seed, epoch]).permutation(size)
  order.flags.writeable = False
  return order


def replay_rows(batch_size: int, replay_fraction: float, replay: ReplayBuffer | None) -> int:
  """Rows of a batch taken from `replay`: round(batch_size * replay_fraction), 0 without stored windows."""
  if replay is None or len(replay) == 0:
    return 0
  return round(batch_size * replay_fraction)


def mixed_batch(new_windows: WindowSource, replay: ReplayBuffer | None, *, batch_size: int,
                replay_fraction: float, step: int, seed: int) -> dict[str, np.ndarray]:
  """Training batch `step` of an online chunk: new windows, then replayed ones.

  The last round(batch_size * replay_fraction) rows come from `replay` (none
  if it is None or empty); the first `k` rows are the new windows at
  positions step*k ... step*k + k - 1 of a walk over permutations of
  range(len(new_windows)), a fresh permutation every epoch, seeded by `seed`.
  So every new window is used once before any is used twice, and the batch is
  a pure function of (seed, step, buffer content). `k` depends on whether the
  buffer is empty: keep the buffer fixed while training on a chunk (add the
  chunk's windows after it), or the walk skips or repeats positions.

  new_windows: anything with __len__ and __getitem__(int) -> [window]
  (`lm.data.pipeline.Windows`, or an array [n, window]).

  Returns {'inputs': [batch, seq_len] int32, 'targets': [batch, seq_len]
  int32, 'is_replay': [batch] bool}.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size is {batch_size}; pass batch_size >= 1.")
  if not 0.0 <= replay_fraction < 1.0:
    raise ValueError(f"replay_fraction is {replay_fraction}; pass a fraction in [0, 1): 0 trains on new data "
                     "only, and some rows of every batch must be new data.")
  if step < 0 or seed < 0:
    raise ValueError(f"step ({step}) and seed ({seed}) must be >= 0; pass the (non-negative) training step and seed.")
  size = len(new_windows)
  if size == 0:
    raise ValueError("the new chunk has no windows; skip empty chunks, or give them at least seq_len + 1 tokens.")
  window = replay.window if replay is not None else len(np.asarray(new_windows[0]))
  order, replayed = mixed_rows(size, replay, batch_size=batch_size, replay_fraction=replay_fraction, step=step,
                               seed=seed, window=window)
  num_new = len(order)
  new_rows = gather(new_windows, order, window)
  rows = np.concatenate([new_rows, replayed])
  return {
      "inputs": rows[:, :-1],
      "targets": rows[:, 1:],
      "is_replay": np.arange(batch_size) >= num_new,
  }


def mixed_rows(size: int, replay: ReplayBuffer | None, *, batch_size: int, replay_fraction: float, step: int,
               seed: int, window: int) -> tuple[np.ndarray, np.ndarray]:
  """Which of `size` new items fill the new rows of batch `step`, and the replayed windows of the rest.

  Returns (positions of the new items [num_new] int64, replayed windows [num_replay, window] int32), as
  `mixed_batch` lays them out (its doc): every new item once per epoch, in a fresh permutation each epoch.
  Items need not be windows: the online loop's preference chunks take pairs by these positions.
  """
  if size == 0:
    raise ValueError("the new chunk has no items; skip empty chunks.")
  num_replay = replay_rows(batch_size, replay_fraction, replay)
  num_new = batch_size - num_replay
  if num_new == 0:
    raise ValueError(f"replay_fraction {replay_fraction} of a batch of {batch_size} rounds to {num_replay} replay "
                     "rows, leaving none for the new data; lower replay_fraction or raise batch_size.")
  positions = step * num_new + np.arange(num_new)
  epochs, offsets = np.divmod(positions, size)
  order = np.empty(num_new, np.int64)
  for epoch in np.unique(epochs):
    in_epoch = epochs == epoch
    order[in_epoch] = _epoch_permutation(int(seed), int(epoch), size)[offsets[in_epoch]]
  replayed = replay.sample(num_replay, step=step, seed=seed) if num_replay else np.zeros((0, window), np.int32)
  return order, replayed
