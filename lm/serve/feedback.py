"""Prompts, completions and user feedback in SQLite, exported exactly once as chunks for the online loop.

The server records every completion it returns and every piece of feedback on one
(`FeedbackStore`, in `WORKDIR/serve/feedback.sqlite`: stdlib sqlite3, WAL,
synchronous=FULL, each call committed before it returns, so an answered request
survives a SIGKILL). `export` turns feedback into chunks in the online loop's
watched folder (`lm.data.watch`), which trains on them, gates, and promotes.

Schema:
  meta         key -> value: the schema version and this store's id (8 hex characters, made once, in
               every chunk name, so two servers writing into one watched folder never collide)
  completions  id, prompt, model_version, settings (JSON), created: one row per request
  choices      (completion_id, choice) -> text: one row per returned choice
  feedback     id, completion_id, choice, rating (+1/-1), preferred, correction, created, chunk (NULL: pending)
  chunks       number, folder, state ('assigned' or 'written')

A chunk is two files, each written only when it has records:
  feedback-<store>-<NNNNNN>.jsonl              {"text"}: prompt + a +1-rated choice; prompt + a correction
  feedback-<store>-<NNNNNN>.preferences.jsonl  {"prompt", "chosen", "rejected"}: the preferred choice vs each
                                               other one; a correction vs the original; a +1 vs a -1 choice
The watched folder ignores the second kind until preference tuning reads it.

Exactly once, across restarts and SIGKILL, in two phases: (1) one transaction gives
the oldest pending records a new chunk number and records the chunk as
'assigned'; (2) its files are written (as NAME.part, fsync'ed, renamed: the
watcher ignores .part names), then another transaction marks it 'written'. A
crash between the two leaves an 'assigned' chunk, which the next store (on
construction, and at every export) finishes: a file already in place is kept
(the online loop may have consumed it), a missing one is written from the rows.
A chunk's content is a pure function of the rows (a +1/-1 pair is made when its
second rating arrives, looking only at earlier feedback ids, which never change),
so a rewrite is identical. A chunk whose records make no text and no pair (only
-1 ratings) has no files: its records are done. One process per store (the server).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator

from lm.core import faults
from lm.core.errors import UserError

DATABASE_NAME = "feedback.sqlite"
TEXT_SUFFIX = ".jsonl"
PREFERENCE_SUFFIX = ".preferences.jsonl"  # lm.data.watch.PREFERENCE_SUFFIX: the watched folder leaves these alone
PART_SUFFIX = ".part"  # a file still being written; the watched folder ignores it
_SCHEMA_VERSION = "1"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS completions (id TEXT PRIMARY KEY, prompt TEXT NOT NULL, "
    "model_version TEXT NOT NULL, settings TEXT NOT NULL, created REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS choices (completion_id TEXT NOT NULL REFERENCES completions(id), "
    "choice INTEGER NOT NULL, text TEXT NOT NULL, PRIMARY KEY (completion_id, choice))",
    "CREATE TABLE IF NOT EXISTS chunks (number INTEGER PRIMARY KEY, folder TEXT NOT NULL, "
    "state TEXT NOT NULL CHECK (state IN ('assigned', 'written')))",
    "CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "completion_id TEXT NOT NULL REFERENCES completions(id), choice INTEGER NOT NULL, rating INTEGER, "
    "preferred INTEGER, correction TEXT, created REAL NOT NULL, chunk INTEGER REFERENCES chunks(number))",
    "CREATE INDEX IF NOT EXISTS feedback_by_chunk ON feedback (chunk, id)",
    "CREATE INDEX IF NOT EXISTS feedback_by_completion ON feedback (completion_id, id)",
)


class FeedbackError(UserError, ValueError):
  """Bad feedback: unknown completion id, choice out of range, nothing to record; names the field and the fix."""


class FeedbackStore:
  """The server's record of completions and feedback (module docstring). Safe to call from many threads."""

  def __init__(self, directory: str | os.PathLike):
    self.path = pathlib.Path(directory) / DATABASE_NAME
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._lock = threading.Lock()  # one connection, one statement sequence at a time
    self._export_lock = threading.Lock()  # one export at a time: two must not finish the same chunk
    self._connection = _open(self.path)
    with self._transaction() as db:
      self.store_id = db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
    with self._export_lock:
      self._finish_assigned()

  def record_completion(self, *, completion_id: str, prompt: str, texts: list[str], model_version: str,
                        settings: dict, created: float) -> None:
    """Records a request and its choices; committed when it returns, so the server may then answer."""
    if not isinstance(completion_id, str) or not completion_id:
      raise FeedbackError(f"completion_id={completion_id!r} is not a non-empty string. Fix: pass the response's id.")
    if not texts or not all(isinstance(text, str) for text in texts):
      raise FeedbackError(f"texts of completion {completion_id!r} must be a non-empty list of strings (one per "
                          "choice). Fix: pass the generated texts.")
    try:
      settings_json = json.dumps(settings, sort_keys=True)
    except (TypeError, ValueError) as error:
      raise FeedbackError(f"settings of completion {completion_id!r} are not JSON ({error}). Fix: pass numbers, "
                          "strings, lists and dicts.") from None
    try:
      with self._transaction() as db:
        db.execute("INSERT INTO completions VALUES (?, ?, ?, ?, ?)",
                   (completion_id, prompt, model_version, settings_json, created))
        db.executemany("INSERT INTO choices VALUES (?, ?, ?)",
                       [(completion_id, choice, text) for choice, text in enumerate(texts)])
    except sqlite3.IntegrityError:
      raise FeedbackError(f"completion_id {completion_id!r} is already recorded. Fix: give every completion a new "
                          "id (e.g. cmpl-<uuid4 hex>).") from None

  def record_feedback(self, *, completion_id: str, choice: int = 0, rating: int | None = None,
                      preferred: int | None = None, correction: str | None = None) -> int:
    """Records feedback on one completion; returns its id, committed (durable) when it returns.

    rating: +1 or -1 for `choice`; preferred: the index of the best of the request's n >= 2 choices;
    correction: a corrected text for `choice`. At least one of the three.
    """
    with self._transaction() as db:
      texts = [text for (text,) in db.execute(
          "SELECT text FROM choices WHERE completion_id = ? ORDER BY choice", (completion_id,))]
      _check_feedback(completion_id, texts, choice, rating, preferred, correction)
      cursor = db.execute(
          "INSERT INTO feedback (completion_id, choice, rating, preferred, correction, created) "
          "VALUES (?, ?, ?, ?, ?, ?)", (completion_id, choice, rating, preferred, correction, time.time()))
    return cursor.lastrowid

  def export(self, folder: str | os.PathLike, *, chunk_size: int, interval_s: float, now: float | None = None,
             force: bool = False) -> list[pathlib.Path]:
    """Writes every finished chunk into `folder` (the watched folder); returns the paths written.

    A chunk (at most `chunk_size` records, oldest first) is finished when `chunk_size` records are pending,
    when the oldest pending one is at least `interval_s` old at `now` (time.time() if None), or, with
    `force`, when any is pending. Chunks a crash left unfinished are finished first, wherever they went.
    Raises OSError if a file cannot be written (a full disk): its chunk stays assigned, the next call finishes it.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
      raise FeedbackError(f"chunk_size={chunk_size!r} is not a positive integer. Fix: use 1 or more records.")
    if interval_s < 0:
      raise FeedbackError(f"interval_s={interval_s!r} is negative. Fix: use 0 (export at once) or more seconds.")
    folder = pathlib.Path(folder).expanduser().resolve()
    now = time.time() if now is None else now
    with self._export_lock:
      written = self._finish_assigned()
      for part in folder.glob(f"feedback-{self.store_id}-*{PART_SUFFIX}"):
        part.unlink(missing_ok=True)  # no chunk of this store is being written: a leftover of a crash
      while (number := self._assign(folder, chunk_size, interval_s, now, force)) is not None:
        written += self._finish(number, folder)
    return written

  def close(self) -> None:
    """Closes the database; every recorded call was already committed."""
    with self._lock:
      self._connection.close()

  def __enter__(self) -> FeedbackStore:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  @contextlib.contextmanager
  def _transaction(self) -> Iterator[sqlite3.Connection]:
    """The connection inside BEGIN IMMEDIATE ... COMMIT (ROLLBACK if the body raises), under the lock."""
    with self._lock:
      self._connection.execute("BEGIN IMMEDIATE")
      try:
        yield self._connection
      except BaseException:
        self._connection.execute("ROLLBACK")
        raise
      self._connection.execute("COMMIT")

  def _assign(self, folder: pathlib.Path, chunk_size: int, interval_s: float, now: float,
              force: bool) -> int | None:
    """Phase 1: gives the oldest pending records a new chunk number if a chunk is due; returns it (or None)."""
    with self._transaction() as db:
      pending, oldest = db.execute("SELECT COUNT(*), MIN(created) FROM feedback WHERE chunk IS NULL").fetchone()
      if not pending or not (force or pending >= chunk_size or now - oldest >= interval_s):
        return None
      number = db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM chunks").fetchone()[0]
      db.execute("INSERT INTO chunks VALUES (?, ?, 'assigned')", (number, str(folder)))
      db.execute("UPDATE feedback SET chunk = ? WHERE id IN "
                 "(SELECT id FROM feedback WHERE chunk IS NULL ORDER BY id LIMIT ?)", (number, chunk_size))
    faults.point("serve/feedback_assigned", number)  # committed, no file written yet
    return number

  def _finish(self, number: int, folder: pathlib.Path) -> list[pathlib.Path]:
    """Phases 2 and 3: writes chunk `number`'s files that are not in place, then marks it written."""
    with self._transaction() as db:
      texts, pairs = _chunk_records(db, number)
    stem = f"feedback-{self.store_id}-{number:06d}"
    written = []
    for suffix, records in ((TEXT_SUFFIX, texts), (PREFERENCE_SUFFIX, pairs)):
      path = folder / (stem + suffix)
      if records and not path.exists():  # one in place may already be consumed: never rewritten
        _write_durably(path, records)
        written.append(path)
    faults.point("serve/feedback_written", number)  # files in place, chunk still 'assigned'
    with self._transaction() as db:
      db.execute("UPDATE chunks SET state = 'written' WHERE number = ?", (number,))
    return written

  def _finish_assigned(self) -> list[pathlib.Path]:
    """Finishes the chunks a crash left between assignment and 'written'; returns the paths written."""
    with self._transaction() as db:
      assigned = db.execute("SELECT number, folder FROM chunks WHERE state = 'assigned' ORDER BY number").fetchall()
    written = []
    for number, folder in assigned:
      written += self._finish(number, pathlib.Path(folder))
    return written


def _open(path: pathlib.Path) -> sqlite3.Connection:
  """Opens (or creates) the store at `path`; a file that is not one is refused before anything is written."""
  fix = (f"Fix: move it aside (mv {path} {path}.bad) and restart; a new, empty store is made in its place. "
         "Nothing was written to it.")
  try:
    connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
  except sqlite3.Error as error:
    raise FeedbackError(f"Feedback store {path} cannot be opened ({error}). {fix}") from None
  try:
    tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    version = (connection.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
               if "meta" in tables else None)
  except sqlite3.DatabaseError as error:
    connection.close()
    raise FeedbackError(f"Feedback store {path} is not a SQLite database ({error}). {fix}") from None
  if tables and version != (_SCHEMA_VERSION,):
    connection.close()
    raise FeedbackError(f"{path} is a SQLite database but not a feedback store of schema {_SCHEMA_VERSION} "
                        f"(tables {sorted(tables)}, schema {version}). {fix}")
  connection.execute("PRAGMA journal_mode = WAL")  # readers never block the writer
  connection.execute("PRAGMA synchronous = FULL")  # a commit survives power loss, not just a SIGKILL
  connection.execute("BEGIN IMMEDIATE")
  for statement in _SCHEMA:
    connection.execute(statement)
  connection.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('store_id', ?)",
                     (_SCHEMA_VERSION, secrets.token_hex(4)))
  connection.execute("COMMIT")
  return connection


def _is_index(value: object, count: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count


def _check_feedback(completion_id: str, texts: list[str], choice: int, rating: int | None, preferred: int | None,
                    correction: str | None) -> None:
  """Raises FeedbackError naming the field and the fix; `texts` are the completion's choices ([]: unknown)."""
  if not texts:
    raise FeedbackError(f"completion_id {completion_id!r} is unknown to this server. Fix: send the \"id\" of a "
                        "completion this server returned.")
  count = len(texts)
  if rating is None and preferred is None and correction is None:
    raise FeedbackError("Nothing to record. Fix: send at least one of rating (+1 or -1), preferred (the index of "
                        "the best choice) or correction (a corrected text for choice).")
  if preferred is not None and count < 2:
    raise FeedbackError(f"preferred needs a completion with n >= 2 choices; {completion_id!r} has 1. Fix: request "
                        "n >= 2 to compare choices, or send a rating or a correction.")
  for name, value in (("choice", choice), ("preferred", preferred)):
    if (name == "choice" or value is not None) and not _is_index(value, count):
      raise FeedbackError(f"{name}={value!r} is out of range: completion {completion_id!r} has {count} choice(s), "
                          f"0..{count - 1}. Fix: send the \"index\" of one of its choices.")
  if rating is not None and (isinstance(rating, bool) or rating not in (-1, 1)):
    raise FeedbackError(f"rating={rating!r} is not +1 or -1. Fix: send 1 (good) or -1 (bad).")
  if correction is not None and (not isinstance(correction, str) or not correction.strip()):
    raise FeedbackError(f"correction={correction!r} is not a non-empty text. Fix: send the corrected completion.")
  if correction is not None and correction == texts[choice]:
    raise FeedbackError(f"correction is the same as choice {choice}'s text, so there is nothing to learn. Fix: "
                        "send the corrected text, or a rating.")


def _chunk_records(db: sqlite3.Connection, number: int) -> tuple[list[dict], list[dict]]:
  """Chunk `number`'s text records and preference pairs: a pure function of the rows (module docstring)."""
  texts, pairs = [], []
  rows = db.execute("SELECT f.id, f.completion_id, f.choice, f.rating, f.preferred, f.correction, c.prompt "
                    "FROM feedback f JOIN completions c ON c.id = f.completion_id WHERE f.chunk = ? ORDER BY f.id",
                    (number,)).fetchall()
  for feedback_id, completion_id, choice, rating, preferred, correction, prompt in rows:
    choices = [text for (text,) in db.execute(
        "SELECT text FROM choices WHERE completion_id = ? ORDER BY choice", (completion_id,))]

    def pair(chosen: str, rejected: str, prompt: str = prompt) -> None:
      pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})

    if rating == 1:
      texts.append({"text": prompt + choices[choice]})
    if correction is not None:
      texts.append({"text": prompt + correction})
      pair(correction, choices[choice])
    if preferred is not None:
      for other, text in enumerate(choices):
        if other != preferred:
          pair(choices[preferred], text)
    if rating is not None:  # paired with the opposite ratings given before it: each pair once, when complete
      for (other,) in db.execute("SELECT DISTINCT choice FROM feedback WHERE completion_id = ? AND id < ? AND "
                                 "rating = ? AND choice != ? ORDER BY choice",
                                 (completion_id, feedback_id, -rating, choice)):
        good, bad = (choice, other) if rating == 1 else (other, choice)
        pair(choices[good], choices[bad])
  return texts, pairs


def _write_durably(path: pathlib.Path, records: list[dict]) -> None:
  """Writes JSON lines to NAME.part, fsyncs it, renames it to `path` and fsyncs the folder."""
  path.parent.mkdir(parents=True, exist_ok=True)
  part = path.with_name(path.name + PART_SUFFIX)
  with open(part, "wb") as f:
    f.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())
  os.replace(part, path)
  descriptor = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)
