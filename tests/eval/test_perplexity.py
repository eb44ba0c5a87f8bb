"""Perplexity evaluation (lm.app.eval, lm.data.scoring, --mode eval): any split, bits per byte, the sliding window."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lm.config import ConfigError, load_config, validate
from lm.data import pipeline, sources
from lm.app import eval as eval_mode
from lm.data import scoring
from lm.app.train import train
from tests.helpers import ROOT, cli_args, device_env, run_cli, tiny_overrides

BASELINE = str(ROOT / "experiments" / "shakespeare_char.py")
SEQ_LEN, BATCH = 32, 8
# A periodic text: the next character is certain given a few before it, so context visibly lowers the loss.
# Its letters take 1, 2 and 3 UTF-8 bytes, so bytes differ from characters.
PERIOD = "".join(np.random.default_rng(0).choice(list("abé—"), 23))
VALIDATION = (PERIOD * 50)[5:5 + 4 * BATCH * SEQ_LEN + 1]  # 4 whole batches of non-overlapping windows, no tail


def overrides(data, **extra) -> dict:
  return tiny_overrides(**{"data.source": str(data), "steps": 120, "eval_every": 120, "checkpoint_every": 120,
                           "log_every": 60, "eval_batches": 0, "optim.lr": 3e-3, **extra})


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  """(data folder, workdir) of a tiny LM trained on the periodic text (~10 s on CPU)."""
  root = tmp_path_factory.mktemp("perplexity")
  data = root / "data"
  data.mkdir()
  (data / "train.txt").write_text((PERIOD * 300)[:6000] + "\n", encoding="utf-8")
  (data / "validation.txt").write_text(VALIDATION + "\n", encoding="utf-8")
  train(load_config(BASELINE, overrides(data)), str(root / "run"))
  return data, root / "run"


def evaluate(toy_run, **extra) -> dict:
  data, workdir = toy_run
  return eval_mode.evaluate_checkpoint(load_config(BASELINE, overrides(data, **extra)), str(workdir))


# -- the windows ---------------------------------------------------------------
@pytest.mark.parametrize("length, seq_len, stride, multiple", [
    (100, 8, 8, 1), (100, 8, 3, 4), (101, 8, 1, 8), (9, 8, 5, 2), (57, 16, 7, 3), (64, 16, 16, 4)])
def test_sliding_windows_score_every_target_once_with_the_promised_context(length, seq_len, stride, multiple):
  tokens = np.arange(length, dtype=np.int32) + 1000  # token i of the stream is i + 1000
  windows = scoring.SlidingWindows(tokens, seq_len, stride, multiple=multiple)
  assert len(windows) % multiple == 0 and len(windows) - windows.num_windows < multiple
  scored = np.zeros(length, int)
  for index in range(len(windows)):
    example = windows[index]
    np.testing.assert_array_equal(example["targets"][:-1], example["inputs"][1:])
    positions = example["targets"] - 1000
    for position, weight in zip(range(seq_len), example["mask"]):
      if weight:
        scored[positions[position]] += 1
        if index:  # after the first window, every scored target sees >= seq_len - stride tokens before it
          assert position + 1 >= seq_len - stride
    if index >= windows.num_windows:
      assert not example["mask"].any()  # the padding windows score nothing
  assert scored[0] == 0 and (scored[1:] == 1).all()  # every token but the first, exactly once
  assert scored.sum() == windows.num_targets == length - 1


def test_sliding_windows_with_stride_seq_len_are_the_non_overlapping_windows():
  tokens = np.arange(8 * 5 + 1, dtype=np.int32)
  sliding = scoring.SlidingWindows(tokens, 8, 8)
  plain = pipeline.Windows(tokens, 8, 8)
  assert sliding.num_windows == len(plain) == 5
  for index in range(5):
    np.testing.assert_array_equal(np.concatenate([sliding[index]["inputs"], sliding[index]["targets"][-1:]]),
                                  plain[index])
    assert sliding[index]["mask"].all()


def test_bad_strides_and_short_splits_are_refused(tiny_config):
  with pytest.raises(ValueError, match="stride=0"):
    scoring.SlidingWindows(np.arange(20), 8, 0)
  with pytest.raises(ValueError, match="stride=9"):
    scoring.SlidingWindows(np.arange(20), 8, 9)
  with pytest.raises(sources.DataError, match="fewer than seq_len"):
    scoring.SlidingWindows(np.arange(5), 8, 4)
  with pytest.raises(ConfigError, match=r"eval.stride=33 must be in \[0, seq_len=32\]"):
    validate(tiny_config(**{"eval.stride": 33}), "eval")
  with pytest.raises(ConfigError, match="head='lm' and data.format='windows'"):
    validate(tiny_config(**{"eval.stride": 8, "data.format": "sentences"}), "eval")
  with pytest.raises(ConfigError, match="head='lm' and data.format='windows'"):
    validate(tiny_config(**{"eval.stride": 8, "head": "vae", "data.format": "sentences"}), "eval")


# -- which split, and its metric names ------------------------------------------------
def test_the_split_and_the_metric_names(tiny_config, tmp_path):
  assert eval_mode.eval_split(tiny_config()) == ("tfds:tiny_shakespeare", "validation", "eval_validation/")
  assert eval_mode.eval_split(tiny_config(), "test")[1:] == ("test", "eval_test/")
  assert eval_mode.eval_split(tiny_config(**{"eval.split": "train[:10%]"}))[1:] == ("train[:10%]",
                                                                                     "eval_train_10/")
  config = tiny_config(**{"eval.source": "tfds:tiny_shakespeare:test"})
  assert eval_mode.eval_split(config) == ("tfds:tiny_shakespeare:test", "test", "eval_tiny_shakespeare_test/")
  single = tmp_path / "my corpus.txt"
  single.write_text("hello\n")
  assert eval_mode.eval_split(tiny_config(**{"eval.source": str(single)}))[1:] == ("train", "eval_my_corpus_train/")
  config = tiny_config(**{"eval.source": str(single), "eval.split": "train[:50%]"})
  assert eval_mode.eval_split(config)[1:] == ("train[:50%]", "eval_my_corpus_train_50/")


# -- evaluating a trained model -----------------------------------------------------------
def test_stride_seq_len_equals_the_non_overlapping_evaluation(toy_run):
  plain = evaluate(toy_run)
  sliding = evaluate(toy_run, **{"eval.stride": SEQ_LEN})
  assert plain["eval_validation/tokens"] == sliding["eval_validation/tokens"] == len(VALIDATION) - 1
  for name in ("loss", "perplexity", "bits_per_token", "bits_per_char", "bits_per_byte"):
    assert sliding[f"eval_validation/{name}"] == pytest.approx(plain[f"eval_validation/{name}"], rel=1e-6)


def test_a_sliding_window_scores_every_token_once_with_more_context(toy_run):
  plain = evaluate(toy_run)
  sliding = evaluate(toy_run, **{"eval.stride": 8})
  assert sliding["eval_validation/tokens"] == len(VALIDATION) - 1  # every predicted token, exactly once
  assert sliding["eval_validation/stride"] == 8
  # The periodic text is nearly certain with context, so >= 24 tokens of it lower the loss clearly.
  assert sliding["eval_validation/loss"] < plain["eval_validation/loss"] - 0.02
  loss = sliding["eval_validation/loss"]
  assert sliding["eval_validation/perplexity"] == pytest.approx(math.exp(loss))
  assert sliding["eval_validation/bits_per_token"] == pytest.approx(loss / math.log(2))


def test_bits_per_byte_is_the_loss_over_the_texts_utf8_bytes(toy_run):
  metrics = evaluate(toy_run, **{"eval.stride": 8})
  tokens = len(VALIDATION)  # characters: one token each, one document
  by_hand = metrics["eval_validation/loss"] / math.log(2) * tokens / len(VALIDATION.encode("utf-8"))
  assert len(VALIDATION.encode("utf-8")) > 1.5 * tokens  # the test means something: bytes are not characters
  assert metrics["eval_validation/bits_per_byte"] == pytest.approx(by_hand, rel=1e-9)
  assert metrics["eval_validation/bits_per_char"] == pytest.approx(metrics["eval_validation/bits_per_token"])


def test_any_source_is_keyed_by_its_name_and_metrics_are_appended(toy_run, tmp_path):
  data, workdir = toy_run
  before = (workdir / "metrics.jsonl").read_text()
  other = tmp_path / "held_out.txt"
  other.write_text(VALIDATION[::-1] + "\n", encoding="utf-8")
  metrics = evaluate(toy_run, **{"eval.source": str(other), "eval.stride": 16})
  assert metrics["split"] == "train" and metrics["source"] == str(other)
  assert metrics["eval_held_out_train/tokens"] == len(VALIDATION) - 1
  after = (workdir / "metrics.jsonl").read_text()
  assert after.startswith(before)  # earlier lines are kept
  last = json.loads(after.splitlines()[-1])
  assert last["step"] == 120 and last["eval_held_out_train/stride"] == 16
  assert "eval_held_out_train/bits_per_byte" in last


def test_eval_stride_on_the_command_line_on_two_devices(toy_run):
  data, workdir = toy_run
  result = run_cli("--config", BASELINE, "--workdir", str(workdir), "--mode", "eval",
                   *cli_args(**overrides(data)), "--config.eval.stride=8",
                   env=device_env(2), check=True)
  metrics = json.loads(result.stdout.strip().splitlines()[-1])
  single = evaluate(toy_run, **{"eval.stride": 8})
  assert metrics["eval_validation/tokens"] == len(VALIDATION) - 1
  assert metrics["eval_validation/loss"] == pytest.approx(single["eval_validation/loss"], rel=1e-5)
  result = run_cli("--config", BASELINE, "--workdir", str(workdir), "--mode", "eval",
                   *cli_args(**overrides(data)), "--config.eval.stride=40")
  assert result.returncode == 2 and "error: config.eval.stride=40" in result.stderr
