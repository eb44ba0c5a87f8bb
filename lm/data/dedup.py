"""The deduplication index: everything trained on, and whether a new text repeats it.

Exact copies are found by a 64-bit hash of the normalized text, near copies by
MinHash signatures of character shingles, looked up through LSH buckets in time
independent of the index size. The index (`DedupIndex`) is plain numpy arrays,
so it is saved in a checkpoint next to the model and a resumed run keeps
deduplicating against the same history.

Signatures are a pure function of (text, shingle_size, num_perm, seed): the
permutations are drawn from the seed saved with the index, so an index built
on one machine is valid on another.

`CleanConfig` is defined here because the index is built from it and saves it;
`lm.data.clean` (normalization, length filters, `Cleaner`) imports this module
and re-exports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lm.core.errors import DataError

NORMALIZATIONS = ("NFC", "NFKC", "none")
# Prime just above 2**32: the universal hashes (a * x + b) mod p permute 32-bit shingle hashes.
UNIVERSAL_HASH_PRIME = 4294967311
# Bumped when the layout of `DedupIndex.to_arrays` changes; older layouts are refused.
INDEX_FORMAT_VERSION = 1
INDEX_KEYS = ("config", "exact", "signatures", "num_documents")

_UINT32_MAX = 2**32 - 1
_EXACT_HASH_BYTES = 8
# Shingles per [num_perm, shingles] uint64 block (4 MiB at num_perm=64): it stays in
# cache (~1.5x faster than 32 MiB blocks) and one huge document never allocates gigabytes.
_SHINGLE_BLOCK = 8192
# Polynomial rolling hash of shingle code points (odd, so multiplication is invertible
# mod 2**64), then the splitmix64 finalizer to spread the bits before taking the top 32.
_ROLL_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_MIX_MULTIPLIERS = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
_MIX_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31))
_HIGH_HALF = np.uint64(32)

_ANY_SPACE = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class CleanConfig:
  """How documents are normalized, filtered and deduplicated (validated on construction)."""

  normalization: str = "NFC"
  min_chars: int = 1
  max_chars: int = 0
  exact_dedup: bool = True
  near_dup_threshold: float = 0.8
  shingle_size: int = 5
  num_perm: int = 64
  bands: int = 16
  seed: int = 0

  def __post_init__(self):
    self.validate()
    # Plain Python types, so the config is JSON-serializable when saved with the index
    # (ConfigDict or numpy may hand in np.int64, np.bool_, or the threshold as int 0 or 1).
    for name in ("min_chars", "max_chars", "shingle_size", "num_perm", "bands", "seed"):
      object.__setattr__(self, name, int(getattr(self, name)))
    object.__setattr__(self, "exact_dedup", bool(self.exact_dedup))
    object.__setattr__(self, "near_dup_threshold", float(self.near_dup_threshold))

  @classmethod
  def from_mapping(cls, mapping: Mapping[str, Any] | None) -> CleanConfig:
    """Builds a config from a dict or ml_collections ConfigDict (None: the defaults)."""
    if mapping is None:
      return cls()
    if hasattr(mapping, "to_dict"):
      mapping = mapping.to_dict()
    if not isinstance(mapping, Mapping):
      raise DataError(
          f"Clean config must be a mapping of field names to values, got {type(mapping).__name__}. "
          "Fix: pass a dict or ConfigDict such as {'min_chars': 20, 'near_dup_threshold': 0.8}.")
    known = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(str(key) for key in mapping if key not in known)
    if unknown:
      raise DataError(
          f"Unknown clean config keys {unknown}. Fix: use only {known} (check the spelling).")
    return cls(**mapping)

  def validate(self) -> None:
    """Raises DataError naming the first bad field and the values it accepts."""
    if self.normalization not in NORMALIZATIONS:
      raise DataError(
          f"clean.normalization={self.normalization!r} is not supported. Fix: use one of "
          f"{list(NORMALIZATIONS)} (NFKC also folds compatibility forms such as ligatures).")
    for name in ("min_chars", "max_chars", "shingle_size", "num_perm", "bands", "seed"):
      value = getattr(self, name)
      if not _is_int(value):
        raise DataError(f"clean.{name}={value!r} must be an integer. Fix: set it to a whole number.")
    for name in ("min_chars", "max_chars", "seed"):
      if getattr(self, name) < 0:
        raise DataError(f"clean.{name}={getattr(self, name)} is negative. Fix: set it to 0 or more.")
    if self.max_chars and self.max_chars < self.min_chars:
      raise DataError(
          f"clean.max_chars={self.max_chars} is below clean.min_chars={self.min_chars}, so every "
          "document would be dropped. Fix: raise max_chars, or set it to 0 for no upper limit.")
    if not isinstance(self.exact_dedup, (bool, np.bool_)):
      raise DataError(f"clean.exact_dedup={self.exact_dedup!r} must be True or False. Fix: use a bool.")
    threshold = self.near_dup_threshold
    if (isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating))
        or not 0.0 <= threshold <= 1.0):
      raise DataError(
          f"clean.near_dup_threshold={threshold!r} must be a number in [0, 1]. Fix: use e.g. 0.8 "
          "(estimated Jaccard similarity of shingle sets), or 0 to turn near-duplicate removal off.")
    for name in ("shingle_size", "num_perm", "bands"):
      if getattr(self, name) < 1:
        raise DataError(f"clean.{name}={getattr(self, name)} must be at least 1. Fix: use e.g. "
                        f"{getattr(CleanConfig, name)} (the default).")
    if self.num_perm % self.bands:
      raise DataError(
          f"clean.num_perm={self.num_perm} is not divisible by clean.bands={self.bands}. Fix: choose "
          "bands that divide num_perm (e.g. num_perm=64 with bands=16, 4 rows per band).")

  @property
  def near_dedup(self) -> bool:
    return self.near_dup_threshold > 0


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def exact_hash(text: str) -> int:
  """First 8 bytes of blake2b of the UTF-8 text, as an unsigned 64-bit integer."""
  digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=_EXACT_HASH_BYTES)
  return int.from_bytes(digest.digest(), "little")


def shingle_text(text: str) -> str:
  """The text that shingles are taken from: lower-cased, whitespace runs as one space."""
  return _ANY_SPACE.sub(" ", text.lower())


def _mix64(values: np.ndarray) -> np.ndarray:
  """The splitmix64 finalizer: every input bit affects every output bit (uint64 wraps)."""
  values = values ^ (values >> _MIX_SHIFTS[0])
  values *= _MIX_MULTIPLIERS[0]
  values ^= values >> _MIX_SHIFTS[1]
  values *= _MIX_MULTIPLIERS[1]
  values ^= values >> _MIX_SHIFTS[2]
  return values


def _shingle_hashes(texts: list[str], shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
  """32-bit hashes of every character n-gram of each text, with the text index of each.

  A text shorter than `shingle_size` has one shingle, itself (zero-padded, so
  it cannot equal a longer text's shingle). All texts are hashed in one pass
  over their concatenated code points; windows that cross a text boundary are
  dropped.
  """
  if not texts:
    return np.zeros(0, np.uint64), np.zeros(0, np.int64)
  lowered = [shingle_text(text) for text in texts]
  lengths = np.fromiter((len(text) for text in lowered), np.int64, len(lowered))
  codes = np.frombuffer("".join(lowered).encode("utf-32-le", "surrogatepass"), np.uint32)
  codes = codes.astype(np.uint64) + np.uint64(1)  # 0 is the padding code
  padding = np.maximum(shingle_size - lengths, 0)
  if padding.any():
    ends = np.cumsum(lengths)
    codes = np.insert(codes, np.repeat(ends, padding), np.uint64(0))
  padded = lengths + padding
  num_windows = len(codes) - shingle_size + 1
  rolled = np.zeros(num_windows, np.uint64)
  for offset in range(shingle_size):
    rolled = rolled * _ROLL_MULTIPLIER + codes[offset:offset + num_windows]
  rolled = _mix64(rolled)
  owners = np.repeat(np.arange(len(texts)), padded)[:num_windows]
  starts = np.cumsum(padded) - padded
  valid = np.arange(num_windows) - starts[owners] <= (padded - shingle_size)[owners]
  return rolled[valid] >> _HIGH_HALF, owners[valid]


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The (a, b) of each universal hash; a, b < 2**32 keep a * x + b below 2**64."""
  rng = np.random.default_rng(seed)
  a = rng.integers(1, 2**32, size=num_perm, dtype=np.uint64)
  b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64)
  return a, b


def _signatures(texts: list[str], config: CleanConfig, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """MinHash signatures [len(texts), num_perm] (uint32) of the texts' shingle sets."""
  hashes, owners = _shingle_hashes(texts, config.shingle_size)
  minima = np.full((len(texts), config.num_perm), np.iinfo(np.uint64).max, np.uint64)
  prime = np.uint64(UNIVERSAL_HASH_PRIME)
  a, b = a[:, None], b[:, None]
  for start in range(0, len(hashes), _SHINGLE_BLOCK):
    block, block_owners = hashes[start:start + _SHINGLE_BLOCK], owners[start:start + _SHINGLE_BLOCK]
    # [num_perm, shingles]: each text's shingles are a contiguous run of every row, which
    # reduceat scans ~1.5x faster than strided columns.
    values = a * block
    values += b
    values %= prime
    # A text cut by the block edge gets the rest of its minimum from the next block.
    firsts = np.flatnonzero(np.r_[True, block_owners[1:] != block_owners[:-1]])
    rows = block_owners[firsts]
    minima[rows] = np.minimum(minima[rows], np.minimum.reduceat(values, firsts, axis=1).T)
  # Values lie in [0, p); the 15 above 2**32 - 1 are clipped, the same way everywhere.
  return np.minimum(minima, np.uint64(_UINT32_MAX)).astype(np.uint32)


class DedupIndex:
  """Everything already trained on: exact hashes and MinHash signatures in LSH buckets.

  Exact hashes are kept when `config.exact_dedup`, signatures when
  `config.near_dup_threshold > 0`. Texts passed to `find` and `add` must
  already be normalized (`normalize`), as `Cleaner` does.
  """

  def __init__(self, config: CleanConfig):
    if not isinstance(config, CleanConfig):
      raise DataError(f"DedupIndex needs a CleanConfig, got {type(config).__name__}. Fix: pass "
                      "CleanConfig.from_mapping(...).")
    self.config = config
    self._a, self._b = _permutations(config.num_perm, config.seed)
    self._rows = config.num_perm // config.bands
    self._num_documents = 0
    self._exact: set[int] = set()
    self._exact_order: list[int] = []
    self._signatures = np.zeros((0, config.num_perm), np.uint32)
    self._num_signatures = 0
    # One dict per band: band digest (`_band_keys`) -> ids of the signatures with that band.
    self._buckets: list[dict[int, list[int]]] = [{} for _ in range(config.bands)]

  def __len__(self) -> int:
    return self._num_documents

  def signature(self, text: str) -> np.ndarray:
    """The MinHash signature [num_perm] (uint32) of a text."""
    return _signatures([text], self.config, self._a, self._b)[0]

  @staticmethod
  def similarity(first: np.ndarray, second: np.ndarray) -> float:
    """Estimated Jaccard similarity: the fraction of equal signature positions."""
    return float(np.mean(np.asarray(first) == np.asarray(second)))

  def find(self, text: str) -> str | None:
    """"exact_duplicate", "near_duplicate" or None for an already-normalized text."""
    return self._find(*self._entries([text])[0])

  def add(self, text: str) -> None:
    """Records an already-normalized text as trained on."""
    self._add(*self._entries([text])[0])

  def _entries(self, texts: list[str], hashes: list[int] | None = None
               ) -> list[tuple[int, np.ndarray | None, list[int] | None]]:
    """(exact hash, signature, band keys) of each text; None without near-dup."""
    if hashes is None:
      hashes = [exact_hash(text) for text in texts]
    if not self.config.near_dedup:
      return [(hashed, None, None) for hashed in hashes]
    signatures = _signatures(texts, self.config, self._a, self._b)
    return list(zip(hashes, signatures, self._band_keys(signatures).tolist()))

  def _band_keys(self, signatures: np.ndarray) -> np.ndarray:
    """A 64-bit digest of each band of each signature [n, bands] (uint64).

    Python ints hash far faster than bytes in the bucket dicts; a digest collision
    only adds a candidate, which the full signature comparison then rejects.
    """
    bands = signatures.reshape(len(signatures), self.config.bands, self._rows).astype(np.uint64)
    keys = np.zeros(bands.shape[:2], np.uint64)
    for row in range(self._rows):
      keys = keys * _ROLL_MULTIPLIER + bands[:, :, row]
    return _mix64(keys)

  def _find(self, hashed: int, signature: np.ndarray | None, keys: list[int] | None) -> str | None:
    if self.config.exact_dedup and hashed in self._exact:
      return "exact_duplicate"
    if signature is None:
      return None
    candidates = set()
    for buckets, key in zip(self._buckets, keys):
      bucket = buckets.get(key)
      if bucket:
        candidates.update(bucket)
    if candidates:
      stored = self._signatures[np.fromiter(candidates, np.int64, len(candidates))]
      best = np.count_nonzero(stored == signature, axis=1).max() / self.config.num_perm
      if best >= self.config.near_dup_threshold:
        return "near_duplicate"
    return None

  def _add(self, hashed: int, signature: np.ndarray | None, keys: list[int] | None) -> None:
    self._num_documents += 1
    if self.config.exact_dedup and hashed not in self._exact:
      self._exact.add(hashed)
      self._exact_order.append(hashed)
    if signature is not None:
      self._append_signatures(signature[None], [keys])

  def _append_signatures(self, signatures: np.ndarray, keys: list[list[int]]) -> None:
    needed = self._num_signatures + len(signatures)
    if needed > len(self._signatures):  # doubling keeps appends amortized O(1)
      grown = np.zeros((max(needed, 2 * len(self._signatures)), self.config.num_perm), np.uint32)
      grown[:self._num_signatures] = self._signatures[:self._num_signatures]
      self._signatures = grown
    self._signatures[self._num_signatures:needed] = signatures
    for identifier, signature_keys in enumerate(keys, start=self._num_signatures):
      for buckets, key in zip(self._buckets, signature_keys):
        bucket = buckets.get(key)
        if bucket is None:
          buckets[key] = [identifier]
        else:
          bucket.append(identifier)
    self._num_signatures = needed

  def _state(self) -> tuple[int, int, int]:
    return self._num_documents, len(self._exact_order), self._num_signatures

  def _restore(self, state: tuple[int, int, int]) -> None:
    """Undoes every add since `_state()` returned `state` (adds are append-only)."""
    num_documents, num_exact, num_signatures = state
    for hashed in self._exact_order[num_exact:]:
      self._exact.discard(hashed)
    del self._exact_order[num_exact:]
    added = self._signatures[num_signatures:self._num_signatures]
    for signature_keys in reversed(self._band_keys(added).tolist()):
      for buckets, key in zip(self._buckets, signature_keys):
        bucket = buckets[key]
        bucket.pop()  # the newest id is last in every bucket it was appended to
        if not bucket:
          del buckets[key]
    self._num_signatures = num_signatures
    self._num_documents = num_documents

  def to_arrays(self) -> dict[str, np.ndarray]:
    """The index as plain numpy arrays, for a checkpoint; `from_arrays` inverts it.

    "config": the CleanConfig as UTF-8 JSON (uint8 [bytes]); "exact": uint64
    [unique hashes, in insertion order]; "signatures": uint32 [documents,
    num_perm] (0 rows when near-dup is off); "num_documents": int64 [].
    """
    payload = {"format_version": INDEX_FORMAT_VERSION, **dataclasses.asdict(self.config)}
    return {
        "config": np.frombuffer(json.dumps(payload, sort_keys=True).encode("utf-8"), np.uint8).copy(),
        "exact": np.array(self._exact_order, np.uint64),
        "signatures": self._signatures[:self._num_signatures].copy(),
        "num_documents": np.array(self._num_documents, np.int64),
    }

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, Any]) -> DedupIndex:
    """Rebuilds an index (LSH buckets included) from `to_arrays` output."""
    fix = "Fix: pass the dict returned by DedupIndex.to_arrays, restored as numpy arrays."
    if not isinstance(arrays, Mapping):
      raise DataError(f"DedupIndex arrays must be a mapping, got {type(arrays).__name__}. {fix}")
    missing = [key for key in INDEX_KEYS if key not in arrays]
    unknown = sorted(str(key) for key in arrays if key not in INDEX_KEYS)
    if missing or unknown:
      raise DataError(f"DedupIndex arrays have missing keys {missing} / unknown keys {unknown}; "
                      f"expected exactly {list(INDEX_KEYS)}. {fix}")
    config = _config_from_array(arrays["config"], fix)
    exact = np.asarray(arrays["exact"])
    signatures = np.asarray(arrays["signatures"])
    num_documents = np.asarray(arrays["num_documents"])
    if exact.dtype != np.uint64 or exact.ndim != 1:
      raise DataError(f"DedupIndex 'exact' must be uint64 [n], got {exact.dtype} {exact.shape} (a "
                      f"64-bit hash cut to 32 bits by JAX without x64 looks like this). {fix}")
    if signatures.dtype != np.uint32 or signatures.ndim != 2 or signatures.shape[1] != config.num_perm:
      raise DataError(f"DedupIndex 'signatures' must be uint32 [m, {config.num_perm}], got "
                      f"{signatures.dtype} {signatures.shape}. {fix}")
    if num_documents.shape != () or not np.issubdtype(num_documents.dtype, np.integer):
      raise DataError(f"DedupIndex 'num_documents' must be an integer scalar, got "
                      f"{num_documents.dtype} {num_documents.shape}. {fix}")
    count = int(num_documents)
    expected_rows = count if config.near_dedup else 0
    if len(signatures) != expected_rows:
      raise DataError(f"DedupIndex has {len(signatures)} signatures for {count} documents (expected "
                      f"{expected_rows}). {fix}")
    if len(exact) > count or (len(exact) and not config.exact_dedup):
      raise DataError(f"DedupIndex has {len(exact)} exact hashes for {count} documents with "
                      f"exact_dedup={config.exact_dedup}. {fix}")
    if len(np.unique(exact)) != len(exact):
      raise DataError(f"DedupIndex 'exact' hashes repeat. {fix}")
    index = cls(config)
    index._num_documents = count
    index._exact_order = [int(hashed) for hashed in exact]
    index._exact = set(index._exact_order)
    index._append_signatures(signatures, index._band_keys(signatures).tolist())
    return index

  def save(self, path: str | os.PathLike) -> None:
    """Writes the index to one .npz file at exactly `path`, atomically."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
      with temporary.open("wb") as file:
        np.savez(file, **self.to_arrays())
        file.flush()
        os.fsync(file.fileno())  # the rename must not land before the data
      os.replace(temporary, path)
    finally:
      if temporary.exists():
        temporary.unlink()

  @classmethod
  def load(cls, path: str | os.PathLike) -> DedupIndex:
    """Reads a file written by `save`."""
    path = Path(path)
    if not path.is_file():
      raise DataError(f"Dedup index {str(path)!r} does not exist. Fix: check the path, or start a "
                      "fresh DedupIndex(config) (nothing will count as seen before).")
    try:
      with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, AttributeError) as error:
      raise DataError(f"Dedup index {str(path)!r} is corrupt or not an .npz file ({error}). Fix: "
                      "restore it from a checkpoint, or delete it to start a fresh index.") from error
    try:
      return cls.from_arrays(arrays)
    except DataError as error:
      raise DataError(f"Dedup index {str(path)!r} is malformed: {error}") from error


def _config_from_array(value: Any, fix: str) -> CleanConfig:
  value = np.asarray(value)
  if value.dtype == np.uint8 and value.ndim == 1:
    raw = value.tobytes()
  elif value.dtype.kind in "SU" and value.ndim == 0:
    raw = value.item().encode("utf-8") if value.dtype.kind == "U" else value.item()
  else:
    raise DataError(f"DedupIndex 'config' must be UTF-8 JSON as uint8 [bytes] or a bytes scalar, got "
                    f"{value.dtype} {value.shape}. {fix}")
  try:
    payload = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise DataError(f"DedupIndex 'config' is not UTF-8 JSON ({error}). {fix}") from error
  if not isinstance(payload, dict) or payload.pop("format_version", None) != INDEX_FORMAT_VERSION:
    raise DataError(f"DedupIndex 'config' is not format version {INDEX_FORMAT_VERSION}. Fix: rebuild "
                    "the index with this version of lm.data.clean.")
  return CleanConfig.from_mapping(payload)
