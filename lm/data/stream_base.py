"""The base types of online data streams: a `Stream` offers `Chunk`s with stable ids (`lm.data.stream`).

Kept apart from the streams themselves so that the fixed-corpus and iterable
streams (`lm.data.stream`) and the watched folder (`lm.data.watch`) import
these types, not each other.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Collection

from lm.core.errors import DataError


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One unit of new data: the loop trains on it, then records ``id`` as consumed."""

  id: str  # stable across restarts: the same id always names the same documents
  domain: str  # the stream's domain name
  documents: list[str]
  path: str | None = None  # the file or folder it came from (directory streams), for quarantine
  # A preference chunk (records with "chosen" and "rejected"): its (record, "file:line") pairs; documents is empty.
  preferences: list[tuple[dict[str, str], str]] | None = None


class ChunkError(DataError):
  """A chunk that cannot be read. The loop quarantines it and marks it consumed."""

  def __init__(self, message: str, *, chunk_id: str, path: str | os.PathLike | None = None):
    super().__init__(message)
    self.chunk_id = chunk_id
    self.path = None if path is None else str(path)

  def __reduce__(self):  # keyword-only arguments: the default pickling would drop them
    return _rebuild_chunk_error, (str(self), self.chunk_id, self.path)


def _rebuild_chunk_error(message: str, chunk_id: str, path: str | None) -> ChunkError:
  return ChunkError(message, chunk_id=chunk_id, path=path)


class StreamError(DataError):
  """The stream itself is broken (e.g. the watched folder disappeared): no chunk can come."""


class Stream(abc.ABC):
  """An ordered source of chunks with stable ids; see the module docstring."""

  domain: str

  @abc.abstractmethod
  def next_chunk(self, consumed: Collection[str]) -> Chunk | None:
    """The first chunk, in the stream's order, whose id is not in ``consumed`` and that is ready now.

    Returns None when no such chunk is ready yet.
    Raises:
      ChunkError: that chunk cannot be read (quarantine it and add its id to ``consumed``).
      StreamError: the stream is gone.
    """

  @abc.abstractmethod
  def exhausted(self, consumed: Collection[str]) -> bool:
    """True when no chunk will ever come again."""

  @abc.abstractmethod
  def describe(self) -> str:
    """One line for logs: what the stream reads."""

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.describe()})"


def as_set(consumed: Collection[str]) -> Collection[str]:
  # Membership is tested once per candidate chunk; a list of thousands of ids would make that slow.
  return consumed if isinstance(consumed, (set, frozenset, dict)) else set(consumed)
