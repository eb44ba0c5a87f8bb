"""Token caches: a split's token stream written once as shards, read in O(1) by every process.

One cache is a folder (`cache_dir/tokens/<key>/`, any `etils.epath` path, `gs://` included):

    manifest.json                 written last, atomically: a folder without one is incomplete, never read
    shard-00003-of-00016.tokens   the shard's token ids, little-endian uint16 (vocabularies up to 65,536) or uint32
    shard-00003-of-00016.docs     int64: where each of the shard's documents starts, in tokens from the shard start

Every document is written with the separator after it (the tokenizer's end of
document, or the encoded paragraph break for tokenizers without one); the
stream a reader sees drops a trailing separator the in-memory tokenizer never
wrote (`trim`), so the stream equals `tokenize_documents` of the same documents
token for token.

Why flat token files (and not ArrayRecord records): a training window is a
token range that may span documents and shards. A flat file reads any range
with one memory-mapped slice, no decompression and no per-record lookups, and
opening one is a `stat`; documents are recovered from the `.docs` index only
when document masking asks for them (figures: BENCHMARKS.md, "Data at scale").

`TokenStream` is what the pipeline reads: `len(stream)` tokens, `stream[a:b]`
int32 ids, `stream.document_ids(a, b)`; `open_cache` maps the shards lazily,
so opening a cache costs the same for 10 MB and 100 GB. `TokenStream.in_memory`
holds the tokens of documents tokenized on the spot (online chunks, folds).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from etils import epath

from lm.core.errors import DataError
from lm.data import local_files

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAILURES = "failures.json"


class CacheError(DataError):
  """A token cache that cannot be used as it is (unknown format, written for another source or tokenizer)."""


def cache_key(source: Mapping[str, Any], tokenizer: Mapping[str, Any]) -> str:
  """The folder name of a source's cache with a tokenizer: another source, split, field or tokenizer is
  another folder, so a cache can never be read for the wrong one. (File contents are checked by the
  manifest's fingerprint instead, so a changed corpus is noticed rather than silently missed.)"""
  described = json.dumps({"format": FORMAT_VERSION, "source": source, "tokenizer": tokenizer}, sort_keys=True)
  return hashlib.sha256(described.encode("utf-8")).hexdigest()[:24]


def dtype_for(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}"


# -- writing ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShardInfo:
  """What a worker wrote for one shard (its manifest entry)."""

  index: int
  name: str
  tokens: int
  documents: int
  chars: int
  texts: tuple[str, ...] = ()  # the files (or "documents a..b") it read: which had text (an empty file is an error)


def with_separators(ids: np.ndarray, lengths: np.ndarray, separator: np.ndarray, dtype: Any
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [sum(lengths) + len(lengths) * len(separator)] of `dtype`, document starts [len(lengths)]):
  the documents' ids (`encode_batch`'s output) each followed by `separator`, laid out with no Python loop.
  ValueError if an id does not fit `dtype`."""
  dtype = np.dtype(dtype)
  _check_fits(ids, dtype)
  _check_fits(np.asarray(separator), dtype)
  width = len(separator)
  ends = np.cumsum(lengths + width)
  starts = ends - lengths - width
  tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype)
  if not width:
    tokens[:] = ids
    return tokens, starts
  places = (starts + lengths)[:, None] + np.arange(width)  # [documents, width]: where the separators go
  text = np.ones(len(tokens), bool)
  text[places.ravel()] = False
  tokens[text] = ids
  tokens[places] = separator
  return tokens, starts


def _check_fits(ids: np.ndarray, dtype: np.dtype) -> None:
  if np.issubdtype(dtype, np.integer) and len(ids) and not np.can_cast(ids.dtype, dtype, "safe"):
    limit = np.iinfo(dtype)
    if int(ids.max()) > limit.max or int(ids.min()) < limit.min:
      raise ValueError(f"a token id of the tokenizer does not fit {dtype} (range {limit.min}..{limit.max})")


def encode_documents(documents: Iterable[str], tokenizer: Any, separator: np.ndarray, separator_chars: int,
                     dtype: Any = np.int64) -> tuple[np.ndarray, np.ndarray, int]:
  """(tokens [n] of `dtype`, document starts [d] int64, characters) of documents, each followed by
  `separator`."""
  pieces, starts, position, chars = [], [], 0, 0
  for batch in local_files.batched(documents):
    ids, lengths = tokenizer.encode_batch(batch)
    tokens, batch_starts = with_separators(ids, lengths, np.asarray(separator), dtype)
    pieces.append(tokens)
    starts.append(batch_starts + position)
    position += len(tokens)
    chars += sum(map(len, batch)) + len(batch) * separator_chars
  if not pieces:
    return np.zeros(0, dtype), np.zeros(0, np.int64), 0
  return np.concatenate(pieces), np.concatenate(starts).astype(np.int64), chars


_BATCH_CHARS = 1 << 20


def _slices(batch: Sequence[str]) -> Iterator[Sequence[str]]:
  """`batch` cut into runs of about _BATCH_CHARS characters (a run holds at least one document)."""
  max_chars = _BATCH_CHARS
  ends = np.cumsum(np.fromiter(map(len, batch), np.int64, len(batch)))
  first = 0
  while first < len(batch):
    before = int(ends[first - 1]) if first else 0
    last = max(first + 1, int(np.searchsorted(ends, before + max_chars, side="right")))
    yield batch[first:last]
    first = last


def write_shard(directory: epath.PathLike, index: int, count: int, batches: Iterable[Sequence[str]],
                tokenizer: Any, separator: np.ndarray, separator_chars: int, dtype: np.dtype) -> ShardInfo:
  """Encodes documents, given in lists (`local_files.read_document_batches`), into one shard's .tokens and
  .docs files, through the tokenizer's `encode_batch` about a million characters at a time (so a worker holds
  a few MB whatever the shard's size), overwriting a partial shard of a killed preparation; returns its
  counts. ValueError if an id does not fit `dtype`."""
  directory = epath.Path(directory)
  name = shard_name(index, count)
  separator = np.asarray(separator)
  starts: list[np.ndarray] = []
  position = chars = documents_written = 0
  with (directory / f"{name}.tokens").open("wb") as out:
    for batch in (run for documents in batches for run in _slices(documents)):
      ids, lengths = tokenizer.encode_batch(batch)
      tokens, batch_starts = with_separators(ids, lengths, separator, dtype)
      out.write(memoryview(tokens))
      starts.append(batch_starts + position)
      position += len(tokens)
      documents_written += len(batch)
      chars += sum(map(len, batch)) + len(batch) * separator_chars
  index_bytes = np.concatenate(starts).astype("<i8").tobytes() if starts else b""
  (directory / f"{name}.docs").write_bytes(index_bytes)
  return ShardInfo(index, name, position, documents_written, chars)


def write_manifest(directory: epath.PathLike, manifest: Mapping[str, Any]) -> None:
  """Writes manifest.json atomically (a temporary file renamed into place): it marks the cache complete."""
  directory = epath.Path(directory)
  temporary = directory / f".{MANIFEST}.tmp-{os.getpid()}"
  temporary.write_text(json.dumps(manifest, indent=1, sort_keys=True))
  temporary.replace(directory / MANIFEST)


def make_manifest(*, source: Mapping[str, Any], fingerprint: str, tokenizer: Mapping[str, Any], dtype: np.dtype,
                  separator: Sequence[int], trim: int, shards: Sequence[ShardInfo], prepared_by: Mapping[str, Any],
                  trim_chars: int = 0) -> dict[str, Any]:
  ordered = sorted(shards, key=lambda shard: shard.index)
  return {
      "format_version": FORMAT_VERSION,
      "source": dict(source),
      "fingerprint": fingerprint,
      "tokenizer": dict(tokenizer),
      "dtype": np.dtype(dtype).str,
      "separator": [int(token) for token in separator],
      "trim": int(trim),
      "shards": [{"name": s.name, "tokens": s.tokens, "documents": s.documents, "chars": s.chars} for s in ordered],
      "num_tokens": sum(s.tokens for s in ordered) - int(trim),
      "num_documents": sum(s.documents for s in ordered),
      "num_chars": sum(s.chars for s in ordered) - int(trim_chars),
      "prepared_by": dict(prepared_by),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


# -- reading ----------------------------------------------------------------------------------------------
class _RangeReader:
  """Random access to a file of fixed-size items, for paths numpy cannot memory-map (gs://, ...)."""

  def __init__(self, path: epath.Path, dtype: np.dtype, length: int):
    self.path, self.dtype, self.length = path, np.dtype(dtype), length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: slice) -> np.ndarray:
    start, stop, _ = index.indices(self.length)
    if stop <= start:
      return np.zeros(0, self.dtype)
    with self.path.open("rb") as file:
      file.seek(start * self.dtype.itemsize)
      data = file.read((stop - start) * self.dtype.itemsize)
    return np.frombuffer(data, self.dtype)


def _map(path: epath.Path, dtype: np.dtype, length: int) -> Any:
  if length == 0:
    return np.zeros(0, dtype)
  if isinstance(path, epath.Path) and str(path).startswith(("gs://", "s3://", "http")):
    return _RangeReader(path, dtype, length)
  return np.memmap(os.fspath(path), dtype=dtype, mode="r", shape=(length,))


class TokenStream:
  """A split's token stream as shards: `len()`, `[a:b]` (int32), `document_ids(a, b)`; module doc.

  shards: (tokens, document starts) pairs of array-likes, or callables that
  open them on first use (memory maps of a cache's files).
  """

  def __init__(self, shards: Sequence[Any], *, name: str, num_chars: int, trim: int = 0,
               documents_per_shard: Sequence[int] | None = None, tokens_per_shard: Sequence[int] | None = None):
    self.name = name
    self._shards = list(shards)
    self._opened: dict[int, tuple[Any, Any]] = {}
    if tokens_per_shard is None:
      tokens_per_shard = [len(self._shard(i)[0]) for i in range(len(self._shards))]
      documents_per_shard = [len(self._shard(i)[1]) for i in range(len(self._shards))]
    self._token_starts = np.concatenate([[0], np.cumsum(tokens_per_shard, dtype=np.int64)])
    self._document_starts = np.concatenate([[0], np.cumsum(documents_per_shard, dtype=np.int64)])
    self._length = int(self._token_starts[-1]) - int(trim)
    self.num_chars = int(num_chars)
    self.num_documents = int(self._document_starts[-1])

  @classmethod
  def in_memory(cls, tokens: np.ndarray, document_starts: np.ndarray, *, name: str, num_chars: int,
                trim: int = 0) -> TokenStream:
    return cls([(np.asarray(tokens), np.asarray(document_starts, np.int64))], name=name, num_chars=num_chars,
               trim=trim)

  def _shard(self, index: int) -> tuple[Any, Any]:
    if index not in self._opened:
      shard = self._shards[index]
      self._opened[index] = shard() if callable(shard) else shard
    return self._opened[index]

  def __len__(self) -> int:
    return self._length

  @property
  def chars_per_token(self) -> float:
    return max(self.num_chars, 1) / max(self._length, 1)

  def _pieces(self, start: int, stop: int):
    """(shard, start in shard, stop in shard) covering [start, stop)."""
    shard = int(np.searchsorted(self._token_starts, start, side="right")) - 1
    while start < stop:
      base = int(self._token_starts[shard])
      end = min(stop, int(self._token_starts[shard + 1]))
      if end > start:
        yield shard, start - base, end - base
      start = max(start, end)
      shard += 1

  def __getitem__(self, index: slice) -> np.ndarray:
    if not isinstance(index, slice) or index.step not in (None, 1):
      raise TypeError("a TokenStream is read by contiguous slices: stream[start:stop]")
    start, stop, _ = index.indices(self._length)
    if stop <= start:
      return np.zeros(0, np.int32)
    pieces = [np.asarray(self._shard(shard)[0][a:b]) for shard, a, b in self._pieces(start, stop)]
    return (pieces[0] if len(pieces) == 1 else np.concatenate(pieces)).astype(np.int32)

  def document_ids(self, start: int, stop: int) -> np.ndarray:
    """[stop - start] int64: the index of the document each token of [start, stop) belongs to."""
    out = []
    for shard, a, b in self._pieces(start, stop):
      starts = self._shard(shard)[1]
      first = int(np.searchsorted(starts, a, side="right")) - 1
      last = int(np.searchsorted(starts, b, side="left"))  # documents starting before b
      ids = np.zeros(b - a, np.int64)
      inside = np.asarray(starts[first + 1:last], np.int64) - a  # documents starting inside (a, b)
      ids[inside] = 1
      out.append(np.cumsum(ids) + first + int(self._document_starts[shard]))
    return np.concatenate(out) if out else np.zeros(0, np.int64)

  def __repr__(self) -> str:
    return f"TokenStream({self.name!r}, {self._length:,} tokens, {self.num_documents:,} documents)"


def read_manifest(directory: epath.PathLike) -> dict[str, Any] | None:
  """The manifest of a cache folder, or None if the folder holds no complete cache."""
  path = epath.Path(directory) / MANIFEST
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise CacheError(f"The token cache manifest {path} is unreadable ({error}). Fix: delete the folder "
                     f"{directory}; the next run (or --mode prepare) prepares the cache again.") from None


def check_manifest(directory: epath.PathLike, manifest: Mapping[str, Any], tokenizer: Mapping[str, Any] | None
                   ) -> None:
  """Raises CacheError if the manifest is of an unknown format or was written with another tokenizer."""
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise CacheError(
        f"The token cache {directory} has format version {version!r}; this lm reads version {FORMAT_VERSION}. "
        f"Fix: delete the folder (the next run prepares it again in this version), or set data.cache_dir to "
        "another folder.")
  if tokenizer is not None and manifest.get("tokenizer") != dict(tokenizer):
    raise CacheError(
        f"The token cache {directory} was written with another tokenizer ({manifest.get('tokenizer')}) than this "
        f"run's ({dict(tokenizer)}). Fix: prepare the source with this run's tokenizer (drop the cache from "
        "the source, or set data.tokenizer to the cache's).")


def open_cache(directory: epath.PathLike, *, name: str, tokenizer: Mapping[str, Any] | None = None) -> TokenStream:
  """The stream of a complete cache; CacheError if it is incomplete, of another format or tokenizer.

  Costs one small JSON read: the shards are memory-mapped when first read.
  """
  directory = epath.Path(directory)
  manifest = read_manifest(directory)
  if manifest is None:
    raise CacheError(f"{directory} holds no complete token cache (no {MANIFEST}). Fix: run --mode prepare for "
                     "this source, or delete the folder so the next run prepares it.")
  check_manifest(directory, manifest, tokenizer)
  dtype = np.dtype(manifest["dtype"])

  def opener(shard: Mapping[str, Any]):
    def open_shard():
      return (_map(directory / f"{shard['name']}.tokens", dtype, shard["tokens"]),
              _map(directory / f"{shard['name']}.docs", np.dtype("<i8"), shard["documents"]))
    return open_shard

  shards = manifest["shards"]
  return TokenStream([opener(shard) for shard in shards], name=name, num_chars=manifest["num_chars"],
                     trim=manifest["trim"], tokens_per_shard=[s["tokens"] for s in shards],
                     documents_per_shard=[s["documents"] for s in shards])
