"""Tests for lm.serve.feedback: real SQLite, real files, real processes killed with SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from lm.serve.feedback import DATABASE_NAME, FeedbackError, FeedbackStore

FAR = 3600.0  # an interval no test reaches, so only size or force finishes a chunk
NAME = re.compile(r"^feedback-[0-9a-f]{8}-\d{6}(\.preferences)?\.jsonl$")

# A server in miniature: records a completion (choice 0 good, 1 bad) and feedback, prints the store id and
# the feedback id once the calls returned, then exports (LM_FAULTS kills it inside) or blocks until killed.
CHILD = textwrap.dedent("""
    import sys, time
    from lm.serve.feedback import FeedbackStore
    store = FeedbackStore(sys.argv[1])
    print(store.store_id, flush=True)
    store.record_completion(completion_id="c1", prompt="P: ", texts=["good", "bad"], model_version="v1",
                            settings={"n": 2}, created=time.time())
    print(store.record_feedback(completion_id="c1", choice=0, rating=1, preferred=0), flush=True)
    if len(sys.argv) > 2:
      store.export(sys.argv[2], chunk_size=100, interval_s=3600, force=True)
    else:
      time.sleep(60)
""")
CHILD_TEXTS = [{"text": "P: good"}]
CHILD_PAIRS = [{"prompt": "P: ", "chosen": "good", "rejected": "bad"}]


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
  return tmp_path / "workdir" / "serve"


@pytest.fixture
def watched(tmp_path: Path) -> Path:
  return tmp_path / "watched"


@pytest.fixture
def store(store_dir: Path):
  with FeedbackStore(store_dir) as opened:
    yield opened


def completion(store: FeedbackStore, completion_id: str, texts: list[str], prompt: str = "P: ") -> None:
  store.record_completion(completion_id=completion_id, prompt=prompt, texts=texts, model_version="v1",
                          settings={"temperature": 0.7, "n": len(texts)}, created=time.time())


def rated(store: FeedbackStore, count: int, prefix: str = "c") -> list[str]:
  """`count` one-choice completions, each rated +1: each feedback record is one text line."""
  for index in range(count):
    completion(store, f"{prefix}{index}", [f"text {prefix}{index}"])
    store.record_feedback(completion_id=f"{prefix}{index}", rating=1)
  return [f"P: text {prefix}{index}" for index in range(count)]


def read_jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def texts_in(paths: list[Path]) -> list[str]:
  return [record["text"] for path in paths if not path.name.endswith(".preferences.jsonl")
          for record in read_jsonl(path)]


def chunk_states(store_dir: Path) -> list[tuple[int, str]]:
  with sqlite3.connect(store_dir / DATABASE_NAME) as db:
    return db.execute("SELECT number, state FROM chunks ORDER BY number").fetchall()


def run_child(store_dir: Path, *args: str, faults: str = "") -> subprocess.Popen:
  env = dict(os.environ, LM_FAULTS=faults, PYTHONPATH=str(ROOT))
  return subprocess.Popen([sys.executable, "-c", CHILD, str(store_dir), *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, text=True)


def test_export_writes_text_and_preference_records(store, store_dir, watched):
  assert re.fullmatch(r"[0-9a-f]{8}", store.store_id)
  completion(store, "c1", ["A", "B"])
  completion(store, "c2", ["a", "b"], prompt="Q: ")
  ids = [store.record_feedback(completion_id="c1", choice=0, rating=1),
         store.record_feedback(completion_id="c1", preferred=1),
         store.record_feedback(completion_id="c1", choice=0, correction="C"),
         store.record_feedback(completion_id="c2", choice=1, rating=1),
         store.record_feedback(completion_id="c2", choice=0, rating=-1)]
  assert ids == [1, 2, 3, 4, 5]
  written = store.export(watched, chunk_size=100, interval_s=FAR, force=True)
  stem = f"feedback-{store.store_id}-000001"
  assert written == [watched / f"{stem}.jsonl", watched / f"{stem}.preferences.jsonl"]
  assert sorted(path.name for path in watched.iterdir()) == sorted(path.name for path in written)
  assert all(NAME.match(path.name) for path in written)  # so no .part is left either
  assert read_jsonl(written[0]) == [{"text": "P: A"}, {"text": "P: C"}, {"text": "Q: b"}]
  assert read_jsonl(written[1]) == [{"prompt": "P: ", "chosen": "B", "rejected": "A"},
                                    {"prompt": "P: ", "chosen": "C", "rejected": "A"},
                                    {"prompt": "Q: ", "chosen": "b", "rejected": "a"}]
  assert store.export(watched, chunk_size=100, interval_s=0, force=True) == []
  store.close()
  with FeedbackStore(store_dir) as reopened:  # the id is kept, and nothing is exported twice
    assert reopened.store_id == store.store_id
    assert reopened.export(watched, chunk_size=1, interval_s=0, force=True) == []


def test_ratings_pair_across_chunks_and_lone_negatives_write_nothing(store, watched):
  completion(store, "c1", ["good", "bad"])
  store.record_feedback(completion_id="c1", choice=1, rating=-1)
  assert store.export(watched, chunk_size=100, interval_s=FAR, force=True) == []  # done, but nothing to learn
  store.record_feedback(completion_id="c1", choice=0, rating=1)
  text, pairs = store.export(watched, chunk_size=100, interval_s=FAR, force=True)
  assert text.name == f"feedback-{store.store_id}-000002.jsonl"
  assert read_jsonl(text) == [{"text": "P: good"}]
  assert read_jsonl(pairs) == [{"prompt": "P: ", "chosen": "good", "rejected": "bad"}]


@pytest.mark.parametrize("feedback, message", [
    ({"completion_id": "nope", "rating": 1}, "completion_id 'nope' is unknown"),
    ({"completion_id": "two", "choice": 2, "rating": 1}, "choice=2 is out of range"),
    ({"completion_id": "two", "choice": -1, "rating": 1}, "choice=-1 is out of range"),
    ({"completion_id": "two", "rating": 0}, "rating=0 is not +1 or -1"),
    ({"completion_id": "two", "rating": True}, "rating=True is not +1 or -1"),
    ({"completion_id": "one", "preferred": 0}, "preferred needs a completion with n >= 2"),
    ({"completion_id": "two", "preferred": 5}, "preferred=5 is out of range"),
    ({"completion_id": "two"}, "Nothing to record"),
    ({"completion_id": "two", "correction": "  "}, "correction='  ' is not a non-empty text"),
    ({"completion_id": "two", "choice": 1, "correction": "B"}, "correction is the same as choice 1's text"),
])
def test_bad_feedback_is_refused_naming_the_field_and_the_fix(store, watched, feedback, message):
  completion(store, "one", ["A"])
  completion(store, "two", ["A", "B"])
  with pytest.raises(FeedbackError, match=re.escape(message)) as raised:
    store.record_feedback(**feedback)
  assert "Fix: " in str(raised.value)
  assert store.export(watched, chunk_size=1, interval_s=0, force=True) == []  # nothing was recorded


def test_a_completion_id_is_recorded_once(store):
  completion(store, "c1", ["A"])
  with pytest.raises(FeedbackError, match="'c1' is already recorded.*Fix: "):
    completion(store, "c1", ["B"])


def test_size_trigger_makes_full_chunks_oldest_first(store, watched):
  expected = rated(store, 7)
  now = time.time()
  first = store.export(watched, chunk_size=3, interval_s=FAR, now=now)
  assert [path.name for path in first] == [f"feedback-{store.store_id}-00000{n}.jsonl" for n in (1, 2)]
  assert texts_in(first) == expected[:6]  # the seventh waits for two more, or for time
  assert store.export(watched, chunk_size=3, interval_s=FAR, now=now) == []
  expected += rated(store, 2, prefix="d")
  assert texts_in(store.export(watched, chunk_size=3, interval_s=FAR, now=now)) == expected[6:]


def test_interval_trigger_exports_once_the_oldest_is_old_enough(store, watched):
  start = time.time()
  expected = rated(store, 2)
  assert store.export(watched, chunk_size=10, interval_s=60, now=start + 59) == []
  assert texts_in(store.export(watched, chunk_size=10, interval_s=60, now=time.time() + 60)) == expected
  assert store.export(watched, chunk_size=10, interval_s=60, now=time.time() + 600) == []


def test_force_exports_whatever_is_pending(store, watched):
  assert store.export(watched, chunk_size=10, interval_s=FAR, force=True) == []
  expected = rated(store, 1)
  assert store.export(watched, chunk_size=10, interval_s=FAR) == []
  assert texts_in(store.export(watched, chunk_size=10, interval_s=FAR, force=True)) == expected


def test_recorded_feedback_survives_sigkill_and_exports_once(store_dir, watched):
  child = run_child(store_dir)
  try:
    store_id = child.stdout.readline().strip()
    feedback_id = int(child.stdout.readline())  # printed after record_feedback returned
  finally:
    child.kill()
    child.wait(timeout=30)
  assert child.returncode == -signal.SIGKILL
  with FeedbackStore(store_dir) as store:
    assert (store.store_id, feedback_id) == (store_id, 1)
    text, pairs = store.export(watched, chunk_size=100, interval_s=FAR, force=True)
    assert (read_jsonl(text), read_jsonl(pairs)) == (CHILD_TEXTS, CHILD_PAIRS)
    assert store.export(watched, chunk_size=1, interval_s=0, force=True) == []


def test_chunk_assigned_but_not_written_is_finished_once_by_the_next_store(store_dir, watched):
  child = run_child(store_dir, str(watched), faults="serve/feedback_assigned@1=SIGKILL")
  store_id = child.stdout.readline().strip()
  assert child.wait(timeout=30) == -signal.SIGKILL
  assert chunk_states(store_dir) == [(1, "assigned")]
  stem = watched / f"feedback-{store_id}-000001"
  assert not watched.exists() or not list(watched.iterdir())
  watched.mkdir(exist_ok=True)  # as if it had died halfway through writing: a stale, torn .part
  Path(f"{stem}.jsonl.part").write_text('{"text": "half', encoding="utf-8")
  with FeedbackStore(store_dir) as store:  # finishes the chunk on construction, from the rows
    assert chunk_states(store_dir) == [(1, "written")]
    assert sorted(watched.iterdir()) == [Path(f"{stem}.jsonl"), Path(f"{stem}.preferences.jsonl")]
    assert read_jsonl(Path(f"{stem}.jsonl")) == CHILD_TEXTS
    assert read_jsonl(Path(f"{stem}.preferences.jsonl")) == CHILD_PAIRS
    assert store.export(watched, chunk_size=1, interval_s=0, force=True) == []
    stale = watched / f"feedback-{store_id}-000007.jsonl.part"
    stale.write_text("left by a crash", encoding="utf-8")
    expected = rated(store, 1)
    assert texts_in(store.export(watched, chunk_size=1, interval_s=0)) == expected  # chunk 2: only the new one
    assert not stale.exists()


def test_an_export_that_failed_halfway_is_finished_by_the_next(store, watched):
  expected = rated(store, 2)
  watched.write_text("a file where the folder should be", encoding="utf-8")
  with pytest.raises(OSError):
    store.export(watched, chunk_size=2, interval_s=FAR)
  assert chunk_states(store.path.parent) == [(1, "assigned")]
  watched.unlink()
  written = store.export(watched, chunk_size=2, interval_s=FAR)
  assert [path.name for path in written] == [f"feedback-{store.store_id}-000001.jsonl"]
  assert texts_in(written) == expected
  assert chunk_states(store.path.parent) == [(1, "written")]


@pytest.mark.parametrize("lost", [None, ".preferences.jsonl"])
def test_chunk_written_but_not_marked_is_never_rewritten(store_dir, watched, lost):
  child = run_child(store_dir, str(watched), faults="serve/feedback_written@1=SIGKILL")
  store_id = child.stdout.readline().strip()
  assert child.wait(timeout=30) == -signal.SIGKILL
  assert chunk_states(store_dir) == [(1, "assigned")]
  text = watched / f"feedback-{store_id}-000001.jsonl"
  pairs = watched / f"feedback-{store_id}-000001.preferences.jsonl"
  if lost:  # killed between the two renames: the second file is missing
    pairs.unlink()
  before = os.stat(text)
  with FeedbackStore(store_dir) as store:
    assert chunk_states(store_dir) == [(1, "written")]
    after = os.stat(text)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # the same file, untouched
    assert (read_jsonl(text), read_jsonl(pairs)) == (CHILD_TEXTS, CHILD_PAIRS)
    assert store.export(watched, chunk_size=1, interval_s=0, force=True) == []
  assert sorted(watched.iterdir()) == [text, pairs]


@pytest.mark.parametrize("kind", ["text", "other_sqlite"])
def test_a_file_that_is_not_a_feedback_store_is_refused_untouched(store_dir, kind):
  store_dir.mkdir(parents=True)
  path = store_dir / DATABASE_NAME
  if kind == "text":
    path.write_bytes(b"these are notes, not a database\n" * 200)
  else:
    with sqlite3.connect(path) as db:
      db.execute("CREATE TABLE users (name TEXT)")
    db.close()
  content = path.read_bytes()
  with pytest.raises(FeedbackError, match=re.escape(str(path)) + ".*Fix: move it aside"):
    FeedbackStore(store_dir)
  assert path.read_bytes() == content
  assert sorted(store_dir.iterdir()) == [path]  # no -wal or -shm either


def test_two_stores_in_one_folder_never_collide(tmp_path, watched):
  names = set()
  for server in ("a", "b"):
    with FeedbackStore(tmp_path / server) as store:
      rated(store, 1)
      names |= {path.name for path in store.export(watched, chunk_size=1, interval_s=FAR)}
  assert len(names) == 2 and len({name.split("-")[1] for name in names}) == 2


def test_concurrent_recording_and_exporting_puts_every_record_in_one_chunk(store, watched):
  writers, per_writer, chunk_size = 4, 15, 7
  start = threading.Barrier(writers + 2)
  recorded = threading.Event()
  written: list[Path] = []
  errors: list[BaseException] = []

  def record(writer: int) -> None:
    start.wait()
    for index in range(per_writer):
      completion(store, f"t{writer}-{index}", [f"text {writer}-{index}", "other"])
      store.record_feedback(completion_id=f"t{writer}-{index}", rating=1)

  def export() -> None:  # two exporters racing each other and the writers
    start.wait()
    while not recorded.is_set():
      written.extend(store.export(watched, chunk_size=chunk_size, interval_s=FAR))

  def guarded(target, *args) -> threading.Thread:
    def run() -> None:
      try:
        target(*args)
      except BaseException as error:  # pylint: disable=broad-except
        errors.append(error)
    return threading.Thread(target=run)

  recorders = [guarded(record, writer) for writer in range(writers)]
  exporters = [guarded(export), guarded(export)]
  for thread in recorders + exporters:
    thread.start()
  for thread in recorders:
    thread.join()
  recorded.set()
  for thread in exporters:
    thread.join()
  written += store.export(watched, chunk_size=chunk_size, interval_s=FAR, force=True)
  assert not errors
  assert len(written) == len(set(written)) == len(list(watched.iterdir()))
  assert all(len(read_jsonl(path)) <= chunk_size for path in written)
  assert sorted(texts_in(written)) == sorted(f"P: text {w}-{i}" for w in range(writers) for i in range(per_writer))
