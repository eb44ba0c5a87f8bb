"""The Grain pipeline: windows, determinism, per-process slices, checkpointable state."""

from __future__ import annotations

import numpy as np
import pytest

from lm.data import pipeline
from lm.data.sources import DataError
from lm.data.tokenizers import build_tokenizer

TOKENS = np.arange(1000, dtype=np.int32)


def windows(stride=1, seq_len=16):
  return pipeline.Windows(TOKENS, seq_len=seq_len, stride=stride)


def test_windows_are_consecutive_tokens():
  w = windows(stride=4)
  assert len(w) == (1000 - 17) // 4 + 1
  np.testing.assert_array_equal(w[3], np.arange(12, 29))
  batch = pipeline.train_dataset(w, seed=0, global_batch_size=4)[0]
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])  # targets are shifted inputs


def test_order_is_a_pure_function_of_seed_and_step():
  a = pipeline.train_dataset(windows(), seed=7, global_batch_size=8)
  b = pipeline.train_dataset(windows(), seed=7, global_batch_size=8)
  c = pipeline.train_dataset(windows(), seed=8, global_batch_size=8)
  for step in (0, 5, 500):  # 500 is past the first epoch (983 windows / 8)
    np.testing.assert_array_equal(a[step]["inputs"], b[step]["inputs"])
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_read_their_own_block_of_the_same_global_batch(processes):
  single = pipeline.train_dataset(windows(), seed=3, global_batch_size=8)
  block = 8 // processes
  for step in (0, 9, 200):
    parts = [pipeline.train_dataset(windows(), seed=3, global_batch_size=8,
                                    rows=pipeline.ProcessRows(p * block, (p + 1) * block, 8))[step]["inputs"]
             for p in range(processes)]
    # In order: the global batch the processes assemble is the single-process batch, row for row.
    np.testing.assert_array_equal(np.concatenate(parts), single[step]["inputs"])


def test_eval_blocks_assemble_the_single_process_batches():
  w = windows(stride=16)
  single = list(pipeline.eval_dataset(w, global_batch_size=4))
  halves = [list(pipeline.eval_dataset(w, global_batch_size=4, rows=pipeline.ProcessRows(p * 2, p * 2 + 2, 4)))
            for p in range(2)]
  assert len(halves[0]) == len(halves[1]) == len(single) == len(w) // 4
  for index, batch in enumerate(single):
    np.testing.assert_array_equal(np.concatenate([h[index]["targets"] for h in halves]), batch["targets"])


def test_rows_follow_the_batch_sharding():
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  rows = pipeline.ProcessRows.for_sharding(NamedSharding(mesh, PartitionSpec("data")), 8)
  assert rows == pipeline.ProcessRows(0, 8, 8)
  with pytest.raises(ValueError, match="batch of 6"):
    pipeline.train_dataset(windows(), seed=0, global_batch_size=8, rows=pipeline.ProcessRows(0, 6, 6))


def test_iterator_state_resumes_exactly():
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  dataset = pipeline.train_dataset(windows(), seed=1, global_batch_size=4)
  first = pipeline.BatchIterator(dataset, sharding, global_batch_size=4)
  for _ in range(3):
    next(first)
  state = first.get_state()
  expected = [np.asarray(next(first)["inputs"]) for _ in range(2)]
  second = pipeline.BatchIterator(dataset, sharding, global_batch_size=4)
  second.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(np.asarray(next(second)["inputs"]), want)


def test_eval_covers_each_target_once():
  w = windows(stride=16)
  dataset = pipeline.eval_dataset(w, global_batch_size=4)
  targets = np.concatenate([batch["targets"].reshape(-1) for batch in dataset])
  assert len(set(targets.tolist())) == len(targets)


class _Docs:
  name = "docs"

  def __init__(self, docs):
    self._docs = docs

  def __len__(self):
    return len(self._docs)

  def __getitem__(self, index):
    return self._docs[index]


def test_tokenize_split_restores_paragraphs_for_char_and_separates_documents_with_eos():
  docs = _Docs(["first para", "second"])
  char = build_tokenizer("char", ["first para", "second", "\n\n"])
  assert char.decode(pipeline.tokenize_split(docs, char)) == "first para\n\nsecond"
  byte = build_tokenizer("byte", None)
  stream = pipeline.tokenize_split(docs, byte)
  assert (stream == byte.eos_id).sum() == 2


def test_too_short_corpus_is_explained():
  with pytest.raises(DataError, match="seq_len"):
    pipeline.Windows(np.arange(10, dtype=np.int32), seq_len=16, stride=1, name="tiny.txt")
