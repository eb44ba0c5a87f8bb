"""A split of a source, named but not yet read: what a token cache is prepared from.

`Split(source, split, text_field, ...)` says which documents a run trains on
without opening anything. It is what `lm.experiment` hands to tasks:

  * iterating it streams the documents, from local files directly (no TFDS
    preparation, so a corpus of any size streams in constant memory), from a
    TFDS catalog dataset through its random-access data source;
  * `units(target_bytes)` cuts it into units of work of about that many bytes,
    each a whole number of documents (byte ranges of local files, aligned to
    document boundaries; ranges of document indices otherwise): a token cache's
    shards, prepared in parallel and always cut the same way;
  * `sample(max_bytes)` is a deterministic sample of evenly spaced documents
    (what SentencePiece trains on);
  * random access (`len`, `split[i]`, labels) opens the split as a
    `lm.data.sources.TextSource`, preparing local files as a TFDS dataset as
    before (sentences, classifiers: corpora that fit in memory).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

from lm.data import local_files, sources
from lm.core.errors import DataError

# A split string with TFDS slicing or a union ("train[:90%]", "validation+test") selects documents by index.
_SLICED = re.compile(r"[\[+]")
_DOCUMENTS_PER_UNIT = 50_000  # TFDS sources whose size in bytes is not known


@dataclasses.dataclass(frozen=True)
class Unit:
  """One unit of work: bytes [start, end) of a local file, or documents [start, end) of the opened split."""

  index: int
  path: str | None
  start: int
  end: int

  @property
  def describes(self) -> str:
    return self.path if self.path is not None else f"documents {self.start}..{self.end}"


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split of a source (module doc). Picklable: a Beam worker reads its units from it."""

  source: str
  split: str
  text_field: str = "text"
  cache_dir: str | None = None
  label_field: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "_opened", None)

  def __getstate__(self):
    return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

  def __setstate__(self, state):
    for key, value in state.items():
      object.__setattr__(self, key, value)
    object.__setattr__(self, "_opened", None)

  # -- what it is ---------------------------------------------------------------------------------------
  @property
  def _parsed(self) -> tuple[str, str]:
    kind, target, _ = sources.parse_source(self.source)
    return kind, target

  @property
  def name(self) -> str:
    """As `lm.data.sources.TextSource` names it: "tfds:NAME:split" or "/abs/path:split"."""
    kind, target = self._parsed
    label = f"tfds:{target}" if kind == "tfds" else str(local_files.resolve_path(target))
    return f"{label}:{self.split}"

  def files(self) -> list[Path] | None:
    """The local files of the split, in reading order; None when it is read through TFDS (a catalog
    dataset, or a local split selected by slicing)."""
    kind, target = self._parsed
    if kind != "local" or _SLICED.search(self.split):
      return None
    splits = local_files.discover_splits(local_files.resolve_path(target))
    if self.split not in splits:
      raise DataError(f"Split {self.split!r} is not available for {local_files.resolve_path(target)}. Available "
                      f"splits: {sorted(splits)}. Fix: use one of them, optionally sliced to hold out a part, e.g. "
                      "'train[:90%]' and 'train[90%:]'.")
    return splits[self.split]

  def identity(self) -> dict[str, Any]:
    """What the documents are, without their contents: part of a token cache's key."""
    kind, target = self._parsed
    files = self.files()
    where = [str(path) for path in files] if files is not None else (
        str(local_files.resolve_path(target)) if kind == "local" else target)
    return {"kind": kind, "where": where, "split": self.split, "text_field": self.text_field}

  def fingerprint(self) -> str:
    """Changes when the documents may have: the files' sizes and modification times, or the TFDS split's
    version and size. A token cache records it to notice a corpus edited after preparation."""
    files = self.files()
    if files is not None:
      described: Any = [[str(path), path.stat().st_size, path.stat().st_mtime_ns] for path in files]
    else:
      opened = self.open()
      info = getattr(opened, "info", None)
      described = {"documents": len(opened), "info": info}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]

  # -- reading ------------------------------------------------------------------------------------------
  def open(self) -> sources.TextSource:
    """The split for random access (local files are prepared as a TFDS dataset first, as before)."""
    if self._opened is None:
      opened = sources.open_split(self.source, self.split, text_field=self.text_field, cache_dir=self.cache_dir,
                                  label_field=self.label_field)
      object.__setattr__(self, "_opened", opened)
    return self._opened

  def __len__(self) -> int:
    return len(self.open())

  def __getitem__(self, index: int) -> str:
    return self.open()[index]

  def __getitems__(self, indices) -> list[str]:
    return self.open().__getitems__(indices)

  def __getattr__(self, name: str) -> Any:  # labels(), where(): a LabeledSource's
    if name.startswith("_"):
      raise AttributeError(name)
    return getattr(self.open(), name)

  def __iter__(self) -> Iterator[str]:
    files = self.files()
    if files is None or self.label_field is not None:
      yield from self.open()
      return
    for path in files:
      yield from local_files.read_documents(path, text_field=self.text_field)

  def __repr__(self) -> str:
    return f"Split({self.source!r}, {self.split!r})"

  def units(self, target_bytes: int) -> list[Unit]:
    """Units of about `target_bytes` (module doc), in reading order."""
    files = self.files()
    units: list[Unit] = []
    if files is not None:
      for path in files:
        for start, end in local_files.document_ranges(path, target_bytes):
          units.append(Unit(len(units), str(path), start, end))
      return units
    opened = self.open()
    count = len(opened)
    total_bytes = _split_bytes(opened)
    per_unit = (max(1, math.ceil(count * target_bytes / total_bytes)) if total_bytes else _DOCUMENTS_PER_UNIT)
    for start in range(0, count, per_unit):
      units.append(Unit(len(units), None, start, min(count, start + per_unit)))
    return units

  def read(self, unit: Unit) -> Iterator[str]:
    """The documents of one unit, in order."""
    for documents in self.read_batches(unit):
      yield from documents

  def read_batches(self, unit: Unit) -> Iterator[list[str]]:
    """The documents of one unit, in order, in lists (what a token cache's workers encode, many at a time)."""
    if unit.path is not None:
      path = Path(unit.path)
      header = local_files.tsv_header(path) if path.suffix.lower() == ".tsv" and unit.start > 0 else None
      yield from local_files.read_document_batches(path, unit.start, unit.end, text_field=self.text_field,
                                                   header=header)
      return
    opened = self.open()
    for first in range(unit.start, unit.end, 1024):
      yield opened.__getitems__(range(first, min(unit.end, first + 1024)))

  def sample(self, max_bytes: int) -> list[str]:
    """Evenly spaced documents, about `max_bytes` of them in all (every document of a smaller split, in
    order): the same documents on every call."""
    files = self.files()
    if files is not None:
      total = sum(path.stat().st_size for path in files)
      if total <= max_bytes:
        return list(self)
      units = self.units(max(1, total // 64))  # 64 evenly spaced places
      quota = max_bytes / max(len(units), 1)
      picked = []
      for unit in units:
        taken = 0
        for document in self.read(unit):
          picked.append(document)
          taken += len(document.encode("utf-8"))
          if taken >= quota:
            break
      return picked
    opened = self.open()
    count = len(opened)
    total = _split_bytes(opened)
    if not total or total <= max_bytes:
      return list(opened)
    step = total / max_bytes
    return opened.__getitems__(sorted({int(i * step) for i in range(int(count / step))}))


def _split_bytes(opened: Any) -> int | None:
  """The split's size in bytes when its source says (TFDS's split info), else None."""
  info = getattr(opened, "info", None)
  return info.get("num_bytes") if isinstance(info, dict) else None


@dataclasses.dataclass(frozen=True)
class Mixture:
  """Several splits drawn in proportions (data.mixture): (name, split, weight) parts, weights summing to 1."""

  parts: tuple[tuple[str, Split, float], ...]

  @property
  def name(self) -> str:
    return "mixture(" + ", ".join(f"{name}: {weight:g}" for name, _, weight in self.parts) + ")"

  def __iter__(self) -> Iterator[str]:
    for _, split, _ in self.parts:
      yield from split

  def sample(self, max_bytes: int) -> list[str]:
    """Each part's sample, in proportion to its weight."""
    return [document for _, split, weight in self.parts for document in split.sample(max(1, int(max_bytes * weight)))]


def source_name(source: str) -> str:
  """A short name for a source in metric names: tfds:NAME[...] -> NAME, a path -> its file or folder name."""
  kind, target, _ = sources.parse_source(source)
  if kind == "tfds":
    return target.split(":")[0].split("/")[0]
  path = Path(target.rstrip("/")).expanduser()
  return path.stem if path.suffix else path.name


def parse_mixture(mixture: Any) -> list[tuple[str, float]]:
  """data.mixture -> [(source, weight)], weights normalized to sum 1; DataError naming the field if malformed."""
  entries = []
  for entry in mixture:
    if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str):
      raise DataError(f"config.data.mixture entry {entry!r} is not a (source, weight) pair. Fix: write e.g. "
                      "--config.data.mixture='((\"tfds:tiny_shakespeare\", 0.7), (\"path/to/new/\", 0.3))'.")
    source, weight = entry
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
      raise DataError(f"config.data.mixture gives {source!r} the weight {weight!r}; every weight must be a "
                      "positive number (the proportions of the batches drawn from each source).")
    entries.append((source, float(weight)))
  if len(entries) < 2:
    raise DataError(f"config.data.mixture has {len(entries)} source(s); a mixture needs at least 2 (for one "
                    "source, set data.source and leave data.mixture empty).")
  total = sum(weight for _, weight in entries)
  return [(source, weight / total) for source, weight in entries]


def mixture_names(sources_: list[str]) -> list[str]:
  """Distinct short names (`source_name`), numbered where two sources would share one."""
  names, seen = [], {}
  for source in sources_:
    name = source_name(source)
    seen[name] = seen.get(name, 0) + 1
    names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
  return names
