"""Tests for lm.data.sources: TFDS catalog datasets and local files read through TFDS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm.data import sources
from lm.data.sources import DataError

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TFDS_DIR = SHARED / "tfds"
SST2_DEV = SHARED / "data" / "sst2" / "dev.tsv"


def write(path: Path, content: str | bytes) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(content, str):
    content = content.encode("utf-8")
  path.write_bytes(content)
  return path


def documents(path: Path | str, split: str = "train", **kwargs) -> list[str]:
  return list(sources.open_split(str(path), split, **kwargs))


@pytest.fixture
def cache(tmp_path: Path) -> str:
  return str(tmp_path / "cache")


# ----------------------------------------------------------------------------- local formats


def test_txt_keeps_paragraphs_exactly_and_joins_back(tmp_path, cache):
  text = "First line\n  second, indented  \n\nPara two.\n\n\n\nLast para\tend."
  path = write(tmp_path / "corpus.txt", text + "\n")
  source = sources.open_split(str(path), "train", cache_dir=cache)
  assert source.name == f"{path}:train"
  assert len(source) == 3
  assert source[0] == "First line\n  second, indented  "
  assert source[-1] == "Last para\tend."
  # Runs of blank lines collapse to one separator; everything else comes back.
  assert sources.PARAGRAPH_SEPARATOR.join(source) == text.replace("\n\n\n\n", "\n\n")


def test_txt_crlf_and_bom_read_like_plain_newlines(tmp_path, cache):
  path = write(tmp_path / "dos.txt", b"\xef\xbb\xbfOne\r\ntwo\r\n\r\nThree\r\n")
  assert documents(path, cache_dir=cache) == ["One\ntwo", "Three"]


def test_document_order_is_file_order(tmp_path, cache):
  # Many documents: TFDS must not shuffle them or sort their keys as strings.
  path = write(tmp_path / "many.txt", "\n\n".join(f"doc {i}" for i in range(1500)))
  source = sources.open_split(str(path), "train", cache_dir=cache)
  assert list(source) == [f"doc {i}" for i in range(1500)]
  assert source.__getitems__([1499, 2, 10]) == ["doc 1499", "doc 2", "doc 10"]
  with pytest.raises(IndexError):
    source[1500]


def test_jsonl_reads_the_text_field(tmp_path, cache):
  lines = [{"text": "héllo\nworld", "id": 1}, {"text": "", "id": 2}, {"text": "third", "id": 3}]
  path = write(tmp_path / "data.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n\n")
  assert documents(path, cache_dir=cache) == ["héllo\nworld", "", "third"]
  other = write(tmp_path / "other.jsonl", '{"body": "a"}\n{"body": "b"}\n')
  assert documents(other, text_field="body", cache_dir=cache) == ["a", "b"]


def test_tsv_reads_the_text_column(tmp_path, cache):
  path = write(tmp_path / "sst.tsv", "label\tsentence\r\n1\tgood film\r\n0\tbad , bad film\r\n")
  assert documents(path, cache_dir=cache) == ["good film", "bad , bad film"]
  named = write(tmp_path / "named.tsv", "review\tscore\nfine\t3\n")
  assert documents(named, text_field="review", cache_dir=cache) == ["fine"]


@pytest.mark.skipif(not SST2_DEV.exists(), reason=f"SST-2 not found at {SST2_DEV}")
def test_sst2_dev(cache):
  source = sources.open_split(str(SST2_DEV), "train", cache_dir=cache)
  assert len(source) == 872
  assert source[0] == "one long string of cliches ."


def test_folder_splits_by_file_stem(tmp_path, cache):
  folder = tmp_path / "corpus"
  write(folder / "train.txt", "t1\n\nt2")
  write(folder / "extra.txt", "e1")  # not a split name: part of train, in name order
  write(folder / "validation.jsonl", '{"text": "v1"}\n')
  write(folder / "test.tsv", "label\ttext\n0\ts1\n")
  write(folder / "notes.md", "ignored")
  assert sources.list_splits(str(folder)) == ["train", "validation", "test"]
  assert documents(folder, cache_dir=cache) == ["e1", "t1", "t2"]
  assert documents(folder, "validation", cache_dir=cache) == ["v1"]
  assert documents(folder, "test", cache_dir=cache) == ["s1"]


def test_dev_file_also_serves_as_validation(tmp_path, cache):
  folder = tmp_path / "corpus"
  write(folder / "train.txt", "t")
  write(folder / "dev.txt", "d1\n\nd2")
  assert sources.list_splits(str(folder)) == ["train", "validation", "dev"]
  assert documents(folder, "validation", cache_dir=cache) == ["d1", "d2"]
  assert documents(folder, "dev", cache_dir=cache) == ["d1", "d2"]


def test_single_file_is_train_and_slices_pass_through(tmp_path, cache):
  path = write(tmp_path / "ten.txt", "\n\n".join(str(i) for i in range(10)))
  assert sources.list_splits(str(path)) == ["train"]
  assert documents(path, "train[:80%]", cache_dir=cache) == [str(i) for i in range(8)]
  assert documents(path, "train[80%:]", cache_dir=cache) == ["8", "9"]


def test_parse_source():
  assert sources.parse_source("tfds:tiny_shakespeare") == ("tfds", "tiny_shakespeare", None)
  assert sources.parse_source("tfds:tiny_shakespeare:train[:90%]") == ("tfds", "tiny_shakespeare", "train[:90%]")
  assert sources.parse_source("tfds:wmt14/de-en:1.0.0") == ("tfds", "wmt14/de-en:1.0.0", None)
  assert sources.parse_source("tfds:wmt14/de-en:1.*.*:test") == ("tfds", "wmt14/de-en:1.*.*", "test")
  assert sources.parse_source("/no/such/file.txt") == ("local", "/no/such/file.txt", None)


def test_parse_source_local_split(tmp_path):
  path = write(tmp_path / "a.txt", "x")
  assert sources.parse_source(f"{path}:train[90%:]") == ("local", str(path), "train[90%:]")
  assert sources.parse_source(str(path)) == ("local", str(path), None)


# ----------------------------------------------------------------------------- cache


def test_cache_is_reused_and_refreshed_when_the_file_changes(tmp_path, cache, monkeypatch):
  prepared = []
  original = sources._LocalTextBuilder.download_and_prepare

  def counting(self, *args, **kwargs):
    prepared.append(self.data_dir)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(sources._LocalTextBuilder, "download_and_prepare", counting)
  path = write(tmp_path / "c.txt", "old text")
  assert documents(path, cache_dir=cache) == ["old text"]
  assert documents(path, cache_dir=cache) == ["old text"]
  assert len(prepared) == 1

  write(tmp_path / "c.txt", "new text, longer")
  assert documents(path, cache_dir=cache) == ["new text, longer"]
  assert len(prepared) == 2 and prepared[0] != prepared[1]


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
  monkeypatch.setenv("LM_DATA_CACHE", str(tmp_path / "env_cache"))
  path = write(tmp_path / "c.txt", "text")
  assert documents(path) == ["text"]
  assert any((tmp_path / "env_cache").rglob("dataset_info.json"))


def test_concurrent_preparation_is_safe(tmp_path, cache):
  path = write(tmp_path / "race.txt", "\n\n".join(f"doc {i}" for i in range(2000)))
  script = (
      "import sys; from lm.data import sources; "
      "s = sources.open_split(sys.argv[1], 'train', cache_dir=sys.argv[2]); print(len(s), s[1999])"
  )
  env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
  processes = [
      subprocess.Popen([sys.executable, "-c", script, str(path), cache], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True, env=env)
      for _ in range(3)
  ]
  results = [process.communicate(timeout=120) for process in processes]
  for process, (stdout, stderr) in zip(processes, results):
    assert process.returncode == 0, stderr
    assert stdout.split("\n")[-2] == "2000 doc 1999"
  assert len(list(Path(cache).glob("*/lm_local_text/1.0.0/dataset_info.json"))) == 1


def test_losing_a_preparation_race_reuses_the_winners_copy(tmp_path, cache, monkeypatch):
  # Without a working lock, a second process's rename fails once the first's copy is in place.
  original = sources._LocalTextBuilder.download_and_prepare

  def prepare_then_lose(self, *args, **kwargs):
    original(self, *args, **kwargs)
    raise FileExistsError("another process renamed its copy first")

  monkeypatch.setattr(sources._LocalTextBuilder, "download_and_prepare", prepare_then_lose)
  monkeypatch.setattr(sources, "fcntl", None)
  path = write(tmp_path / "c.txt", "text")
  assert documents(path, cache_dir=cache) == ["text"]


# ----------------------------------------------------------------------------- bad local input


def test_missing_path(tmp_path, cache):
  with pytest.raises(DataError, match="does not exist.*Fix"):
    sources.open_split(str(tmp_path / "nope.txt"), "train", cache_dir=cache)


def test_folder_without_text_files(tmp_path, cache):
  write(tmp_path / "data" / "a.csv", "x")
  with pytest.raises(DataError, match=r"no \.txt, \.jsonl or \.tsv files.*a\.csv"):
    sources.open_split(str(tmp_path / "data"), "train", cache_dir=cache)


def test_unsupported_extension(tmp_path, cache):
  path = write(tmp_path / "table.csv", "a,b")
  with pytest.raises(DataError, match=r"Unsupported file type '\.csv'"):
    sources.open_split(str(path), "train", cache_dir=cache)


@pytest.mark.parametrize("content", ["", "\n\n  \n\t\n"])
def test_empty_file_is_named(tmp_path, cache, content):
  folder = tmp_path / "corpus"
  write(folder / "train.txt", "fine")
  write(folder / "test.txt", content)
  with pytest.raises(DataError, match=r"test\.txt holds no text"):
    sources.open_split(str(folder), "train", cache_dir=cache)


def test_not_utf8_names_file_and_byte_offset(tmp_path, cache):
  path = write(tmp_path / "latin.txt", "good line\n".encode() + "caf\xe9".encode("latin-1"))
  with pytest.raises(DataError, match=r"latin\.txt is not valid UTF-8: byte offset 13 \(line 2\)"):
    sources.open_split(str(path), "train", cache_dir=cache)


def test_failed_preparation_leaves_nothing_and_fixing_the_file_works(tmp_path, cache):
  path = write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"text": "b"\n')
  with pytest.raises(DataError):
    sources.open_split(str(path), "train", cache_dir=cache)
  assert not list(Path(cache).rglob("dataset_info.json"))
  write(path, '{"text": "a"}\n{"text": "b"}\n')
  assert documents(path, cache_dir=cache) == ["a", "b"]


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("bad.jsonl", '{"text": "ok"}\n\n{"text": broken}\n', r"line 3 is not valid JSON"),
        ("bad.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"line 2 has no field 'text' \(it has \['body'\]\)"),
        ("bad.jsonl", '{"text": "ok"}\n["a list"]\n', r"line 2 has no field 'text'"),
        ("bad.jsonl", '{"text": 5}\n', r"line 1: field 'text' is int"),
        ("bad.tsv", "0\tno header here\n1\tsecond\n", r"no header naming a text column"),
        ("bad.tsv", "label\tsentence\n1\tfine\n0\ttoo\tmany\n",
         r"line 3 has 3 tab-separated columns; the header has 2"),
    ],
)
def test_malformed_jsonl_and_tsv(tmp_path, cache, name, content, pattern):
  path = write(tmp_path / name, content)
  with pytest.raises(DataError, match=pattern):
    sources.open_split(str(path), "train", cache_dir=cache)


def test_unknown_local_split_lists_available(tmp_path, cache):
  path = write(tmp_path / "one.txt", "x")
  with pytest.raises(DataError, match=r"Available splits: \['train'\].*train\[90%:\]"):
    sources.open_split(str(path), "validation", cache_dir=cache)


# ----------------------------------------------------------------------------- TFDS catalog


@pytest.fixture
def tfds_dir(monkeypatch) -> Path:
  if not (TFDS_DIR / "tiny_shakespeare").is_dir():
    pytest.skip(f"prepared TFDS data not found at {TFDS_DIR}")
  monkeypatch.setenv("TFDS_DATA_DIR", str(TFDS_DIR))
  return TFDS_DIR


def test_tfds_tiny_shakespeare(tfds_dir):
  assert sources.list_splits("tfds:tiny_shakespeare") == ["train", "validation", "test"]
  source = sources.open_split("tfds:tiny_shakespeare:ignored", "train")
  assert source.name == "tfds:tiny_shakespeare:train"
  assert len(source) == 1
  assert len(source[0]) == 1_003_854 and source[0].startswith("First Citizen:")
  assert len(sources.open_split("tfds:tiny_shakespeare", "validation")[0]) == 55_770


def test_tfds_unknown_name_is_short_and_helpful(tfds_dir):
  with pytest.raises(DataError) as error:
    sources.open_split("tfds:tiny_shakespear", "train")
  message = str(error.value)
  assert "'tiny_shakespear' is unknown" in message and "TFDS_DATA_DIR" in message
  assert str(tfds_dir) in message
  assert len(message) < 800  # not TFDS's list of every dataset


def test_tfds_known_but_not_prepared(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty"))
  with pytest.raises(DataError, match=r"not prepared.*empty.*TFDS_DATA_DIR.*tensorflow-cpu"):
    sources.open_split("tfds:tiny_shakespeare", "train")
  assert not (tmp_path / "empty" / "tiny_shakespeare" / "1.0.0" / "dataset_info.json").exists()


def test_tfds_unknown_split_lists_splits(tfds_dir):
  with pytest.raises(DataError, match=r"'bogus'.*\['train', 'validation', 'test'\]"):
    sources.open_split("tfds:tiny_shakespeare", "bogus")


def test_tfds_slice_selecting_nothing(tfds_dir):
  with pytest.raises(DataError, match=r"selects no documents.*'train': 1"):
    sources.open_split("tfds:tiny_shakespeare", "train[90%:]")


def test_tfds_missing_text_field_lists_features(tfds_dir):
  with pytest.raises(DataError, match=r"no text feature 'content'.*\{'text': 'Text'\}"):
    sources.open_split("tfds:tiny_shakespeare", "train", text_field="content")
