"""The watched-folder stream: every complete file or TFDS folder dropped into a folder is a chunk.

``DirectoryStream`` (``config.online.stream = "dir:PATH"``) offers each file
(``.txt``, ``.jsonl``, ``.tsv``) or finished TFDS dataset folder directly inside
the folder as one chunk, id = its name, in modification-time order, once it has
stopped changing (settled). Names that writers use while a file is still being
written, and hidden/private names, are ignored. ``quarantine`` moves a chunk
that cannot be read out of the watched folder into the workdir, with the reason
beside it.

The base types (``Stream``, ``Chunk``, ``ChunkError``, ``StreamError``) live in
``lm.data.stream_base``; ``lm.data.stream`` re-exports ``DirectoryStream`` and ``quarantine``.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path

import tensorflow_datasets as tfds

from lm.core.errors import DataError
from lm.data import local_files, pairs, sources
from lm.data.stream_base import Chunk, ChunkError, Stream, StreamError, as_set

# Names that writers use while a file is still being written (then renamed), and
# hidden/private names (.DS_Store, _SUCCESS, editor swap files).
_IGNORED_PREFIXES = (".", "_")
_IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~")
# Preference pairs the server exports beside its text chunks (lm.serve.feedback); any .jsonl or .tsv file whose
# records have "chosen" and "rejected" is a preference chunk too (`lm.data.pairs`).
PREFERENCE_SUFFIX = ".preferences.jsonl"
_TFDS_INFO_FILE = "dataset_info.json"
_TFDS_RECORD_MARKERS = (".array_record", ".tfrecord")
_TFDS_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
_QUARANTINE_DIR = "quarantine"
_REASON_SUFFIX = ".reason.txt"


@dataclasses.dataclass
class _Observation:
  signature: tuple  # what "unchanged" compares: sizes and mtimes
  since: float  # clock time at which this signature was first seen


class DirectoryStream(Stream):
  """A watched folder: each complete file or finished TFDS folder directly inside it is a chunk.

  * Chunk id = the file or folder name; order = modification time, then name.
  * Files: ``.txt``, ``.jsonl``, ``.tsv`` (read with ``lm.data.local_files``); a file
    of any other type is offered too and raises ``ChunkError``, so it is quarantined
    with a reason instead of being silently ignored forever.
  * TFDS folders (e.g. written by ``tfds build``): a folder holding
    ``dataset_info.json`` and record files, or holding one ``VERSION`` folder
    (``1.0.0``) that does. Every split is read, in the dataset's split order.
  * Preference chunks: a ``.jsonl`` file whose first record has "chosen" and
    "rejected" fields, or a ``.tsv`` file whose header names them (the server's
    ``*.preferences.jsonl`` exports), is read as {"prompt", "chosen", "rejected"}
    records (``lm.data.pairs``): ``Chunk.preferences``.
  * Ignored: names starting with "." or "_", names ending in .tmp, .part,
    .partial, .crdownload or "~" (write such a name, then rename it when
    complete), and folders that are not finished TFDS folders.
  * A file is taken only once its size and mtime have stayed the same for
    ``settle_seconds`` across polls, measured with ``clock``. The stream remembers
    what each poll saw, so an entry seen for the first time (including after a
    restart) is not ready until a later poll, unless ``settle_seconds == 0``.
  """

  def __init__(self, path: str | os.PathLike, *, domain: str | None = None, text_field: str = "text",
               settle_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic):
    self.path = Path(path).expanduser().resolve()
    if not self.path.is_dir():
      what = "is not a folder" if self.path.exists() else "does not exist"
      raise StreamError(
          f"Watched folder {self.path} {what}. Fix: create it (mkdir -p {self.path}) or point "
          "config.online.stream at an existing folder, as dir:PATH.")
    if settle_seconds < 0:
      raise DataError(f"settle_seconds={settle_seconds} is negative. Fix: use 0 (take files at once) or more.")
    self.domain = domain or self.path.name
    self.text_field = text_field
    self.settle_seconds = settle_seconds
    self._clock = clock
    self._observed: dict[str, _Observation] = {}

  def describe(self) -> str:
    return (f"watched folder {self.path} (domain {self.domain!r}; a .txt/.jsonl/.tsv file or TFDS folder is "
            f"taken once unchanged for {self.settle_seconds:g}s)")

  def exhausted(self, consumed: Collection[str]) -> bool:
    del consumed  # A watched folder may always receive another file.
    return False

  def next_chunk(self, consumed: Collection[str]) -> Chunk | None:
    consumed = as_set(consumed)
    now = self._clock()
    candidates = []  # (mtime_ns, name, path)
    observed: dict[str, _Observation] = {}
    for entry in self._list():
      if _is_ignored(entry.name):
        continue
      if entry.name in consumed:
        # Not looked at (a folder may hold thousands of old chunks), but remembered:
        # if a caller's consumed set shrinks, the settled state must still hold.
        if entry.name in self._observed:
          observed[entry.name] = self._observed[entry.name]
        continue
      try:
        signature, mtime_ns = _signature(Path(entry.path))
      except FileNotFoundError:  # removed or renamed since the listing: not there any more
        continue
      if signature is None:  # a folder that is not (yet) a finished TFDS folder
        continue
      previous = self._observed.get(entry.name)
      observed[entry.name] = (previous if previous is not None and previous.signature == signature
                              else _Observation(signature, now))
      candidates.append((mtime_ns, entry.name, Path(entry.path)))
    # Forgetting vanished names keeps this map as small as the folder.
    self._observed = observed
    for _, name, path in sorted(candidates):
      if now - observed[name].since < self.settle_seconds:
        continue
      chunk = self._read(name, path)
      if chunk is not None:
        return chunk
    return None

  def _list(self) -> list[os.DirEntry]:
    try:
      with os.scandir(self.path) as entries:
        return list(entries)
    except (FileNotFoundError, NotADirectoryError):
      raise StreamError(
          f"Watched folder {self.path} no longer exists. Fix: restore or recreate it and restart; "
          "chunks already consumed are recorded in the checkpoint and will not be trained on again.") from None
    except PermissionError:
      raise StreamError(
          f"Watched folder {self.path} cannot be read (permission denied). Fix: give this process read "
          "and execute permission on it (chmod u+rx) and restart; chunks already consumed are recorded "
          "in the checkpoint.") from None

  def _read(self, name: str, path: Path) -> Chunk | None:
    """The chunk at ``path``; None if it vanished since the listing."""
    try:
      if path.is_dir():
        documents = _read_tfds_folder(path, self.text_field)
      elif _holds_preferences(path):
        return Chunk(id=name, domain=self.domain, documents=[], path=str(path),
                     preferences=pairs.read_records([path], pairs.PREFERENCE_FIELDS))
      else:
        documents = self._read_file(path)
    except FileNotFoundError:
      if path.exists():  # something inside it is missing: the chunk is broken, not gone
        raise ChunkError(f"Chunk {name!r} ({path}) is incomplete: a file inside it is missing. Fix: "
                         "write the folder elsewhere and move it in when finished.", chunk_id=name,
                         path=path) from None
      self._observed.pop(name, None)
      return None
    except DataError as error:
      raise ChunkError(f"Chunk {name!r} cannot be read: {error}", chunk_id=name, path=path) from None
    except OSError as error:
      raise ChunkError(
          f"Chunk {name!r} cannot be read: {path}: {error.strerror or error}. Fix: give this process read "
          "permission on it, or remove it.", chunk_id=name, path=path) from None
    return Chunk(id=name, domain=self.domain, documents=documents, path=str(path))

  def _read_file(self, path: Path) -> list[str]:
    if path.suffix.lower() not in local_files.SUPPORTED_EXTENSIONS:
      raise DataError(
          f"{path} has unsupported type {path.suffix or '(no extension)'!r}. Fix: drop .txt (paragraphs "
          "separated by blank lines), .jsonl (one JSON object per line) or .tsv (header row, then rows) "
          "files, or finished TFDS dataset folders; write other files under a name starting with '.' or '_'.")
    return list(local_files.read_documents(path, text_field=self.text_field))


def _is_ignored(name: str) -> bool:
  return name.startswith(_IGNORED_PREFIXES) or name.lower().endswith(_IGNORED_SUFFIXES)


def _holds_preferences(path: Path) -> bool:
  """Whether a file's first record (.jsonl) or header (.tsv) has the "chosen" and "rejected" fields."""
  suffix = path.suffix.lower()
  if path.name.lower().endswith(PREFERENCE_SUFFIX):
    return True
  if suffix not in (".jsonl", ".tsv"):
    return False
  with path.open("rb") as file:
    for line in file:
      if not line.strip():
        continue
      if suffix == ".tsv":
        return {"chosen", "rejected"} <= set(line.decode("utf-8", "replace").rstrip("\r\n").split("\t"))
      try:
        record = json.loads(line)
      except (ValueError, RecursionError):
        return False  # the text reader reports it, with the line
      return isinstance(record, dict) and "chosen" in record and "rejected" in record
  return False


def _signature(path: Path) -> tuple[tuple | None, int]:
  """``(signature, mtime_ns)`` of a directory entry; signature None: not a chunk (yet).

  A file's signature is its size and mtime; a TFDS folder's covers every file in it.
  """
  stat = path.stat()
  if not path.is_dir():
    return (stat.st_size, stat.st_mtime_ns), stat.st_mtime_ns
  try:
    data_dir = _tfds_data_dir(path)
  except PermissionError:  # cannot tell what it is; like any unfinished folder, not a chunk
    return None, stat.st_mtime_ns
  if data_dir is None:
    return None, stat.st_mtime_ns
  files = []
  for child in sorted(data_dir.iterdir()):
    child_stat = child.stat()
    files.append((child.name, child_stat.st_size, child_stat.st_mtime_ns))
  return (str(data_dir), tuple(files)), stat.st_mtime_ns


def _is_tfds_data_dir(path: Path) -> bool:
  if not (path / _TFDS_INFO_FILE).is_file():
    return False
  return any(marker in child.name for child in path.iterdir() for marker in _TFDS_RECORD_MARKERS)


def _tfds_data_dir(path: Path) -> Path | None:
  """The folder holding the TFDS files: ``path`` itself, or its newest finished ``VERSION`` folder."""
  if _is_tfds_data_dir(path):
    return path
  # `tfds build --data_dir=D` writes D/NAME/VERSION/; TFDS names unfinished ones
  # differently, so only a plain version folder counts.
  versions = [child for child in path.iterdir()
              if child.is_dir() and _TFDS_VERSION_RE.match(child.name) and _is_tfds_data_dir(child)]
  if not versions:
    return None
  return max(versions, key=lambda v: tuple(int(part) for part in v.name.split(".")))


def _read_tfds_folder(path: Path, text_field: str) -> list[str]:
  """Every document of every split of the TFDS dataset in ``path``, split after split."""
  data_dir = _tfds_data_dir(path)
  if data_dir is None:
    raise FileNotFoundError(path)  # it stopped being a finished folder since the listing
  info = json.loads((data_dir / _TFDS_INFO_FILE).read_text(encoding="utf-8"))
  file_format = info.get("fileFormat", "tfrecord")
  if file_format != "array_record":
    raise DataError(
        f"TFDS folder {data_dir} holds {file_format} files; only array_record is read here (no "
        "TensorFlow). Fix: rebuild it with `tfds build --file_format=array_record`.")
  try:
    with sources._quiet_tfds():  # pylint: disable=protected-access
      builder = tfds.builder_from_directory(str(data_dir))
      features = dict(builder.info.features.items())
      if not isinstance(features.get(text_field), tfds.features.Text):
        present = {name: type(feature).__name__ for name, feature in features.items()}
        raise DataError(
            f"TFDS folder {data_dir} has no text feature {text_field!r}; its features are {present}. "
            "Fix: set text_field (config.data.text_field) to one of its Text features, or rebuild it "
            "with that feature.")
      documents = []
      for split, split_info in builder.info.splits.items():
        if split_info.num_examples:
          records = builder.as_data_source(split=split)
          documents.extend(sources.TextSource(records, field=text_field, name=f"{data_dir}:{split}"))
  except DataError:
    raise
  # TFDS and array_record raise many types for damaged folders (ValueError,
  # RuntimeError, AssertionError, ...); any of them makes this one chunk unreadable,
  # which must not stop the stream.
  except Exception as error:  # pylint: disable=broad-except
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise DataError(
        f"TFDS folder {data_dir} cannot be opened ({type(error).__name__}: {first_line}). Fix: rebuild it "
        "with `tfds build --file_format=array_record`, and move it into the watched folder only when "
        "finished.") from error
  if not any(document.strip() for document in documents):
    raise DataError(f"TFDS folder {data_dir} holds no text (every split is empty). Fix: rebuild it with data.")
  return documents


# ----------------------------------------------------------------------------- quarantine


def quarantine(path: str | os.PathLike, workdir: str | os.PathLike, reason: str) -> Path:
  """Moves a bad chunk's file or folder into ``WORKDIR/quarantine/`` with ``NAME.reason.txt`` beside it.

  A name already there gets a numeric suffix (``a.txt`` -> ``a.1.txt``). Returns
  the new path. A path that no longer exists is not an error (the loop must go
  on): the would-be path is returned and nothing is written.
  Raises:
    DataError: the move itself failed (e.g. a read-only watched folder).
  """
  source = Path(path)
  folder = Path(workdir) / _QUARANTINE_DIR
  destination = folder / source.name
  for number in itertools.count(1):
    if not (destination.exists() or _reason_path(destination).exists()):
      break
    destination = folder / f"{Path(source.name).stem}.{number}{Path(source.name).suffix}"
  if not source.exists() and not source.is_symlink():
    return destination
  try:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(destination))
  except FileNotFoundError:
    if not source.exists():  # removed while we looked: nothing left to keep
      return destination
    raise
  except OSError as error:
    raise DataError(
        f"Cannot move {source} into quarantine {folder} ({error.strerror or error}). Fix: make the watched "
        "folder and the workdir writable, or remove the file by hand; its chunk is already marked "
        "consumed.") from None
  stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  _reason_path(destination).write_text(f"{reason}\n\nfrom: {source}\nquarantined: {stamp}\n", encoding="utf-8")
  return destination


def _reason_path(destination: Path) -> Path:
  return destination.with_name(destination.name + _REASON_SUFFIX)
