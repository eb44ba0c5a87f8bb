"""Token caches: prepared once by Beam, equal to in-memory tokenization, read in O(1), and safe under faults."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from lm.core.errors import DataError
from lm.data import corpus, local_files, pipeline, prepare, token_cache, tokenizers
from tests.helpers import ROOT, SHARED

SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"


def options(tmp_path: Path, **extra) -> prepare.PrepareOptions:
  return prepare.PrepareOptions(cache_dir=str(tmp_path / "cache"), **{"workers": 1, **extra})


def whole(stream: token_cache.TokenStream) -> np.ndarray:
  return stream[0:len(stream)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
  """A folder with train.txt (paragraphs, CRLF, blank lines of spaces, a BOM), validation.jsonl, test.tsv."""
  root = tmp_path_factory.mktemp("corpus")
  paragraphs = SHAKESPEARE.read_text().split("\n\n")[:400]
  separators = ["\r\n\r\n", "\n  \n", "\n\n\n", "\n\t\n"]
  text = "\ufeff" + "".join(p.replace("\n", "\r\n" if i % 3 == 0 else "\n") + separators[i % 4]
                            for i, p in enumerate(paragraphs))
  (root / "train.txt").write_text(text, encoding="utf-8")
  (root / "validation.jsonl").write_text("".join(json.dumps({"text": p, "n": i}) + "\n"
                                                 for i, p in enumerate(paragraphs[:50])))
  (root / "test.tsv").write_text("label\tsentence\n" + "".join(f"{i % 2}\t{p.splitlines()[0]}\n"
                                                                for i, p in enumerate(paragraphs[:60])))
  return root


@pytest.mark.parametrize("split", ["train", "validation", "test"])
@pytest.mark.parametrize("kind", ["byte", "char"])
def test_a_cached_split_is_the_in_memory_stream_token_for_token(corpus_dir, tmp_path, split, kind):
  source = corpus.Split(str(corpus_dir), split)
  documents = list(source)
  tokenizer = (tokenizers.ByteTokenizer() if kind == "byte" else
               tokenizers.CharTokenizer.from_texts(documents + ["\n\n"]))
  expected = prepare.tokenize_documents(documents, tokenizer, name="x")
  # Small shards: ranges of the file cut at document boundaries, several per file.
  stream = prepare.token_stream(source, tokenizer, options(tmp_path, shard_mb=0.0005))
  manifest = token_cache.read_manifest(prepare.cache_directory(source, tokenizer, options(tmp_path)))
  assert len(manifest["shards"]) > 1
  np.testing.assert_array_equal(whole(stream), whole(expected))
  assert stream.num_documents == len(documents) == expected.num_documents
  assert stream.chars_per_token == pytest.approx(expected.chars_per_token)
  # Document ids: each document's tokens, separator included, carry its index.
  np.testing.assert_array_equal(stream.document_ids(0, len(stream)), expected.document_ids(0, len(expected)))
  ids = stream.document_ids(0, len(stream))
  assert ids[0] == 0 and ids[-1] == len(documents) - 1 and np.all(np.diff(ids) >= 0)


def test_the_tfds_split_is_cached_as_the_old_pipeline_read_it(tmp_path):
  source = corpus.Split("tfds:tiny_shakespeare", "validation")
  tokenizer = tokenizers.ByteTokenizer()
  stream = prepare.token_stream(source, tokenizer, options(tmp_path))
  np.testing.assert_array_equal(whole(stream), pipeline.tokenize_split(source.open(), tokenizer))
  assert stream.name == "tfds:tiny_shakespeare:validation"


def test_one_and_two_workers_write_identical_shards(corpus_dir, tmp_path):
  source = corpus.Split(str(corpus_dir), "train")
  tokenizer = tokenizers.ByteTokenizer()
  written = []
  for workers in (1, 2):
    opts = options(tmp_path / str(workers), workers=workers, shard_mb=0.02)
    directory = prepare.ensure_prepared(source, tokenizer, opts)
    manifest = token_cache.read_manifest(directory)
    assert manifest["prepared_by"]["runner"].count("multi_processing") == (workers == 2)
    written.append({path.name: path.read_bytes() for path in sorted(Path(directory).glob("shard-*"))})
  assert len(written[0]) >= 4 and written[0] == written[1]


def test_opening_a_cache_costs_the_same_for_any_size_and_windows_shuffle_without_a_permutation(tmp_path):
  """A 12 GB cache (a sparse file: no disk used) opens in milliseconds and yields shuffled windows over
  6e9 tokens (more than 2**32 windows) without materializing anything of their size."""
  directory = tmp_path / "big"
  directory.mkdir()
  tokens = 6_000_000_000
  with open(directory / "shard-00000-of-00001.tokens", "wb") as f:
    f.truncate(tokens * 2)
  (directory / "shard-00000-of-00001.docs").write_bytes(np.array([0, 3_000_000_000], "<i8").tobytes())
  manifest = token_cache.make_manifest(
      source={"kind": "test"}, fingerprint="f", tokenizer={"kind": "byte"}, dtype=np.dtype("<u2"), separator=[0],
      trim=0, shards=[token_cache.ShardInfo(0, "shard-00000-of-00001", tokens, 2, tokens)], prepared_by={})
  token_cache.write_manifest(directory, manifest)
  started = time.perf_counter()
  stream = token_cache.open_cache(directory, name="big", tokenizer={"kind": "byte"})
  windows = pipeline.Windows(stream, 64, 1, document_mask=True)
  opened_in = time.perf_counter() - started
  assert len(windows) > 2**32 and opened_in < 1.0  # generous: it is one small JSON read
  dataset = pipeline.train_dataset(windows, seed=0, global_batch_size=4)
  batch = dataset[10**6]
  assert batch["inputs"].shape == (4, 64) and batch["segment_ids"].shape == (4, 64)
  # The window that straddles the second document sees it as another segment.
  straddling = pipeline._split_inputs_targets({k: v[None] for k, v in windows[3_000_000_000 - 10].items()})
  assert straddling["segment_ids"][0, 9] == 0 and straddling["segment_ids"][0, 10] == 1
  assert straddling["mask"][0, 9] == 0 and straddling["positions"][0, 10] == 0 and straddling["positions"][0, 20] == 10


def test_document_masked_batches_follow_the_documents():
  stream = prepare.tokenize_documents(["ab", "cdef", "g"], tokenizers.ByteTokenizer(), name="three")
  # ids: a b EOS c d e f EOS g EOS -> documents 0 0 0 1 1 1 1 1 2 2
  windows = pipeline.Windows(stream, 8, 1, document_mask=True)
  batch = pipeline._split_inputs_targets({k: v[None] for k, v in windows[1].items()})  # b EOS c d e f EOS g | EOS
  np.testing.assert_array_equal(batch["segment_ids"][0], [0, 0, 1, 1, 1, 1, 1, 2])
  np.testing.assert_array_equal(batch["positions"][0], [0, 1, 0, 1, 2, 3, 4, 0])
  np.testing.assert_array_equal(batch["mask"][0], [1, 0, 1, 1, 1, 1, 0, 1])  # no loss on c (after b EOS) nor on g


def test_a_changed_corpus_is_prepared_again_with_a_warning(tmp_path, caplog):
  path = tmp_path / "notes.txt"
  path.write_text("first paragraph\n\nsecond one\n")
  source = corpus.Split(str(path), "train")
  tokenizer = tokenizers.ByteTokenizer()
  assert len(prepare.token_stream(source, tokenizer, options(tmp_path))) == len("first paragraph") + len("second one") + 2
  path.write_text("first paragraph\n\nsecond one, longer now\n")
  with caplog.at_level(logging.WARNING):
    stream = prepare.token_stream(source, tokenizer, options(tmp_path))
  assert "changed after its token cache" in caplog.text
  assert bytes(whole(stream)[:-1].astype(np.uint8)).decode().endswith("second one, longer now")


def test_caches_are_keyed_by_source_and_tokenizer_and_checked_on_open(corpus_dir, tmp_path):
  source = corpus.Split(str(corpus_dir), "validation")
  byte, char = tokenizers.ByteTokenizer(), tokenizers.CharTokenizer.from_texts(list(source) + ["\n\n"])
  opts = options(tmp_path)
  directories = {prepare.ensure_prepared(source, tok, opts) for tok in (byte, char)}
  directories.add(prepare.cache_directory(corpus.Split(str(corpus_dir), "test"), byte, opts))
  directories.add(prepare.cache_directory(corpus.Split(str(corpus_dir), "test", text_field="label"), byte, opts))
  assert len(directories) == 4
  byte_dir = prepare.cache_directory(source, byte, opts)
  with pytest.raises(token_cache.CacheError, match="another tokenizer"):
    token_cache.open_cache(byte_dir, name="x", tokenizer=tokenizers.identity(char))
  manifest = token_cache.read_manifest(byte_dir)
  token_cache.write_manifest(byte_dir, dict(manifest, format_version=99))
  with pytest.raises(token_cache.CacheError, match="format version 99; this lm reads version 1. Fix: delete"):
    prepare.token_stream(source, byte, opts)


def test_a_malformed_file_stops_preparation_naming_the_line_and_leaves_no_manifest(tmp_path):
  folder = tmp_path / "bad"
  folder.mkdir()
  lines = [json.dumps({"text": f"line {i}"}) for i in range(3000)]
  lines[2500] = "{not json"
  (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
  source = corpus.Split(str(folder), "train")
  opts = options(tmp_path, shard_mb=0.005)  # line 2501 falls in a shard that starts mid-file
  with pytest.raises(DataError, match=r"train.jsonl line 2501 is not valid JSON"):
    prepare.token_stream(source, tokenizers.ByteTokenizer(), opts)
  directory = prepare.cache_directory(source, tokenizers.ByteTokenizer(), opts)
  assert not (directory / token_cache.MANIFEST).exists() and not list(directory.glob("shard-*"))
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n  \n")
  with pytest.raises(DataError, match="holds no text"):
    prepare.token_stream(corpus.Split(str(empty), "train"), tokenizers.ByteTokenizer(), opts)


_KILLABLE = textwrap.dedent("""
    import sys
    from lm.data import corpus, prepare, tokenizers
    source = corpus.Split(sys.argv[1], "train")
    prepare.ensure_prepared(source, tokenizers.ByteTokenizer(), prepare.PrepareOptions(cache_dir=sys.argv[2],
                            workers=1, shard_mb=0.05))
""")


def test_a_preparation_killed_midway_leaves_no_manifest_and_is_prepared_again(tmp_path):
  big = tmp_path / "big.txt"
  big.write_text((SHAKESPEARE.read_text() + "\n\n") * 18)  # 20 MB: about 400 shards of 50 KB
  cache = tmp_path / "cache"
  process = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(big), str(cache)], cwd=ROOT)
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and len(list(cache.glob("tokens/*/shard-*.tokens"))) < 20:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  directory = next(cache.glob("tokens/*"))
  shards = list(directory.glob("shard-*.tokens"))
  assert 20 <= len(shards) < 400 and not (directory / token_cache.MANIFEST).exists(), len(shards)
  source = corpus.Split(str(big), "train")
  # Prepared again (in larger shards: the partial ones, of another count, are all removed first).
  stream = prepare.token_stream(source, tokenizers.ByteTokenizer(), prepare.PrepareOptions(cache_dir=str(cache),
                                                                                            workers=1, shard_mb=2))
  assert sorted(p.name for p in directory.glob("shard-*.tokens"))[0] == "shard-00000-of-00010.tokens"
  assert len(stream) == sum(len(document.encode()) + 1 for document in source)  # each document and its EOS


def test_a_full_disk_stops_preparation_with_the_cache_dir_and_no_manifest(small_disk_of, tmp_path):
  small_disk = small_disk_of("2m")
  corpus_file = tmp_path / "corpus.txt"
  corpus_file.write_text((SHAKESPEARE.read_text() + "\n\n") * 3)  # 3.3 MB of text: 6.6 MB of uint16 ids
  source = corpus.Split(str(corpus_file), "train")
  opts = prepare.PrepareOptions(cache_dir=str(small_disk), workers=1, shard_mb=0.25)
  with pytest.raises(DataError, match=r"The disk holding the token cache .* is full .*Fix: free space"):
    prepare.token_stream(source, tokenizers.ByteTokenizer(), opts)
  directory = prepare.cache_directory(source, tokenizers.ByteTokenizer(), opts)
  assert not (directory / token_cache.MANIFEST).exists()
  assert not list(directory.glob("shard-*"))  # the partial shards are removed, freeing the disk


def test_document_ranges_cut_only_at_document_boundaries(corpus_dir):
  path = corpus_dir / "train.txt"
  documents = list(local_files.read_documents(path))
  for target in (1, 97, 4096, 10**9):
    ranges = local_files.document_ranges(path, target)
    assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    again = [d for start, end in ranges for d in local_files.read_document_range(path, start, end)]
    assert again == documents


def test_the_sentencepiece_sample_is_deterministic_and_bounded(corpus_dir):
  source = corpus.Split(str(corpus_dir), "train")
  everything = list(source)
  assert source.sample(10**9) == everything  # a split smaller than the sample: all of it, in order
  sample = source.sample(20_000)
  assert sample == source.sample(20_000) and 0 < len(sample) < len(everything)
  assert 15_000 < sum(len(d.encode()) for d in sample) < 40_000
  assert set(sample) <= set(everything)


def _paragraphs_by_lines(text: str) -> list[str]:
  """The definition of a .txt file's documents, line by line: runs of non-blank lines (a line's \\n or \\r\\n
  ending removed), joined by \\n."""
  text = text.removeprefix("\ufeff")
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  paragraphs, current = [], []
  for line in (line.removesuffix("\r") for line in lines):
    if line.strip():
      current.append(line)
    elif current:
      paragraphs.append("\n".join(current))
      current = []
  return paragraphs + (["\n".join(current)] if current else [])


def test_txt_paragraphs_are_found_the_same_whatever_the_blocks_and_line_endings(tmp_path, monkeypatch):
  # The reader finds paragraphs a block at a time with a regular expression; this is its definition, line by
  # line, on texts made of what trips such code: \r\n and lone \r, Unicode whitespace (\x0b, \x1c, \x85,
  # \u2028), blank lines of spaces, a BOM, no final newline, and blocks that cut anywhere between lines.
  import random  # pylint: disable=g-import-not-at-top
  alphabet = ["a", "b", "é", " ", "\t", "\n", "\n", "\n", "\r", "\r\n", "\x0b", "\x1c", "\x85", "\u2028"]
  rng = random.Random(0)
  path = tmp_path / "t.txt"
  for _ in range(400):
    text = ("\ufeff" if rng.random() < 0.2 else "") + "".join(rng.choice(alphabet)
                                                              for _ in range(rng.randint(0, 50)))
    path.write_text(text, encoding="utf-8", newline="")
    expected = _paragraphs_by_lines(text)
    for block in (1, 3, 8, 1 << 20):
      monkeypatch.setattr(local_files.Lines, "BLOCK", block)
      if not expected:  # a blank file is refused (test_sources)
        with pytest.raises(DataError, match="holds no text"):
          list(local_files.read_documents(path))
        continue
      assert list(local_files.read_documents(path)) == expected, (text, block)
      size = path.stat().st_size
      batches = list(local_files.read_document_batches(path, 0, size))
      assert all(batches) and [document for batch in batches for document in batch] == expected, (text, block)


def test_a_shard_is_written_a_small_batch_at_a_time_exactly(tmp_path, monkeypatch):
  monkeypatch.setattr(token_cache, "_BATCH_CHARS", 16)  # documents shorter and longer than a batch
  documents = ["ab", "x" * 40, "", "hello world", "y" * 15, "z", "é\ud800!"]
  for tokenizer in (tokenizers.ByteTokenizer(), tokenizers.build_tokenizer("char", ["abxyz h\nelowrd"])):
    separator, separator_chars, _ = prepare.separator_of(tokenizer)  # one id (byte), several (char)
    info = token_cache.write_shard(tmp_path, 0, 1, [documents[:3], documents[3:]], tokenizer, separator,
                                   separator_chars, np.dtype("<u2"))
    expected = [np.concatenate([tokenizer.encode(document), separator]) for document in documents]
    np.testing.assert_array_equal(np.fromfile(tmp_path / f"{info.name}.tokens", "<u2"), np.concatenate(expected))
    np.testing.assert_array_equal(np.fromfile(tmp_path / f"{info.name}.docs", "<i8"),
                                  np.cumsum([0] + [len(piece) for piece in expected[:-1]]))
    tokens, starts, chars = token_cache.encode_documents(documents, tokenizer, separator, separator_chars)
    np.testing.assert_array_equal(tokens, np.concatenate(expected))
    assert (info.tokens, info.documents, info.chars) == (len(tokens), len(documents), chars)
    assert chars == sum(len(document) + separator_chars for document in documents)
  with pytest.raises(ValueError, match="does not fit"):  # ids beyond the cache's dtype are refused, not wrapped
    token_cache.write_shard(tmp_path, 0, 1, [["ab"]], tokenizers.ByteTokenizer(), np.array([256]), 0,
                            np.dtype("u1"))
