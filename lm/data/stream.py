"""Where an online-learning loop gets new data: streams of chunks with stable ids.

The online loop polls a stream for the next chunk of documents, trains on it and
records the chunk's id as consumed in its checkpoint. After a crash it restarts
with that set of ids, so a stream must (a) give every chunk an id that names the
same documents on every run and (b) offer chunks in a deterministic order; then
nothing is trained on twice and nothing is skipped. Three kinds exist:

  * ``DirectoryStream`` — a watched folder. Every file (``.txt``, ``.jsonl``,
    ``.tsv``) or finished TFDS dataset folder dropped into it is one chunk, id =
    its name, taken in modification-time order once it has stopped changing.
    Defined in ``lm.data.watch``; re-exported here.
  * ``FixedStream`` — a fixed corpus (``tfds:NAME[:SPLIT]`` or local files) cut
    into ``num_chunks`` contiguous chunks of about equal size in characters, for
    experiments that replay a known corpus as if it arrived over time.
  * ``IterableStream`` — texts from any iterable, for notebooks.

A chunk that cannot be read raises ``ChunkError``; the loop quarantines it
(``quarantine``, defined in ``lm.data.watch``; re-exported here) and marks it
consumed, so one bad file never stops the stream. A stream that is itself gone
raises ``StreamError``.

The base types live in ``lm.data.stream_base``, which both this module and
``lm.data.watch`` import; every name above is importable from here.
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import itertools
import re
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

from lm.core.errors import DataError
from lm.data import local_files, sources
from lm.data.stream_base import Chunk, ChunkError, Stream, StreamError, as_set
from lm.data.watch import DirectoryStream, quarantine

__all__ = [
    "DIRECTORY_PREFIX", "Chunk", "ChunkError", "DirectoryStream", "FixedStream", "IterableStream", "Stream",
    "StreamError", "parse_stream", "quarantine",
]

DIRECTORY_PREFIX = "dir:"
# A fixed corpus is cut at a document boundary, else a paragraph boundary, else a
# line or word boundary, if one lies within this fraction of a chunk's size from
# the exact cut point; so chunk sizes differ by at most about twice this fraction.
_CUT_WINDOW = 0.05
_CUT_SEPARATORS = (sources.PARAGRAPH_SEPARATOR, "\n", " ")


# ----------------------------------------------------------------------------- fixed corpus


@dataclasses.dataclass(frozen=True)
class _Span:
  """Chunk k: characters [start, end) of the corpus, found in documents [first_doc, end_doc)."""

  start: int
  end: int
  first_doc: int
  end_doc: int


class FixedStream(Stream):
  """A fixed corpus cut into ``num_chunks`` ordered, contiguous chunks of about equal size in characters.

  Cuts fall at a document boundary when one is near (many small documents are
  grouped whole), else inside a document, preferably at a paragraph break, so a
  corpus that is one huge document (tiny_shakespeare) is still cut evenly. The
  pieces of a cut document concatenate back to it exactly. The ids
  ``{domain}-{k:03d}-of-{num_chunks:03d}`` depend on the domain and
  ``num_chunks`` only; resuming with a changed corpus or ``num_chunks`` changes
  what they name.

  The corpus is read once at construction, to measure it and plan the cuts.
  """

  def __init__(self, source: str, *, num_chunks: int, split: str = "train", domain: str | None = None,
               text_field: str = "text", cache_dir: str | None = None):
    if not isinstance(num_chunks, int) or num_chunks < 1:
      raise DataError(f"num_chunks={num_chunks!r}: a fixed corpus needs at least 1 chunk. Fix: set "
                      "config.online.chunks to a positive integer.")
    kind, target, split_in_source = sources.parse_source(source)
    self.source = source
    self.split = split_in_source or split
    self.num_chunks = num_chunks
    self.domain = domain or _default_domain(kind, target)
    self._documents = sources.open_split(source, self.split, text_field=text_field, cache_dir=cache_dir)
    self._starts = _document_starts(self._documents)
    self._spans = self._plan()
    self.ids = [f"{self.domain}-{k + 1:03d}-of-{num_chunks:03d}" for k in range(num_chunks)]

  def describe(self) -> str:
    return (f"{self._documents.name} cut into {self.num_chunks} chunks of ~{self._starts[-1] // self.num_chunks:,} "
            f"characters (domain {self.domain!r})")

  def exhausted(self, consumed: Collection[str]) -> bool:
    consumed = as_set(consumed)
    return all(chunk_id in consumed for chunk_id in self.ids)

  def next_chunk(self, consumed: Collection[str]) -> Chunk | None:
    consumed = as_set(consumed)
    for index, chunk_id in enumerate(self.ids):
      if chunk_id not in consumed:
        return Chunk(id=chunk_id, domain=self.domain, documents=self._chunk_documents(index))
    return None

  def _chunk_documents(self, index: int) -> list[str]:
    span = self._spans[index]
    texts = self._documents.__getitems__(range(span.first_doc, span.end_doc))
    pieces = []
    for doc, text in zip(range(span.first_doc, span.end_doc), texts):
      start = self._starts[doc]
      pieces.append(text[max(span.start - start, 0):span.end - start])
    return pieces

  def _plan(self) -> list[_Span]:
    starts, num_docs = self._starts, len(self._documents)
    total = starts[-1]
    if total < self.num_chunks:
      raise DataError(
          f"{self._documents.name} holds {total} characters in {num_docs} documents: too few for "
          f"{self.num_chunks} chunks. Fix: set config.online.chunks to at most {max(total, 1)}, or use a "
          "larger corpus or split.")
    window = int(total / self.num_chunks * _CUT_WINDOW)
    cuts = [0]
    for k in range(1, self.num_chunks):
      cut = self._cut_near(k * total // self.num_chunks, window)
      # Cuts stay strictly increasing: the window is far smaller than a chunk.
      cuts.append(min(max(cut, cuts[-1] + 1), total - (self.num_chunks - k)))
    cuts.append(total)
    spans = []
    for k in range(self.num_chunks):
      start, end = cuts[k], cuts[k + 1]
      # A document belongs to every chunk its characters overlap; an empty one to
      # the chunk its position falls in (the last chunk for those at the very end).
      first_doc = min(bisect.bisect_right(starts, start, 1, num_docs + 1) - 1,
                      bisect.bisect_left(starts, start, 0, num_docs))
      end_doc = num_docs if k == self.num_chunks - 1 else bisect.bisect_left(starts, end, 0, num_docs)
      spans.append(_Span(start, end, first_doc, end_doc))
    return spans

  def _cut_near(self, target: int, window: int) -> int:
    """A cut position near ``target``: a document boundary, else a separator inside the document."""
    starts = self._starts
    boundary = bisect.bisect_left(starts, target)
    nearest = min((starts[i] for i in (boundary - 1, boundary) if 0 <= i < len(starts)),
                  key=lambda position: abs(position - target))
    if abs(nearest - target) <= window:
      return nearest
    doc = bisect.bisect_right(starts, target) - 1
    text, offset = self._documents[doc], starts[doc]
    local = target - offset
    low, high = max(local - window, 1), min(local + window, len(text) - 1)
    for separator in _CUT_SEPARATORS:
      before = text.rfind(separator, max(low - len(separator), 0), local)
      after = text.find(separator, local, high)
      # Cut after the separator (and any run of it), so the next piece starts with text.
      found = [_after_run(text, position, separator) for position in (before, after) if position >= 0]
      found = [position for position in found if low <= position <= high]
      if found:
        return offset + min(found, key=lambda position: abs(position - local))
    return target


def _after_run(text: str, position: int, separator: str) -> int:
  end = position + len(separator)
  while text.startswith(separator[-1], end):
    end += 1
  return end


def _document_starts(documents: sources.TextSource) -> array.array:
  """Character offset of each document in the corpus, plus the total at the end."""
  starts = array.array("q", [0])  # int64: compact for corpora of millions of documents
  for text in documents:
    starts.append(starts[-1] + len(text))
  return starts


def _default_domain(kind: str, target: str) -> str:
  """The dataset name; for a local file named like a split (sst2/train.tsv), its folder's name."""
  if kind == "tfds":
    return re.split(r"[/:]", target, maxsplit=1)[0]
  path = Path(target).expanduser().resolve()
  if path.is_dir():
    return path.name
  stem = path.stem
  head, _, tail = stem.rpartition(".")
  if stem.lower() in local_files.SPLIT_NAMES:
    return path.parent.name
  if head and tail.lower() in local_files.SPLIT_NAMES:  # ptb.valid.txt -> ptb
    return head
  return stem


# ----------------------------------------------------------------------------- iterable


class IterableStream(Stream):
  """Texts from an iterable, grouped into chunks of ``chunk_size`` documents (for notebooks).

  Texts are pulled lazily, one chunk at a time. Ids ``{domain}-{k:05d}`` count
  chunks from the start of the iterable, so resuming after a restart needs a
  re-iterable, deterministic source (a list, or a function that regenerates the
  same texts): the new stream re-reads the consumed chunks and skips them. A
  one-shot generator cannot be resumed. ``next_chunk`` blocks while the iterable
  does, and returns None only once the iterable is used up.
  """

  def __init__(self, texts: Iterable[str], *, domain: str, chunk_size: int):
    if not domain:
      raise DataError("IterableStream needs a domain name. Fix: pass domain='my-data'.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
      raise DataError(f"chunk_size={chunk_size!r}: a chunk needs at least 1 document. Fix: pass a positive "
                      "integer.")
    self.domain = domain
    self.chunk_size = chunk_size
    self._texts: Iterator[str] = iter(texts)
    self._next_index = 0  # index of the next chunk to pull from the iterable
    self._used_up = False
    # Pulled but not yet seen consumed: a repeated call must return the same chunk.
    self._pending: dict[int, list[str] | ChunkError] = {}

  def describe(self) -> str:
    return f"iterable of texts in chunks of {self.chunk_size} documents (domain {self.domain!r})"

  def chunk_id(self, index: int) -> str:
    return f"{self.domain}-{index + 1:05d}"

  def exhausted(self, consumed: Collection[str]) -> bool:
    return self._first_unconsumed(as_set(consumed)) is None

  def next_chunk(self, consumed: Collection[str]) -> Chunk | None:
    index = self._first_unconsumed(as_set(consumed))
    if index is None:
      return None
    documents = self._pending[index]
    if isinstance(documents, ChunkError):
      raise documents
    return Chunk(id=self.chunk_id(index), domain=self.domain, documents=documents)

  def _first_unconsumed(self, consumed: Collection[str]) -> int | None:
    for index in sorted(self._pending):
      if self.chunk_id(index) in consumed:
        del self._pending[index]  # never asked for again: free it
      else:
        return index
    while not self._used_up:
      index, texts = self._next_index, list(itertools.islice(self._texts, self.chunk_size))
      if not texts:
        self._used_up = True
        break
      self._next_index += 1
      if self.chunk_id(index) in consumed:
        continue
      bad = next((position for position, text in enumerate(texts) if not isinstance(text, str)), None)
      if bad is None:
        self._pending[index] = texts
      else:
        self._pending[index] = ChunkError(
            f"Chunk {self.chunk_id(index)!r}: item {index * self.chunk_size + bad} of the iterable is a "
            f"{type(texts[bad]).__name__}, not a str. Fix: yield text strings (decode bytes, take the "
            "text field of records).", chunk_id=self.chunk_id(index))
      return index
    return None


# ----------------------------------------------------------------------------- config


def parse_stream(spec: str, *, num_chunks: int, domain: str | None = None, split: str = "train",
                 text_field: str = "text", cache_dir: str | None = None, settle_seconds: float = 2.0) -> Stream:
  """The stream named by ``config.online.stream``.

  ``dir:PATH`` is a watched folder (``DirectoryStream``); ``tfds:NAME[:SPLIT]`` or a
  path to a .txt/.jsonl/.tsv file or folder is a fixed corpus cut into
  ``num_chunks`` chunks (``FixedStream``). An empty ``domain`` means: derive it.
  """
  spec = (spec or "").strip()
  if not spec:
    raise DataError("config.online.stream is empty: set it to dir:PATH, tfds:NAME[:SPLIT] or a file path")
  if spec.startswith(DIRECTORY_PREFIX):
    path = spec[len(DIRECTORY_PREFIX):]
    if not path:
      raise DataError(f"Stream {spec!r} names no folder. Fix: write dir:PATH, e.g. dir:/data/incoming.")
    return DirectoryStream(path, domain=domain or None, text_field=text_field,
                                 settle_seconds=settle_seconds)
  return FixedStream(spec, num_chunks=num_chunks, split=split, domain=domain or None, text_field=text_field,
                     cache_dir=cache_dir)
