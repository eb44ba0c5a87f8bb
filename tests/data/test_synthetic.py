"""data.source="synthetic": deterministic random ids, trained on through the usual pipeline."""

import json
import math
import platform

import numpy as np
import pytest

from lm.config import ConfigError, validate
from lm.data.synthetic import SyntheticSource
from tests.helpers import cli_args, run_cli, snapshot, train_losses


def test_streams_are_deterministic_in_range_and_differ_by_split():
  train = SyntheticSource("train", vocab_size=300, num_tokens=10_000, seed=0)
  again = SyntheticSource("train", vocab_size=300, num_tokens=10_000, seed=0)
  np.testing.assert_array_equal(train.tokens, again.tokens)
  assert train.tokens.dtype == np.int32 and train.tokens.min() >= 0 and train.tokens.max() == 299
  assert not np.array_equal(train.tokens, SyntheticSource("validation", vocab_size=300, num_tokens=10_000,
                                                          seed=0).tokens)
  assert not np.array_equal(train.tokens, SyntheticSource("train", vocab_size=300, num_tokens=10_000, seed=1).tokens)
  with pytest.raises(TypeError, match="token ids, not text"):
    list(train)


def test_synthetic_needs_a_byte_tokenizer_lm_and_windows(tiny_config):
  with pytest.raises(ConfigError, match="data.tokenizer='byte'"):
    validate(tiny_config(**{"data.source": "synthetic", "data.tokenizer": "char"}))
  with pytest.raises(ConfigError, match="synthetic_tokens"):
    validate(tiny_config(**{"data.source": "synthetic", "data.tokenizer": "byte", "data.synthetic_tokens": 10}))


def test_training_on_synthetic_ids_with_a_padded_vocabulary(tmp_path):
  """300 ids padded to 384: the first loss is ln(300) (padding takes no probability), the model's table is 384."""
  workdir = tmp_path / "synthetic"
  args = cli_args(steps=4, log_every=1, **{"data.source": "synthetic", "data.tokenizer": "byte",
                                          "data.synthetic_vocab_size": 300, "data.synthetic_tokens": 20_000,
                                          "model.vocab_multiple": 128, "model.loss_impl": "fused"})
  run_cli("--config", "experiments/shakespeare_char.py", "--workdir", str(workdir), *args, check=True)
  losses = train_losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4]
  assert losses[1] == pytest.approx(math.log(300), abs=0.05)
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["config"]["data"]["source"] == "synthetic" and saved["model"]["vocab_size"] == 384
  bench = run_cli("--config", "experiments/shakespeare_char.py", "--mode", "bench", *args,
                  "--config.bench.steps=2", "--config.bench.warmup_steps=1", "--config.bench.decode=False",
                  check=True)
  figures = json.loads(bench.stdout.strip().splitlines()[-1])
  assert figures["model"]["vocab_size"] == 384 and figures["model"]["valid_vocab_size"] == 300
  assert figures["fused_loss"] is True and figures["platform"] == "cpu"
  # The CPU run's malloc setting rides along with its figures (lm.core.malloc; tests/test_malloc.py).
  glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
  assert figures["host_malloc"].startswith("glibc malloc keeps freed memory" if glibc else "not glibc")


def test_synthetic_with_a_char_tokenizer_is_refused_before_anything_is_written(tmp_path):
  workdir = tmp_path / "bad"
  result = run_cli("--config", "experiments/shakespeare_char.py", "--workdir", str(workdir),
                   *cli_args(**{"data.source": "synthetic"}))
  assert result.returncode == 2 and "data.tokenizer='byte'" in result.stderr and snapshot(workdir) == {}
