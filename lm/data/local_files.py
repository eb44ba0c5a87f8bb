"""Local corpora: which files make which split, and how each file becomes documents.

A document is a paragraph of a ``.txt`` file (blank-line separated), one line of a
``.jsonl`` file (its ``text_field``), or one row of a ``.tsv`` file (its text
column). Every reader checks UTF-8 and structure as it goes and raises
``DataError`` naming the file, the line and the fix. `lm.data.sources` prepares
these documents as a TFDS dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from lm.core.errors import DataError

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".tsv")
# A file in a folder whose stem (or the stem's last dotted part, as in ptb.valid.txt)
# is one of these names holds that split; every other file is part of "train".
SPLIT_NAMES = ("train", "validation", "valid", "dev", "test")
# Used as "validation" when a folder has exactly one of them and no validation file.
_VALIDATION_ALIASES = ("valid", "dev")
# Columns that hold the text in common TSV corpora (SST-2 uses "sentence" or "content").
_TSV_FALLBACK_COLUMNS = ("sentence", "text", "content")


def resolve_path(target: str) -> Path:
  path = Path(target).expanduser()
  if not path.exists():
    raise DataError(
        f"Data path {str(path)!r} does not exist. Fix: check the path, or name a TFDS dataset as "
        "tfds:NAME (e.g. tfds:tiny_shakespeare).")
  return path.resolve()


def _split_of(path: Path) -> str:
  stem = path.stem.lower()
  for candidate in (stem, stem.rsplit(".", 1)[-1]):
    if candidate in SPLIT_NAMES:
      return candidate
  return "train"


def discover_splits(root: Path) -> dict[str, list[Path]]:
  """Maps each split to its files, in name order."""
  if root.is_file():
    if root.suffix.lower() not in SUPPORTED_EXTENSIONS:
      raise DataError(
          f"Unsupported file type {root.suffix or '(no extension)'!r} for {root}. Fix: use .txt "
          "(paragraphs separated by blank lines), .jsonl (one JSON object per line) or .tsv "
          "(header row, then tab-separated rows).")
    return {"train": [root]}
  entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
  files = [p for p in entries if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS]
  if not files:
    found = ", ".join(p.name for p in entries[:10]) or "nothing"
    raise DataError(
        f"Folder {root} has no .txt, .jsonl or .tsv files (found: {found}). Fix: add files with one "
        "of these extensions (train.txt, validation.jsonl, ...), or point at a single file.")
  splits: dict[str, list[Path]] = {}
  for path in files:
    splits.setdefault(_split_of(path), []).append(path)
  aliases = [alias for alias in _VALIDATION_ALIASES if alias in splits]
  if "validation" not in splits and len(aliases) == 1:
    splits["validation"] = splits[aliases[0]]
  return splits


def _lines(path: Path) -> Iterator[tuple[int, str]]:
  """Yields ``(line_number, line)`` without line endings, checking UTF-8 as it goes."""
  offset = 0
  with path.open("rb") as file:
    for line_number, raw in enumerate(file, start=1):
      body = raw[3:] if line_number == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
      try:
        line = body.decode("utf-8")
      except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not valid UTF-8: byte offset {offset + len(raw) - len(body) + error.start} "
            f"(line {line_number}) holds {body[error.start:error.start + 4]!r}. Fix: re-encode the "
            f"file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed_{path.name}`.") from None
      offset += len(raw)
      yield line_number, line.rstrip("\n").removesuffix("\r")


def _txt_documents(path: Path, text_field: str) -> Iterator[str]:
  del text_field  # A .txt file has no fields.
  paragraph: list[str] = []
  for _, line in _lines(path):
    if line.strip():
      paragraph.append(line)
    elif paragraph:
      yield "\n".join(paragraph)
      paragraph = []
  if paragraph:
    yield "\n".join(paragraph)


def _jsonl_records(path: Path, fields: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
  """Yields (line_number, record) of a .jsonl file whose records all hold `fields`, the first a string."""
  named = " and ".join(repr(field) for field in fields)
  for line_number, line in _lines(path):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      example = ", ".join(f'"{field}": "..."' for field in fields)
      raise DataError(
          f"{path} line {line_number} is not valid JSON ({error.msg}). Fix: write one JSON object "
          f"per line, e.g. {{{example}}}.") from None
    if not isinstance(record, dict) or any(field not in record for field in fields):
      present = sorted(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
      raise DataError(
          f"{path} line {line_number} has no field {named} (it has {present}). Fix: set "
          "config.data.text_field (and label_field) to the fields that hold them, or add them to every line.")
    if not isinstance(record[fields[0]], str):
      raise DataError(
          f"{path} line {line_number}: field {fields[0]!r} is {type(record[fields[0]]).__name__}, "
          "not a string. Fix: store the text as a JSON string.")
    yield line_number, record


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
  for _, record in _jsonl_records(path, (text_field,)):
    yield record[text_field]


def _tsv_rows(path: Path, text_field: str, label_field: str | None = None
              ) -> Iterator[tuple[int, list[str], int, int | None]]:
  """Yields (line_number, row, text column, label column or None) of a .tsv file, checking its columns."""
  lines = _lines(path)
  header = next(lines, (1, ""))[1].split("\t")
  candidates = [text_field, *_TSV_FALLBACK_COLUMNS]
  column = next((header.index(name) for name in candidates if name in header), None)
  if column is None:
    raise DataError(
        f"{path} has no header naming a text column: its first line has columns {header[:10]}, none of "
        f"{candidates}. Fix: make the first line a header such as 'label<TAB>sentence', or pass "
        "text_field= naming the text column.")
  if label_field is not None and label_field not in header:
    raise DataError(
        f"{path} has no label column {label_field!r}: its header has columns {header[:10]}. Fix: make the first "
        f"line a header such as '{label_field}<TAB>sentence', or set config.data.label_field to its label column.")
  label_column = None if label_field is None else header.index(label_field)
  for line_number, line in lines:
    if not line:
      continue
    row = line.split("\t")
    if len(row) != len(header):
      raise DataError(
          f"{path} line {line_number} has {len(row)} tab-separated columns; the header has "
          f"{len(header)}. Fix: give every row the header's columns (tabs inside the text must go).")
    yield line_number, row, column, label_column


def _tsv_documents(path: Path, text_field: str) -> Iterator[str]:
  for _, row, column, _ in _tsv_rows(path, text_field):
    yield row[column]


_READERS = {".txt": _txt_documents, ".jsonl": _jsonl_documents, ".tsv": _tsv_documents}


def _tsv_labeled(path: Path, text_field: str, label_field: str) -> Iterator[tuple[str, str, str]]:
  for line_number, row, column, label_column in _tsv_rows(path, text_field, label_field):
    label = row[label_column].strip()
    if not label:
      raise DataError(f"{path} line {line_number} has an empty {label_field!r}. Fix: give every row a label "
                      "(or drop the row).")
    yield row[column], label, f"{path.name}:{line_number}"


def _jsonl_labeled(path: Path, text_field: str, label_field: str) -> Iterator[tuple[str, str, str]]:
  for line_number, record in _jsonl_records(path, (text_field, label_field)):
    label = record[label_field]
    if isinstance(label, bool) or not isinstance(label, (int, str)) or not str(label).strip():
      raise DataError(f"{path} line {line_number}: label {label!r} is not a class name or integer. Fix: write "
                      "the label as a non-empty string or an integer.")
    yield record[text_field], str(label).strip(), f"{path.name}:{line_number}"


def read_labeled_documents(path: str | os.PathLike, *, text_field: str = "text",
                           label_field: str = "label") -> Iterator[tuple[str, str, str]]:
  """Streams (text, label, "file:line") of a .tsv or .jsonl file, checking it as it goes.

  Labels are returned as written (stripped); which labels are valid classes is
  decided against the training split (lm.tasks.classifier).
  Raises:
    DataError: a .txt file (it has no labels), a missing label column/field, an empty label.
  """
  path = Path(path)
  readers = {".tsv": _tsv_labeled, ".jsonl": _jsonl_labeled}
  if path.suffix.lower() not in readers:
    raise DataError(f"{path} has no labels: a classifier reads .tsv (header with a {label_field!r} column) or "
                    f".jsonl ({{\"{text_field}\": ..., \"{label_field}\": ...}} per line) files.")
  count = 0
  for example in readers[path.suffix.lower()](path, text_field, label_field):
    count += 1
    yield example
  if not count:
    raise DataError(f"{path} holds no labeled rows. Fix: add rows to it or remove it.")


def read_documents(path: str | os.PathLike, *, text_field: str = "text") -> Iterator[str]:
  """Streams the documents of one local file, checking it as it goes.

  Raises:
    DataError: the file is not UTF-8, is malformed, or holds no text.
  """
  path = Path(path)
  has_text = False
  for document in _READERS[path.suffix.lower()](path, text_field):
    has_text = has_text or bool(document.strip())
    yield document
  if not has_text:
    raise DataError(f"{path} holds no text (it is empty or blank). Fix: add text to it or remove it.")
