"""Tests for lm.data.stream: chunks with stable ids from a watched folder, a fixed corpus or an iterable."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests import helpers
from lm.data import sources, stream, watch
from lm.serve import feedback
from lm.core.errors import DataError

SST2_TRAIN = helpers.SHARED / "data" / "sst2" / "train.tsv"
SST2_TRAIN_ROWS = 67_349
SHAKESPEARE_VERSION_DIR = helpers.TFDS_DIR / "tiny_shakespeare" / "1.0.0"
SETTLE = 2.0


class FakeClock:
  """A monotonic clock the test moves by hand, so settling needs no sleeping."""

  def __init__(self) -> None:
    self.now = 1000.0

  def __call__(self) -> float:
    return self.now

  def advance(self, seconds: float = SETTLE) -> None:
    self.now += seconds


def write(path: Path, content: str | bytes, *, mtime: float | None = None) -> Path:
  if isinstance(content, str):
    content = content.encode("utf-8")
  path.write_bytes(content)
  if mtime is not None:
    os.utime(path, (mtime, mtime))
  return path


@pytest.fixture
def clock() -> FakeClock:
  return FakeClock()


@pytest.fixture
def watched(tmp_path: Path) -> Path:
  folder = tmp_path / "incoming"
  folder.mkdir()
  return folder


def settled(folder: Path, clock: FakeClock, **kwargs) -> stream.DirectoryStream:
  """A stream that has seen the folder's current files once and let them settle."""
  directory = stream.DirectoryStream(folder, settle_seconds=SETTLE, clock=clock, **kwargs)
  directory.next_chunk(set())
  clock.advance()
  return directory


def drain(source: stream.Stream, consumed: set[str] | None = None) -> list[stream.Chunk]:
  consumed = set() if consumed is None else consumed
  chunks = []
  while (chunk := source.next_chunk(consumed)) is not None:
    assert chunk.id not in consumed
    chunks.append(chunk)
    consumed.add(chunk.id)
  return chunks


# ----------------------------------------------------------------------------- watched folder


def test_directory_takes_files_as_they_appear_and_settle(watched, clock):
  directory = stream.DirectoryStream(watched, settle_seconds=SETTLE, clock=clock)
  assert directory.domain == "incoming"
  assert directory.next_chunk(set()) is None  # empty folder
  write(watched / "a.txt", "first para\n\nsecond para\n")
  assert directory.next_chunk(set()) is None  # seen for the first time: not settled yet
  clock.advance(SETTLE / 2)
  assert directory.next_chunk(set()) is None
  clock.advance(SETTLE / 2)
  chunk = directory.next_chunk(set())
  assert chunk == stream.Chunk(id="a.txt", domain="incoming", documents=["first para", "second para"],
                               path=str((watched / "a.txt").resolve()))
  assert directory.next_chunk({"a.txt"}) is None
  assert not directory.exhausted({"a.txt"})  # a folder never runs dry


def test_directory_waits_while_a_file_grows(watched, clock):
  directory = stream.DirectoryStream(watched, settle_seconds=SETTLE, clock=clock)
  path = write(watched / "growing.jsonl", '{"text": "one"}\n', mtime=1_000_000)
  assert directory.next_chunk(set()) is None
  clock.advance()
  write(path, '{"text": "one"}\n{"text": "two"}\n', mtime=1_000_000)  # same mtime, new size
  assert directory.next_chunk(set()) is None  # changed since the last poll: starts settling again
  clock.advance(SETTLE - 0.5)
  assert directory.next_chunk(set()) is None
  os.utime(path, (1_000_001, 1_000_001))  # same size, new mtime: also a change
  clock.advance(1.0)
  assert directory.next_chunk(set()) is None
  clock.advance()
  assert directory.next_chunk(set()).documents == ["one", "two"]


def test_directory_ignores_partial_and_hidden_names_until_renamed(watched, clock):
  for name in ("b.txt.part", "c.txt.tmp", "d.txt.partial", "e.txt.crdownload", "f.txt~", ".hidden.txt",
               "_SUCCESS"):
    write(watched / name, "being written\n")
  (watched / "not_a_dataset").mkdir()
  write(watched / "not_a_dataset" / "x.txt", "inside a plain folder\n")
  directory = settled(watched, clock)
  assert directory.next_chunk(set()) is None
  (watched / "b.txt.part").rename(watched / "b.txt")
  assert directory.next_chunk(set()) is None  # a new name must settle too
  clock.advance()
  assert directory.next_chunk(set()).id == "b.txt"
  assert directory.next_chunk({"b.txt"}) is None


def test_directory_reads_the_servers_preference_files_and_any_file_of_pairs_as_preference_chunks(watched, clock):
  # The server exports text and preference pairs side by side (lm.serve.feedback); the online loop trains the
  # language model on the text and DPO on the pairs. A .tsv or .jsonl of pairs under any name is one too.
  assert watch.PREFERENCE_SUFFIX == feedback.PREFERENCE_SUFFIX
  write(watched / "feedback-0a1b2c3d-000001.preferences.jsonl", '{"prompt": "p", "chosen": "a", "rejected": "b"}\n',
        mtime=100)
  write(watched / "feedback-0a1b2c3d-000001.jsonl", '{"text": "p a"}\n', mtime=200)
  write(watched / "ratings.tsv", "prompt\tchosen\trejected\nq\tyes\tno\n", mtime=300)
  directory = settled(watched, clock)
  chunks = drain(directory)
  assert [(chunk.id, chunk.documents) for chunk in chunks] == [("feedback-0a1b2c3d-000001.preferences.jsonl", []),
                                                                ("feedback-0a1b2c3d-000001.jsonl", ["p a"]),
                                                                ("ratings.tsv", [])]
  assert [record for record, _ in chunks[0].preferences] == [{"prompt": "p", "chosen": "a", "rejected": "b"}]
  assert chunks[0].preferences[0][1].endswith(".preferences.jsonl:1")
  assert [record for record, _ in chunks[2].preferences] == [{"prompt": "q", "chosen": "yes", "rejected": "no"}]
  assert chunks[1].preferences is None


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "p", "chosen": "a"}', "has no field"),
    ('{"prompt": "p", "chosen": "a", "rejected": " "}', "field 'rejected' is empty"),
    ('{"prompt": "p", "chosen": "a", "rejected": "a"}', "'chosen' and 'rejected' are the same text"),
])
def test_a_preference_chunk_with_a_bad_record_is_refused_naming_the_line(watched, clock, line, reason):
  write(watched / "x.preferences.jsonl", '{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + line + "\n",
        mtime=100)
  with pytest.raises(stream.ChunkError, match=f"x.preferences.jsonl:2.*{re.escape(reason)}|line 2.*{reason}"):
    settled(watched, clock).next_chunk(set())


def test_directory_orders_by_mtime_then_name_and_skips_consumed(watched, clock):
  write(watched / "z.txt", "z\n", mtime=100)
  write(watched / "b.txt", "b\n", mtime=300)
  write(watched / "a.txt", "a\n", mtime=300)
  write(watched / "m.tsv", "label\tsentence\n1\tm\n", mtime=200)
  directory = settled(watched, clock)
  assert [chunk.id for chunk in drain(directory)] == ["z.txt", "m.tsv", "a.txt", "b.txt"]
  assert directory.next_chunk({"z.txt", "a.txt"}).id == "m.tsv"
  assert directory.next_chunk({"z.txt", "m.tsv"}).id == "a.txt"


def test_directory_restart_resumes_after_the_consumed_chunks(watched, clock):
  for index, name in enumerate(["one.txt", "two.txt", "three.txt"]):
    write(watched / name, f"{name}\n", mtime=100 + index)
  consumed = {"one.txt"}
  first = settled(watched, clock)
  assert first.next_chunk(consumed).id == "two.txt"
  # Crash before "two.txt" was recorded; a new process makes a new stream.
  restarted = stream.DirectoryStream(watched, settle_seconds=SETTLE, clock=clock)
  assert restarted.next_chunk(consumed) is None  # nothing is ready until it has watched a while
  clock.advance()
  assert restarted.next_chunk(consumed).id == "two.txt"
  consumed.add("two.txt")
  again = stream.DirectoryStream(watched, settle_seconds=0)  # settle 0: ready on first sight
  assert again.next_chunk(consumed).id == "three.txt"
  assert again.next_chunk(consumed | {"three.txt"}) is None


@pytest.mark.parametrize("name, content, expected", [
    ("latin1.txt", "caf\u00e9\n".encode("latin-1"), "not valid UTF-8"),
    ("empty.txt", b"", "holds no text"),
    ("broken.jsonl", b'{"text": "fine"}\n{"text": \n', "line 2 is not valid JSON"),
    ("notes.md", b"# a stray file\n", "unsupported type '.md'"),
])
def test_directory_unreadable_file_raises_chunk_error_naming_it(watched, clock, name, content, expected):
  write(watched / name, content, mtime=100)
  write(watched / "good.txt", "good\n", mtime=200)
  directory = settled(watched, clock)
  with pytest.raises(stream.ChunkError, match=expected) as raised:
    directory.next_chunk(set())
  assert raised.value.chunk_id == name
  assert raised.value.path == str((watched / name).resolve())
  assert name in str(raised.value) and "Fix:" in str(raised.value)
  assert isinstance(raised.value, DataError)
  # The loop quarantines it and marks it consumed; the stream goes on.
  assert directory.next_chunk({name}).id == "good.txt"


def test_directory_removed_raises_stream_error(watched, clock):
  directory = settled(watched, clock)
  shutil.rmtree(watched)
  with pytest.raises(stream.StreamError, match="no longer exists.*Fix:.*consumed are recorded in the checkpoint"):
    directory.next_chunk(set())
  with pytest.raises(stream.StreamError, match="does not exist"):
    stream.DirectoryStream(watched)


@pytest.mark.skipif(not SHAKESPEARE_VERSION_DIR.is_dir(), reason="needs ../shared/tfds")
def test_directory_takes_a_finished_tfds_folder_as_one_chunk(watched, clock):
  directory = stream.DirectoryStream(watched, domain="plays", settle_seconds=SETTLE, clock=clock)
  # Copied under a temporary name, then renamed into place, as a writer should.
  shutil.copytree(SHAKESPEARE_VERSION_DIR, watched / "_copying")
  assert directory.next_chunk(set()) is None
  (watched / "_copying").rename(watched / "shakespeare_drop")
  # `tfds build --data_dir=D` nests the files as NAME/VERSION: that layout is a chunk too.
  shutil.copytree(SHAKESPEARE_VERSION_DIR, watched / "nested" / "1.0.0")
  os.utime(watched / "nested", (time.time() + 10,) * 2)  # taken after the first folder
  assert directory.next_chunk(set()) is None
  clock.advance()
  chunk = directory.next_chunk(set())
  assert (chunk.id, chunk.domain) == ("shakespeare_drop", "plays")
  assert chunk.path == str((watched / "shakespeare_drop").resolve())
  expected = [text for split in ("train", "validation", "test")
              for text in sources.open_split("tfds:tiny_shakespeare", split)]
  assert chunk.documents == expected
  nested = directory.next_chunk({"shakespeare_drop"})
  assert (nested.id, nested.documents) == ("nested", expected)


@pytest.mark.skipif(not SHAKESPEARE_VERSION_DIR.is_dir(), reason="needs ../shared/tfds")
def test_directory_damaged_tfds_folder_raises_chunk_error(watched, clock):
  shutil.copytree(SHAKESPEARE_VERSION_DIR, watched / "damaged")
  train = next((watched / "damaged").glob("*-train.array_record*"))
  train.write_bytes(b"not an array_record file")
  directory = settled(watched, clock)
  with pytest.raises(stream.ChunkError, match="damaged.*cannot be opened.*Fix:") as raised:
    directory.next_chunk(set())
  assert raised.value.chunk_id == "damaged"


# ----------------------------------------------------------------------------- fixed corpus


@pytest.fixture(scope="module")
def shakespeare_chunks() -> tuple[stream.FixedStream, list[stream.Chunk]]:
  fixed = stream.FixedStream("tfds:tiny_shakespeare", num_chunks=5)
  return fixed, drain(fixed)


def test_fixed_cuts_one_huge_document_into_even_ordered_chunks(shakespeare_chunks):
  fixed, chunks = shakespeare_chunks
  assert fixed.domain == "tiny_shakespeare"
  assert [chunk.id for chunk in chunks] == [f"tiny_shakespeare-{k}-of-005" for k in ("001", "002", "003", "004",
                                                                                      "005")]
  (text,) = sources.open_split("tfds:tiny_shakespeare", "train")
  # The pieces of the one document concatenate back to it: every character once, in order.
  assert "".join(document for chunk in chunks for document in chunk.documents) == text
  sizes = [sum(map(len, chunk.documents)) for chunk in chunks]
  assert max(sizes) <= 1.2 * min(sizes), sizes
  # Cuts fall at paragraph breaks, so each chunk after the first starts a speech.
  for chunk in chunks[1:]:
    assert not chunk.documents[0].startswith(("\n", " ")) and chunk.documents[0].split("\n")[0].endswith(":")


def test_fixed_is_deterministic_and_exhausts(shakespeare_chunks):
  fixed, chunks = shakespeare_chunks
  again = stream.FixedStream("tfds:tiny_shakespeare:train", num_chunks=5)
  assert drain(again) == chunks
  consumed = {chunks[0].id, chunks[2].id}
  assert again.next_chunk(consumed) == chunks[1]
  assert not again.exhausted(consumed)
  all_ids = {chunk.id for chunk in chunks}
  assert again.exhausted(all_ids) and again.next_chunk(all_ids) is None
  assert not fixed.exhausted(set())


def test_fixed_groups_many_small_documents_whole(tmp_path):
  fixed = stream.FixedStream(str(SST2_TRAIN), num_chunks=5, cache_dir=str(tmp_path / "cache"))
  assert fixed.domain == "sst2"
  chunks = drain(fixed)
  assert [chunk.id for chunk in chunks] == [f"sst2-00{k}-of-005" for k in range(1, 6)]
  sentences = [line.split("\t")[1] for line in SST2_TRAIN.read_text(encoding="utf-8").splitlines()[1:]]
  assert len(sentences) == SST2_TRAIN_ROWS
  assert [document for chunk in chunks for document in chunk.documents] == sentences
  counts = [len(chunk.documents) for chunk in chunks]
  assert max(counts) <= 1.2 * min(counts), counts


def test_fixed_small_corpus_edge_cases_and_domain(tmp_path):
  corpus = tmp_path / "news" / "2024.txt"
  corpus.parent.mkdir()
  write(corpus, "alpha beta\n\n\n\ngamma\n\ndelta epsilon zeta\n")
  cache = str(tmp_path / "cache")
  fixed = stream.FixedStream(str(corpus), num_chunks=3, cache_dir=cache)
  assert fixed.domain == "2024"
  chunks = drain(fixed)
  assert len(chunks) == 3 and all(chunk.documents for chunk in chunks)
  assert "".join(d for chunk in chunks for d in chunk.documents) == "alpha betagammadelta epsilon zeta"
  write(tmp_path / "news" / "validation.txt", "held out\n")
  assert stream.FixedStream(str(tmp_path / "news" / "validation.txt"), num_chunks=1,
                            cache_dir=cache).domain == "news"
  with pytest.raises(DataError, match="too few for 100 chunks.*Fix: set config.online.chunks to at most 33"):
    stream.FixedStream(str(corpus), num_chunks=100, cache_dir=cache)
  with pytest.raises(DataError, match="at least 1 chunk.*Fix"):
    stream.FixedStream(str(corpus), num_chunks=0, cache_dir=cache)


# ----------------------------------------------------------------------------- iterable


def test_iterable_chunks_ids_and_exhaustion():
  texts = [f"doc {i}" for i in range(7)]
  iterable = stream.IterableStream(texts, domain="notes", chunk_size=3)
  chunks = drain(iterable)
  assert [(chunk.id, chunk.documents) for chunk in chunks] == [
      ("notes-00001", texts[0:3]), ("notes-00002", texts[3:6]), ("notes-00003", texts[6:])]
  assert iterable.exhausted({chunk.id for chunk in chunks})
  # Asking again without consuming gives the same chunk; a new stream over the same list resumes.
  fresh = stream.IterableStream(texts, domain="notes", chunk_size=3)
  assert not fresh.exhausted({"notes-00001"})
  assert fresh.next_chunk({"notes-00001"}) == fresh.next_chunk({"notes-00001"}) == chunks[1]
  assert fresh.next_chunk({"notes-00001", "notes-00002"}) == chunks[2]


def test_iterable_is_lazy_and_reports_non_text_items():
  pulled = []

  def generate():
    for i in range(10):
      pulled.append(i)
      yield b"bytes" if i == 3 else f"t{i}"

  iterable = stream.IterableStream(generate(), domain="gen", chunk_size=2)
  assert iterable.next_chunk(set()).documents == ["t0", "t1"]
  assert pulled == [0, 1]
  with pytest.raises(stream.ChunkError, match="item 3 of the iterable is a bytes") as raised:
    iterable.next_chunk({"gen-00001"})
  assert raised.value.chunk_id == "gen-00002" and raised.value.path is None
  assert iterable.next_chunk({"gen-00001", "gen-00002"}).documents == ["t4", "t5"]
  with pytest.raises(DataError, match="chunk_size"):
    stream.IterableStream([], domain="x", chunk_size=0)


# ----------------------------------------------------------------------------- parse_stream and quarantine


def test_parse_stream_dispatches(watched, tmp_path):
  directory = stream.parse_stream(f"dir:{watched}", num_chunks=5, settle_seconds=0)
  assert isinstance(directory, stream.DirectoryStream)
  assert (directory.domain, directory.settle_seconds) == ("incoming", 0)
  corpus = write(tmp_path / "corpus.txt", "one\n\ntwo\n")
  fixed = stream.parse_stream(str(corpus), num_chunks=2, domain="mine", cache_dir=str(tmp_path / "cache"))
  assert isinstance(fixed, stream.FixedStream)
  assert [chunk.id for chunk in drain(fixed)] == ["mine-001-of-002", "mine-002-of-002"]
  assert isinstance(stream.parse_stream("tfds:tiny_shakespeare:test", num_chunks=2), stream.FixedStream)
  with pytest.raises(DataError, match=r"config.online.stream is empty: set it to dir:PATH, tfds:NAME\[:SPLIT\]"):
    stream.parse_stream("  ", num_chunks=5)
  with pytest.raises(stream.StreamError, match="does not exist.*Fix"):
    stream.parse_stream(f"dir:{tmp_path / 'missing'}", num_chunks=5)


def test_quarantine_moves_with_reason_and_handles_clashes(tmp_path, watched):
  workdir = tmp_path / "work"
  first = stream.quarantine(write(watched / "bad.txt", b"\xff"), workdir, "not UTF-8")
  assert first == workdir / "quarantine" / "bad.txt"
  assert first.read_bytes() == b"\xff" and not (watched / "bad.txt").exists()
  assert (workdir / "quarantine" / "bad.txt.reason.txt").read_text().startswith("not UTF-8\n")
  second = stream.quarantine(write(watched / "bad.txt", b"\xfe"), workdir, "again")
  assert second == workdir / "quarantine" / "bad.1.txt" and second.read_bytes() == b"\xfe"
  assert first.read_bytes() == b"\xff"
  assert "again" in (workdir / "quarantine" / "bad.1.txt.reason.txt").read_text()
  (watched / "folder").mkdir()
  write(watched / "folder" / "x.array_record-0", b"x")
  moved = stream.quarantine(watched / "folder", workdir, "damaged")
  assert (moved / "x.array_record-0").exists() and not (watched / "folder").exists()
  # Already gone: no error, the would-be path comes back, nothing is written.
  assert stream.quarantine(watched / "gone.txt", workdir, "x") == workdir / "quarantine" / "gone.txt"
  assert not (workdir / "quarantine" / "gone.txt.reason.txt").exists()
