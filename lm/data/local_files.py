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
import re
from collections.abc import Iterable, Iterator
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


class Lines:
  """The lines of bytes [start, end) of a UTF-8 file, without line endings: `for index, line in lines`.

  A range starts at a line's first byte (0 or just after a newline) and ends
  at a newline or the end of the file. A whole file is read a block at a time
  (memory stays one block's); a range is read in one go. `number(index)` is
  the line's number in the file, for error messages: for a range that starts
  mid-file it counts the newlines before `start` once, when an error needs it.
  """

  BLOCK = 16 << 20

  def __init__(self, path: Path, start: int = 0, end: int | None = None):
    self.path, self.start, self.end = Path(path), start, end
    self._first_line: int | None = 1 if start == 0 else None

  def number(self, index: int) -> int:
    if self._first_line is None:
      newlines = 0
      with self.path.open("rb") as file:
        remaining = self.start
        while remaining > 0:
          block = file.read(min(remaining, self.BLOCK))
          if not block:
            break
          newlines += block.count(b"\n")
          remaining -= len(block)
      self._first_line = newlines + 1
    return self._first_line + index

  def _blocks(self) -> Iterator[tuple[int, bytes]]:
    """(file offset, bytes) of whole lines, up to BLOCK bytes at a time (more for one longer line)."""
    with self.path.open("rb") as file:
      file.seek(self.start)
      offset, pending = self.start, b""
      while True:
        want = self.BLOCK if self.end is None else min(self.BLOCK, self.end - offset - len(pending))
        block = file.read(want) if want > 0 else b""
        if not block:
          if pending:
            yield offset, pending
          return
        data = pending + block
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # no newline yet: one line longer than a block
          pending = data
          continue
        yield offset, data[:cut]
        offset, pending = offset + cut, data[cut:]

  def texts(self) -> Iterator[tuple[int, str]]:
    """(index of its first line, text) of whole lines at a time, decoded; each text but the file's last ends
    with a newline."""
    index = 0
    for offset, data in self._blocks():
      skip = 3 if offset == 0 and data.startswith(b"\xef\xbb\xbf") else 0
      try:
        text = data[skip:].decode("utf-8")
      except UnicodeDecodeError as error:
        position = skip + error.start
        line = index + data.count(b"\n", 0, position)
        bad = data[position:position + 4]
        raise DataError(
            f"{self.path} is not valid UTF-8: byte offset {offset + position} (line {self.number(line)}) holds "
            f"{bad!r}. Fix: re-encode the file as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {self.path.name} > fixed_{self.path.name}`.") from None
      yield index, text
      index += text.count("\n") + (0 if text.endswith("\n") else 1)

  def __iter__(self) -> Iterator[tuple[int, str]]:
    for index, text in self.texts():
      lines = text.split("\n")
      if lines[-1] == "":
        lines.pop()  # the block ends with a newline
      for line in lines:
        yield index, line.removesuffix("\r")
        index += 1


def _lines(path: Path, start: int = 0, end: int | None = None) -> Lines:
  return Lines(path, start, end)


# A paragraph: lines that are not blank (hold a character that is not whitespace), one after another.
_PARAGRAPH = re.compile(r"[^\n]*\S[^\n]*(?:\n[^\n]*\S[^\n]*)*")


def _txt_documents(path: Path, text_field: str, start: int = 0, end: int | None = None,
                   header: str | None = None) -> Iterator[str]:
  for paragraphs in _txt_paragraph_batches(path, text_field, start, end, header):
    yield from paragraphs


def _txt_paragraph_batches(path: Path, text_field: str, start: int = 0, end: int | None = None,
                           header: str | None = None) -> Iterator[list[str]]:
  """The paragraphs of a .txt file's lines (a line's ending, \\n or \\r\\n, is not part of it), a block's at a
  time, found by one regular expression (a Python loop over lines, then over paragraphs, was most of a
  preparation's time)."""
  del text_field, header  # A .txt file has no fields.
  pending = ""  # the last paragraph of the previous block, which may go on in this one
  for _, text in _lines(path, start, end).texts():
    if "\r" in text:  # \r\n line endings: the lines' text is what precedes them
      text = text.replace("\r\n", "\n")
      text = text[:-1] if text.endswith("\r") else text  # the file's last line, without a newline
    text = text[:-1] if text.endswith("\n") else text
    paragraphs = _PARAGRAPH.findall(text)
    if not paragraphs:  # a block of blank lines ends the pending paragraph
      if pending:
        yield [pending]
        pending = ""
      continue
    # Paragraphs are maximal runs of non-blank lines, so the first starts the block iff its first line is not
    # blank, and the last ends it iff its last line is not blank.
    newline = text.find("\n")
    starts_block = bool((text if newline < 0 else text[:newline]).strip())
    ends_block = bool(text[text.rfind("\n") + 1:].strip())
    if pending:
      if starts_block:  # the previous block's last line and this block's first are one paragraph
        paragraphs[0] = pending + "\n" + paragraphs[0]
      else:
        paragraphs.insert(0, pending)
      pending = ""
    if ends_block:
      pending = paragraphs.pop()
    if paragraphs:
      yield paragraphs
  if pending:
    yield [pending]


_SURROGATE = re.compile("[\ud800-\udfff]")


def _jsonl_records(lines: Lines, fields: tuple[str, ...], missing: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
  """Yields (index in `lines`, record) of .jsonl lines whose records all hold `fields`, the first a string.

  missing: fields a record must hold, named in the error for one that lacks them (records of named fields:
  SFT and preference data), instead of the hint about data.text_field."""
  path = lines.path
  named = " and ".join(repr(field) for field in fields)
  for index, line in lines:
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      example = ", ".join(f'"{field}": "..."' for field in fields)
      raise DataError(
          f"{path} line {lines.number(index)} is not valid JSON ({error.msg}). Fix: write one JSON object "
          f"per line, e.g. {{{example}}}.") from None
    except (ValueError, RecursionError) as error:  # an integer of over 4300 digits; nesting deeper than the stack
      raise DataError(
          f"{path} line {lines.number(index)} is JSON that Python cannot read ({str(error).splitlines()[0][:120]}). "
          "Fix: store the text as a JSON string, without huge numbers or deep nesting.") from None
    if missing and isinstance(record, dict) and any(field not in record for field in missing):
      absent = [field for field in missing if field not in record]
      raise DataError(
          f"{path} line {lines.number(index)} has no field {', '.join(map(repr, absent))} (it has {sorted(record)}). "
          f"Fix: give every record the fields {', '.join(map(repr, missing))}, or drop the record.")
    if not isinstance(record, dict) or any(field not in record for field in fields):
      present = sorted(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
      raise DataError(
          f"{path} line {lines.number(index)} has no field {named} (it has {present}). Fix: set "
          "config.data.text_field (and label_field) to the fields that hold them, or add them to every line.")
    if not isinstance(record[fields[0]], str):
      raise DataError(
          f"{path} line {lines.number(index)}: field {fields[0]!r} is {type(record[fields[0]]).__name__}, "
          "not a string. Fix: store the text as a JSON string.")
    if "\\u" in line:  # only an escape can hold half of a UTF-16 surrogate pair, which is not text
      for field in fields:
        if isinstance(record[field], str) and _SURROGATE.search(record[field]):
          raise DataError(
              f"{path} line {lines.number(index)}: field {field!r} holds an unpaired surrogate escape "
              "(\\ud800-\\udfff), which is no character. Fix: write the text as UTF-8, or escape each "
              "character outside the BMP as its full surrogate pair.")
    yield index, record


def _jsonl_documents(path: Path, text_field: str, start: int = 0, end: int | None = None,
                     header: str | None = None) -> Iterator[str]:
  del header
  for _, record in _jsonl_records(_lines(path, start, end), (text_field,)):
    yield record[text_field]


def tsv_header(path: Path) -> str:
  """The first line of a .tsv file (its header), for reading a range that starts after it."""
  for _, line in _lines(path):
    return line
  return ""


def _tsv_rows(path: Path, text_field: str, label_field: str | None = None, start: int = 0, end: int | None = None,
              header: str | None = None) -> Iterator[tuple[Lines, int, list[str], int, int | None]]:
  """Yields (lines, index, row, text column, label column or None) of a .tsv file, checking its columns.

  A range that starts after the header is given the header's line (`tsv_header`).
  """
  lines = _lines(path, start, end)
  rows = iter(lines)
  if header is None or start == 0:
    header = next(rows, (0, ""))[1]
  columns = header.split("\t")
  candidates = [text_field, *_TSV_FALLBACK_COLUMNS]
  column = next((columns.index(name) for name in candidates if name in columns), None)
  if column is None:
    raise DataError(
        f"{path} has no header naming a text column: its first line has columns {columns[:10]}, none of "
        f"{candidates}. Fix: make the first line a header such as 'label<TAB>sentence', or pass "
        "text_field= naming the text column.")
  if label_field is not None and label_field not in columns:
    raise DataError(
        f"{path} has no label column {label_field!r}: its header has columns {columns[:10]}. Fix: make the first "
        f"line a header such as '{label_field}<TAB>sentence', or set config.data.label_field to its label column.")
  label_column = None if label_field is None else columns.index(label_field)
  for index, row in _tsv_body(lines, rows, len(columns)):
    yield lines, index, row, column, label_column


def _tsv_body(lines: Lines, rows: Iterator[tuple[int, str]], width: int) -> Iterator[tuple[int, list[str]]]:
  """(index, cells) of the non-empty rows after a .tsv header of `width` columns, each checked to have them."""
  for index, line in rows:
    if not line:
      continue
    row = line.split("\t")
    if len(row) != width:
      raise DataError(
          f"{lines.path} line {lines.number(index)} has {len(row)} tab-separated columns; the header has "
          f"{width}. Fix: give every row the header's columns (tabs inside the text must go).")
    yield index, row


def _tsv_documents(path: Path, text_field: str, start: int = 0, end: int | None = None,
                   header: str | None = None) -> Iterator[str]:
  for _, _, row, column, _ in _tsv_rows(path, text_field, start=start, end=end, header=header):
    yield row[column]


_READERS = {".txt": _txt_documents, ".jsonl": _jsonl_documents, ".tsv": _tsv_documents}


def _tsv_labeled(path: Path, text_field: str, label_field: str) -> Iterator[tuple[str, str, str]]:
  for lines, index, row, column, label_column in _tsv_rows(path, text_field, label_field):
    line_number = lines.number(index)
    label = row[label_column].strip()
    if not label:
      raise DataError(f"{path} line {line_number} has an empty {label_field!r}. Fix: give every row a label "
                      "(or drop the row).")
    yield row[column], label, f"{path.name}:{line_number}"


def _jsonl_labeled(path: Path, text_field: str, label_field: str) -> Iterator[tuple[str, str, str]]:
  lines = _lines(path)
  for index, record in _jsonl_records(lines, (text_field, label_field)):
    line_number = lines.number(index)
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


def read_document_range(path: str | os.PathLike, start: int, end: int, *, text_field: str = "text",
                        header: str | None = None) -> Iterator[str]:
  """The documents of bytes [start, end) of one local file (a range from `document_ranges`), checked as
  `read_documents` checks them; `header` is a .tsv file's first line (`tsv_header`) when start > 0."""
  path = Path(path)
  return _READERS[path.suffix.lower()](path, text_field, start, end, header)


def read_document_batches(path: str | os.PathLike, start: int, end: int, *, text_field: str = "text",
                          header: str | None = None) -> Iterator[list[str]]:
  """`read_document_range`'s documents in lists (a .txt file's paragraphs a block at a time, found without a
  Python step per paragraph), for readers that take many documents at once."""
  path = Path(path)
  if path.suffix.lower() == ".txt":
    return _txt_paragraph_batches(path, text_field, start, end, header)
  return batched(read_document_range(path, start, end, text_field=text_field, header=header))


def batched(documents: Iterable[str], max_chars: int = 1 << 20) -> Iterator[list[str]]:
  """`documents` in lists of about `max_chars` characters (one longer document is a list of its own)."""
  batch: list[str] = []
  size = 0
  for document in documents:
    batch.append(document)
    size += len(document)
    if size >= max_chars:
      yield batch
      batch, size = [], 0
  if batch:
    yield batch


def _is_blank(line: bytes) -> bool:
  try:
    return not line.decode("utf-8").strip()
  except UnicodeDecodeError:
    return False  # not a separator; the reader reports the bad bytes


def _boundary_at_or_after(file, offset: int, size: int, paragraphs: bool) -> int:
  """The first document boundary at or after `offset`: a line start (.jsonl, .tsv: a line is a document),
  or the start of a blank line (.txt: blank lines separate paragraphs, so no paragraph spans it)."""
  if offset <= 0:
    return 0
  file.seek(offset - 1)
  if file.read(1) != b"\n":
    file.readline()  # the rest of the line `offset` falls in
  position = file.tell()
  if not paragraphs:
    return min(position, size)
  while position < size:
    line = file.readline()
    if _is_blank(line):
      return position
    position += len(line)
  return size


def document_ranges(path: str | os.PathLike, target_bytes: int) -> list[tuple[int, int]]:
  """[start, end) byte ranges of about `target_bytes` covering the file, each a whole number of documents.

  Reads only near each cut (a few lines), so planning a 40 GB file costs milliseconds. The ranges depend
  only on the file and `target_bytes`, so the same file is always cut the same way.
  """
  path = Path(path)
  size = path.stat().st_size
  paragraphs = path.suffix.lower() == ".txt"
  cuts = [0]
  with path.open("rb") as file:
    while True:
      cut = _boundary_at_or_after(file, cuts[-1] + max(int(target_bytes), 1), size, paragraphs)
      if cut >= size:
        break
      cuts.append(cut)
  cuts.append(size)
  return [(start, end) for start, end in zip(cuts, cuts[1:]) if end > start] or [(0, size)]


def read_records(path: str | os.PathLike, fields: tuple[str, ...]) -> Iterator[tuple[dict[str, str], str]]:
  """Streams (record, "file:line") of a .jsonl file (objects holding `fields`, each a string) or a .tsv file
  (a header naming `fields` as columns), checking each as it goes: what SFT and preference data are made of.

  Raises:
    DataError: another file type, a missing field or column, a field that is not a string; each names the file,
      the line and the fix.
  """
  path = Path(path)
  suffix = path.suffix.lower()
  wanted = ", ".join(repr(field) for field in fields)
  if suffix == ".jsonl":
    lines = _lines(path)
    for index, record in _jsonl_records(lines, fields[:1], missing=fields):
      line_number = lines.number(index)
      for field in fields:
        if not isinstance(record[field], str):
          raise DataError(f"{path} line {line_number}: field {field!r} is {type(record[field]).__name__}, not a "
                          "string. Fix: store it as a JSON string.")
      yield {field: record[field] for field in fields}, f"{path}:{line_number}"
  elif suffix == ".tsv":
    lines = _lines(path)
    rows = iter(lines)
    columns = next(rows, (0, ""))[1].split("\t")
    missing = [field for field in fields if field not in columns]
    if missing:
      raise DataError(f"{path} has no column {', '.join(map(repr, missing))}: its header has columns "
                      f"{columns[:10]}. Fix: make the first line a header naming {wanted}, tab-separated.")
    where = [columns.index(field) for field in fields]
    for index, row in _tsv_body(lines, rows, len(columns)):
      yield {field: row[column] for field, column in zip(fields, where)}, f"{path}:{lines.number(index)}"
  else:
    raise DataError(f"{path} holds no records: SFT and preference data are .jsonl files (one object with {wanted} "
                    f"per line) or .tsv files (a header naming {wanted}).")
