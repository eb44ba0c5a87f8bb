"""The command line, end to end: modes, overrides, signals, and every bad input.

Each bad input must stop with one clear `error:` line that names the problem,
exit non-zero, and leave the workdir exactly as it was.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, cli_args, run_cli, snapshot

BASELINE = "experiments/shakespeare_char.py"


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A tiny run trained through the CLI, shared by the tests that need a checkpoint."""
  workdir = tmp_path_factory.mktemp("cli") / "run"
  result = run_cli("--config", BASELINE, "--workdir", str(workdir), *cli_args(steps=10), check=True)
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["step"] == 10
  return workdir


def test_train_writes_the_documented_workdir(trained_workdir):
  names = {p.name for p in trained_workdir.iterdir()}
  assert {"checkpoints", "metrics.jsonl", "tensorboard", "tokenizer", "config.json"} <= names
  rows = [json.loads(line) for line in (trained_workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows if "train/loss" in row] == [5, 10]
  config = json.loads((trained_workdir / "config.json").read_text())["config"]
  assert config["steps"] == 10 and config["model"]["width"] == 32  # CLI overrides were applied


def test_eval_and_sample_modes(trained_workdir):
  result = run_cli("--config", BASELINE, "--workdir", str(trained_workdir), "--mode", "eval",
                   *cli_args(steps=10, **{"data.eval_split": "test"}), check=True)
  metrics = json.loads(result.stdout.strip().splitlines()[-1])
  assert metrics["step"] == 10 and metrics["split"] == "test"
  assert metrics["eval_test/bits_per_char"] == pytest.approx(metrics["eval_test/loss"] / 0.693147, rel=1e-4)
  result = run_cli("--config", BASELINE, "--workdir", str(trained_workdir), "--mode", "sample",
                   *cli_args(steps=10, **{"sample.prompt": "ROMEO:", "sample.max_tokens": 40,
                                          "sample.num_samples": 2}), check=True)
  assert result.stdout.count("--- sample") == 2 and "ROMEO:" in result.stdout


def test_bench_mode_prints_one_json_line_and_profiles(tmp_path):
  profile = tmp_path / "profile"
  result = run_cli("--config", BASELINE, "--mode", "bench",
                   *cli_args(**{"bench.steps": 3, "bench.warmup_steps": 1, "bench.profile_dir": str(profile),
                                "bench.profile_steps": 2}), check=True)
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  for key in ("step_time_ms", "tokens_per_sec", "mfu", "compile_time_s", "device"):
    assert key in figures
  assert figures["step_time_ms"] > 0 and 0 < figures["mfu"] < 1
  # The profiled steps came after the timing, into a Perfetto trace that names the train steps.
  assert figures["profile_dir"] == str(profile) and figures["steps_timed"] == 3
  traces = list(profile.glob("plugins/profile/*/perfetto_trace.json.gz"))
  assert len(traces) == 1
  with gzip.open(traces[0], "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  assert sum(1 for e in events if e.get("ph") == "X" and e.get("name") == "train") == 2


def test_console_script_has_the_same_flags():
  script = os.path.join(os.path.dirname(sys.executable), "lm")
  result = subprocess.run([script, "--helpfull"], capture_output=True, text=True, timeout=120)
  assert "--workdir" in result.stdout and "--mode" in result.stdout


def _bad_input(tmp_path, *args, match: str, workdir=None):
  workdir = workdir or tmp_path / "work"
  before = snapshot(workdir)
  result = run_cli("--config", BASELINE, "--workdir", str(workdir), *cli_args(), *args)
  assert result.returncode != 0
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert error_lines, result.stderr[-2000:]
  assert match in error_lines[0], error_lines[0]
  assert "Traceback" not in result.stderr
  assert snapshot(workdir) == before  # nothing written, nothing changed
  return error_lines[0]


def test_unknown_config_key(tmp_path):
  message = _bad_input(tmp_path, "--config.optim.lrr=1", match="optim.lrr")
  assert "lr" in message  # lists the keys that exist


def test_unknown_tfds_dataset(tmp_path):
  _bad_input(tmp_path, "--config.data.source=tfds:no_such_dataset", match="no_such_dataset")


def test_unknown_tfds_split(tmp_path):
  _bad_input(tmp_path, "--config.data.eval_split=valid", match="valid")


def test_an_eval_split_smaller_than_one_batch_is_refused_before_training(tmp_path):
  # tiny_shakespeare's validation split holds 1,745 windows of 32: fewer than one batch of 2,048
  _bad_input(tmp_path, "--config.batch_size=2048", match="fewer than one batch of 2048")


def test_missing_local_corpus(tmp_path):
  _bad_input(tmp_path, f"--config.data.source={tmp_path / 'missing.txt'}", match="does not exist")


def test_empty_local_corpus(tmp_path):
  corpus = tmp_path / "empty.txt"
  corpus.write_text("")
  _bad_input(tmp_path, f"--config.data.source={corpus}", match="empty.txt")


def test_non_utf8_local_corpus(tmp_path):
  corpus = tmp_path / "latin1.txt"
  corpus.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
  _bad_input(tmp_path, f"--config.data.source={corpus}", match="UTF-8")


def test_mesh_that_does_not_divide_the_devices(tmp_path):
  _bad_input(tmp_path, "--config.mesh.data=3", match="mesh")


def test_workdir_written_for_other_model_shapes(trained_workdir, tmp_path):
  message = _bad_input(tmp_path, "--config.model.width=64", match="different model", workdir=trained_workdir)
  assert "width" in message and "--workdir" in message


def test_missing_config_file(tmp_path):
  result = subprocess.run([sys.executable, "-m", "lm.main", "--config", "experiments/nope.py", "--workdir",
                           str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and "nope.py" in result.stderr and not (tmp_path / "w").exists()
