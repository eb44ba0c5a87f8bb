"""Where text comes from: TFDS catalog datasets and local files, both read through TFDS.

A source string names the data:

  * ``tfds:NAME``, ``tfds:NAME:SPLIT``, ``tfds:NAME/CONFIG:VERSION:SPLIT`` — a dataset
    from the TFDS catalog (or any dataset prepared under ``$TFDS_DATA_DIR``).
  * a path to a ``.txt``, ``.jsonl`` or ``.tsv`` file, or to a folder of such files.
    Local files are prepared once into ``array_record`` by the project's own TFDS
    builder, in a cache keyed on the files, so both kinds are read the same way:
    random access, no TensorFlow.

Every split string may use TFDS slicing (``train[:90%]``, ``train[90%:]``,
``validation+test``); it is passed through to TFDS.

A document is one TFDS example: a paragraph of a ``.txt`` file, one line of a
``.jsonl`` file, one row of a ``.tsv`` file. Joining the documents of a ``.txt``
file with ``PARAGRAPH_SEPARATOR`` restores its text (up to runs of blank lines).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from lm.data import local_files
from lm.core.errors import DataError  # re-exported: callers catch sources.DataError

try:  # POSIX only; without it, concurrent preparation falls back to TFDS's atomic rename.
  import fcntl
except ImportError:  # pragma: no cover
  fcntl = None

PARAGRAPH_SEPARATOR = "\n\n"
# Bump when parsing rules change, so caches prepared under the old rules are not reused.
_PARSER_VERSION = 1
_CACHE_ENV = "LM_DATA_CACHE"
_DEFAULT_CACHE_DIR = "~/.cache/lm/tfds"
_LOCAL_FEATURE = "text"
_LOCAL_LABEL = "label"
_LOCAL_WHERE = "where"  # "file:line" of each labeled row, for error messages
_READ_CHUNK = 1024  # documents per batched read when iterating
_VERSION_RE = re.compile(r"^(\d+(\.(\d+|\*)){0,2}|\*)$")


class TextSource:
  """Random access over the documents of one split, each a decoded ``str``.

  Wraps a TFDS data source (``ArrayRecordDataSource``); indexing reads one record.
  Reading many at once through ``__getitems__`` (or iterating) is ~10x faster per
  document, because TFDS decodes a batch in one call.
  """

  def __init__(self, records: Sequence[Mapping[str, Any]], *, field: str, name: str,
               info: Mapping[str, Any] | None = None):
    self._records = records
    self._field = field
    self.name = name
    self.info = dict(info or {})  # what TFDS says of the split: version, num_examples, num_bytes

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> str:
    length = len(self._records)
    if index < -length or index >= length:
      raise IndexError(f"document {index} out of range for {self.name} ({length} documents)")
    return self._decode(self._records[index % length])

  def __getitems__(self, indices: Sequence[int]) -> list[str]:
    """Documents at ``indices``, read in one batch."""
    indices = [int(index) for index in indices]
    batched_read = getattr(self._records, "__getitems__", None)
    rows = batched_read(indices) if batched_read else [self._records[i] for i in indices]
    return [self._decode(row) for row in rows]

  # Grain's batched-read protocol (SupportsBatchedReadRandomAccessDataSource) uses this name.
  _getitems = __getitems__

  def __iter__(self) -> Iterator[str]:
    for start in range(0, len(self), _READ_CHUNK):
      yield from self.__getitems__(range(start, min(start + _READ_CHUNK, len(self))))

  def __repr__(self) -> str:
    return f"TextSource({self.name!r}, {len(self)} documents)"

  def _decode(self, row: Mapping[str, Any]) -> str:
    value = row[self._field]  # a Text feature: open_split checked
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _as_str(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return str(value.item() if hasattr(value, "item") else value)


class LabeledSource(TextSource):
  """A TextSource whose documents also carry a label (`open_split(..., label_field=...)`).

  Indexing and iterating still give the texts (tokenizers are trained on them);
  `labels()` gives every document's label as a string, `where(i)` where
  document i came from (``dev.tsv:17`` for local files), for error messages.
  """

  def __init__(self, records: Sequence[Mapping[str, Any]], *, field: str, name: str, label_field: str,
               label_names: Sequence[str] | None = None, where_field: str | None = None,
               info: Mapping[str, Any] | None = None):
    super().__init__(records, field=field, name=name, info=info)
    self._label_field = label_field
    self._label_names = list(label_names) if label_names else None  # a TFDS ClassLabel's names
    self._where_field = where_field
    self._labels: list[str] | None = None

  def _label(self, row: Mapping[str, Any]) -> str:
    value = row[self._label_field]
    if self._label_names is not None:
      return self._label_names[int(value)]
    return _as_str(value).strip()

  def labels(self) -> list[str]:
    """Every document's label, in order (read once: classes, class weights and examples all need them)."""
    if self._labels is None:
      self._labels = self._read_labels()
    return self._labels

  def _read_labels(self) -> list[str]:
    out: list[str] = []
    for start in range(0, len(self), _READ_CHUNK):
      indices = list(range(start, min(start + _READ_CHUNK, len(self))))
      batched_read = getattr(self._records, "__getitems__", None)
      rows = batched_read(indices) if batched_read else [self._records[i] for i in indices]
      out.extend(self._label(row) for row in rows)
    return out

  def where(self, index: int) -> str:
    """Where document `index` was read from: ``file:line`` for local files, ``name[index]`` otherwise."""
    if self._where_field is not None:
      return _as_str(self._records[index][self._where_field])
    return f"{self.name}[{index}]"


def parse_source(source: str) -> tuple[str, str, str | None]:
  """Splits a source string into ``(kind, target, split or None)``.

  ``kind`` is ``"tfds"`` (target: the name TFDS accepts, e.g. ``"wmt/de-en:1.0.0"``)
  or ``"local"`` (target: the path). A local path may carry a split after a colon
  (``corpus.txt:train[:90%]``) only when the part before the colon exists; paths
  that do not exist are returned whole, so ``open_split`` reports them.
  """
  if source.startswith("tfds:"):
    name, version, split = source[len("tfds:") :], None, None
    if ":" in name:
      name, rest = name.split(":", 1)
      head, _, tail = rest.partition(":")
      if _VERSION_RE.match(head):
        version, split = head, tail or None
      else:
        split = rest
    if not name:
      raise DataError(f"Source {source!r} names no dataset. Fix: write tfds:NAME, e.g. tfds:tiny_shakespeare.")
    return "tfds", f"{name}:{version}" if version else name, split
  if not Path(source).expanduser().exists():
    for position, char in enumerate(source):
      if char == ":" and position > 0 and Path(source[:position]).expanduser().exists():
        return "local", source[:position], source[position + 1 :] or None
  return "local", source, None


def open_split(source: str, split: str, *, text_field: str = "text",
               cache_dir: str | None = None, label_field: str | None = None) -> TextSource:
  """Opens one split of ``source`` for random access.

  Args:
    source: ``tfds:NAME[...]`` or a local path (see the module docstring). A split
      written into the source string is ignored here; callers that honour it read
      it with ``parse_source``.
    split: split name, TFDS slicing allowed (``train[:90%]``).
    text_field: the TFDS feature, JSONL field or TSV column holding the text.
    cache_dir: where local files are prepared; default ``$LM_DATA_CACHE`` or
      ``~/.cache/lm/tfds``. TFDS catalog data is read from ``$TFDS_DATA_DIR``.
    label_field: also read each document's label from this TSV column / JSONL
      field / TFDS feature (a ClassLabel, a Text or an integer); returns a
      ``LabeledSource``.
  Raises:
    DataError: the source, split or files are unusable; the message says how to fix it.
  """
  kind, target, _ = parse_source(source)
  if kind == "tfds":
    builder = _catalog_builder(target)
    features = dict(builder.info.features.items())
    if not isinstance(features.get(text_field), tfds.features.Text):
      present = {name: type(feature).__name__ for name, feature in features.items()}
      raise DataError(
          f"TFDS dataset {target!r} has no text feature {text_field!r}; its features are {present}. "
          "Fix: pass text_field= naming one of its Text features.")
    labels: dict[str, Any] = {}
    if label_field is not None:
      feature = features.get(label_field)
      if isinstance(feature, tfds.features.ClassLabel):
        labels = dict(label_field=label_field, label_names=feature.names)
      elif isinstance(feature, tfds.features.Text) or (
          isinstance(feature, tfds.features.Tensor) and feature.shape == () and feature.dtype.is_integer):
        labels = dict(label_field=label_field)
      else:
        present = {name: type(feature).__name__ for name, feature in features.items()}
        raise DataError(f"TFDS dataset {target!r} has no label feature {label_field!r} (a ClassLabel, Text or "
                        f"integer); its features are {present}. Fix: set config.data.label_field to one of them.")
    return _open_builder_split(builder, split, text_field, label=f"tfds:{target}", **labels)
  root = local_files.resolve_path(target)
  builder = _prepared_local_builder(local_files.discover_splits(root), text_field, _cache_root(cache_dir),
                                    label_field)
  labels = {} if label_field is None else dict(label_field=_LOCAL_LABEL, where_field=_LOCAL_WHERE)
  return _open_builder_split(builder, split, _LOCAL_FEATURE, label=str(root), **labels)


def list_splits(source: str, *, cache_dir: str | None = None) -> list[str]:
  """Names of the splits ``source`` provides (local files are not prepared for this)."""
  del cache_dir  # Splits of local files follow from their names; nothing is read.
  kind, target, _ = parse_source(source)
  if kind == "tfds":
    return list(_catalog_builder(target).info.splits.keys())
  splits = local_files.discover_splits(local_files.resolve_path(target))
  return sorted(splits, key=lambda s: local_files.SPLIT_NAMES.index(s) if s in local_files.SPLIT_NAMES else len(local_files.SPLIT_NAMES))


# ----------------------------------------------------------------------------- TFDS


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
  """Hides TFDS's per-folder warnings and progress bars; restores them afterwards."""
  absl_logger = logging.getLogger("absl")
  previous_level = absl_logger.level
  progress_was_on = getattr(tfds.core.utils.tqdm_utils, "_active", True)
  absl_logger.setLevel(logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    absl_logger.setLevel(previous_level)
    tfds.display_progress_bar(progress_was_on)


def _catalog_builder(name: str) -> tfds.core.DatasetBuilder:
  """A prepared TFDS builder for ``name``; never downloads."""
  data_dir = os.environ.get("TFDS_DATA_DIR") or None  # read now: TFDS reads it once, at import
  shown_dir = data_dir or f"{tfds.core.constants.DATA_DIR} (TFDS default; TFDS_DATA_DIR is not set)"
  try:
    with _quiet_tfds():
      builder = tfds.builder(name, data_dir=data_dir)
      is_prepared = builder.is_prepared()
  except tfds.core.registered.DatasetNotFoundError:
    # TFDS's own message lists every dataset in the catalog; say only what helps.
    raise DataError(
        f"TFDS dataset {name!r} is unknown: it is neither in the TFDS catalog nor prepared in the "
        f"TFDS data dir {shown_dir}. Fix: check the name (https://www.tensorflow.org/datasets/catalog); "
        "on a machine without internet, set TFDS_DATA_DIR to a folder holding prepared data "
        "(<dir>/<name>/<version>/dataset_info.json).") from None
  except (AssertionError, ValueError, ImportError) as error:  # bad config or version, missing extra
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".: ")
    raise DataError(
        f"Cannot open TFDS dataset {name!r}: {first_line}. Fix: check the config and version "
        "in the name (tfds:NAME/CONFIG:VERSION) against the catalog or the TFDS data dir.") from error
  if not is_prepared:
    raise DataError(
        f"TFDS dataset {name!r} is known but not prepared in the TFDS data dir {shown_dir} "
        f"(looked in {builder.data_dir}). Fix: set TFDS_DATA_DIR to a folder holding it prepared, or "
        "prepare it once on a machine with internet (`pip install tensorflow-cpu` may be needed): "
        f"tfds.builder({name!r}).download_and_prepare(file_format='array_record').")
  return builder


def _open_builder_split(builder: tfds.core.DatasetBuilder, split: str, field: str, *,
                        label: str, **labeled: Any) -> TextSource:
  """Checks ``split`` against the builder's splits and opens it; ``label`` names the source in errors."""
  available = list(builder.info.splits.keys())
  try:
    num_examples = builder.info.splits[split].num_examples
  except (ValueError, KeyError, AssertionError) as error:
    reason = (str(error).strip().splitlines() or ["unknown split"])[-1].rstrip(". ")
    raise DataError(
        f"Split {split!r} is not available for {label} ({reason}). Available splits: {available}. "
        "Fix: use one of them, optionally sliced to hold out a part, e.g. 'train[:90%]' and "
        "'train[90%:]'.") from None
  if num_examples == 0:
    sizes = {s: builder.info.splits[s].num_examples for s in available}
    raise DataError(
        f"Split {split!r} of {label} selects no documents (documents per split: {sizes}). "
        "Fix: widen the slice; percent slices pick whole documents, so a split with one document "
        "cannot be sliced by percent.")
  with _quiet_tfds():
    records = builder.as_data_source(split=split)
  split_info = builder.info.splits[split]
  info = {"version": str(builder.info.version), "num_examples": int(split_info.num_examples),
          "num_bytes": int(getattr(split_info, "num_bytes", 0) or 0) or None}
  if labeled:
    return LabeledSource(records, field=field, name=f"{label}:{split}", info=info, **labeled)
  return TextSource(records, field=field, name=f"{label}:{split}", info=info)


# ----------------------------------------------------------------------------- local-file builder


def _cache_root(cache_dir: str | None) -> Path:
  return Path(cache_dir or os.environ.get(_CACHE_ENV) or _DEFAULT_CACHE_DIR).expanduser().resolve()


def _fingerprint(split_files: Mapping[str, Sequence[Path]], text_field: str, label_field: str | None = None) -> str:
  """Names the cache entry; any edit to an input file (size or mtime) changes it."""
  entries = []
  for split, files in sorted(split_files.items()):
    for path in files:
      stat = path.stat()
      entries.append([split, str(path), stat.st_size, stat.st_mtime_ns])
  described = {"parser": _PARSER_VERSION, "text_field": text_field, "files": entries}
  if label_field is not None:  # unlabeled caches keep their names from before labels existed
    described["label_field"] = label_field
  payload = json.dumps(described)
  return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


class _LocalTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Prepares local text files as an ``array_record`` TFDS dataset, in file order."""

  name = "lm_local_text"
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, split_files: Mapping[str, Sequence[Path]], text_field: str, label_field: str | None = None,
               **kwargs: Any):
    self._split_files = {split: list(files) for split, files in split_files.items()}
    self._text_field = text_field
    self._label_field = label_field
    super().__init__(file_format="array_record", **kwargs)
    # TFDS pickles a builder (e.g. into Grain workers) as its constructor arguments.
    self._original_state.update(split_files=self._split_files, text_field=text_field, label_field=label_field)

  def _info(self) -> tfds.core.DatasetInfo:
    # disable_shuffling keeps documents in file order: LM training concatenates them.
    # (dataset_info_from_configs would look for metadata beside a package that does not exist.)
    features = {_LOCAL_FEATURE: tfds.features.Text()}
    if self._label_field is not None:
      features.update({_LOCAL_LABEL: tfds.features.Text(), _LOCAL_WHERE: tfds.features.Text()})
    features = tfds.features.FeaturesDict(features)
    return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, str]]]]:
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(files) for split, files in self._split_files.items()}

  def _generate_examples(self, files: Sequence[Path]) -> Iterator[tuple[int, dict[str, str]]]:
    ordinal = 0
    for path in files:
      if self._label_field is not None:
        for text, label, where in local_files.read_labeled_documents(path, text_field=self._text_field,
                                                                     label_field=self._label_field):
          yield ordinal, {_LOCAL_FEATURE: text, _LOCAL_LABEL: label, _LOCAL_WHERE: where}
          ordinal += 1
        continue
      for document in local_files.read_documents(path, text_field=self._text_field):
        yield ordinal, {_LOCAL_FEATURE: document}
        ordinal += 1

  # TFDS looks beside a builder's code for download checksums. This builder downloads
  # nothing, and the lookup itself fails on Python >= 3.9 installs that lack the
  # `importlib_resources` backport, so say there is no code path to look in.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  # TFDS prints a banner before and after preparing; preparing a local file is routine.
  def _log_download_bytes(self) -> None:
    logging.getLogger(__name__).info("Preparing %s into %s", self._split_files, self.data_dir)

  def _log_download_done(self) -> None:
    pass


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
  """Serialises preparation of one cache entry across processes."""
  if fcntl is None:  # pragma: no cover
    yield
    return
  with lock_path.open("a") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def _prepared_local_builder(split_files: Mapping[str, Sequence[Path]], text_field: str,
                            cache_root: Path, label_field: str | None = None) -> _LocalTextBuilder:
  """A builder for these files, prepared in ``cache_root`` unless it already is."""
  data_dir = cache_root / _fingerprint(split_files, text_field, label_field)
  try:
    data_dir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise DataError(
        f"Cannot create the data cache {data_dir} ({error.strerror}). Fix: pass cache_dir= or set "
        f"{_CACHE_ENV} to a writable folder.") from None

  def make_builder() -> _LocalTextBuilder:
    return _LocalTextBuilder(split_files=split_files, text_field=text_field, label_field=label_field,
                             data_dir=str(data_dir))

  # The lock makes a second process wait, then reuse what the first prepared.
  with _exclusive_lock(data_dir / ".prepare.lock"), _quiet_tfds():
    builder = make_builder()
    if builder.is_prepared():
      return builder
    try:
      builder.download_and_prepare()
    except OSError:
      # Without a working lock (e.g. some network filesystems) another process may
      # have renamed its finished copy into place first; that copy is as good.
      builder = make_builder()
      if not builder.is_prepared():
        raise
    return make_builder()
