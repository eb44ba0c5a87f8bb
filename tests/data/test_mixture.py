"""Weighted mixtures (data.mixture): batches drawn in the given proportions, as a pure function of (seed, step)."""

from __future__ import annotations

import numpy as np
import pytest

from lm.config import load_config, validate
from lm.core.errors import ConfigError
from lm.data import corpus, pipeline, prepare, tokenizers
from tests.helpers import ROOT


def source_windows(base: int, count: int) -> pipeline.Windows:
  """`count` windows of 4 tokens whose ids start at `base`, so a window says which source it came from."""
  return pipeline.Windows(np.arange(base, base + count + 4, dtype=np.int32), 4, 1)


def test_batches_are_drawn_in_the_mixture_proportions_and_depend_only_on_seed_and_step():
  examples = pipeline.MixedExamples([("a", source_windows(0, 1000), 0.7), ("b", source_windows(10_000, 50), 0.3)])
  dataset = pipeline.train_dataset(examples, seed=3, global_batch_size=20)
  rows = np.concatenate([dataset[step]["inputs"][:, 0] for step in range(200)])
  assert abs(np.mean(rows < 10_000) - 0.7) < 0.01
  assert len(np.unique(rows[rows >= 10_000])) == 50  # the small source is repeated, every window of it drawn
  again = pipeline.train_dataset(examples, seed=3, global_batch_size=20)
  np.testing.assert_array_equal(dataset[137]["inputs"], again[137]["inputs"])  # resume = set the index
  other = pipeline.train_dataset(examples, seed=4, global_batch_size=20)
  assert any(not np.array_equal(dataset[s]["inputs"], other[s]["inputs"]) for s in range(5))
  # Two processes reading half the rows each see the single process's batch.
  halves = [pipeline.train_dataset(examples, seed=3, global_batch_size=20,
                                   rows=pipeline.ProcessRows(i * 10, i * 10 + 10, 20))[137]["inputs"] for i in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves), dataset[137]["inputs"])


def test_a_mixture_of_splits_becomes_one_cache_per_source(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "train.txt").write_text("alpha " * 100)
  (tmp_path / "b.txt").write_text("beta " * 100)
  names = corpus.mixture_names([str(tmp_path / "a"), str(tmp_path / "b.txt")])
  mixture = corpus.Mixture(((names[0], corpus.Split(str(tmp_path / "a"), "train"), 0.5),
                            (names[1], corpus.Split(str(tmp_path / "b.txt"), "train"), 0.5)))
  examples = pipeline.window_examples(mixture, tokenizers.ByteTokenizer(), 8, 1,
                                      options=prepare.PrepareOptions(cache_dir=str(tmp_path / "cache"), workers=1))
  assert examples.names == ["a", "b"]
  assert [bytes(e[0][:5].astype(np.uint8)) for _, e, _ in examples.parts] == [b"alpha", b"beta "]
  assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 2


@pytest.mark.parametrize("mixture, message", [
    ((("tfds:tiny_shakespeare", 0.7), ("x", 0.0)), "weight 0.0; every weight must be a positive number"),
    ((("tfds:tiny_shakespeare", 1.0),), "a mixture needs at least 2"),
    ((("tfds:tiny_shakespeare",),), "is not a (source, weight) pair"),
])
def test_bad_mixtures_are_refused_naming_the_field(mixture, message):
  config = load_config(str(ROOT / "experiments" / "shakespeare_char.py"), {"data.mixture": mixture})
  with pytest.raises(ConfigError, match=r"config\.data\.mixture") as error:
    validate(config, "train")
  assert message in str(error.value)
  sentences = load_config(str(ROOT / "experiments" / "shakespeare_char.py"),
                          {"data.mixture": (("a", 1.0), ("b", 1.0)), "data.format": "sentences"})
  with pytest.raises(ConfigError, match="needs data.format='windows'"):
    validate(sentences, "train")
