"""Token caches from the command line: --mode prepare, a run that prepares what it lacks (and says so), mixtures
and document masking trained and resumed exactly."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import ROOT, SHARED, metric_rows, run_cli, tiny_overrides

SST2 = SHARED / "data" / "sst2"


def args(workdir, **extra) -> list[str]:
  overrides = tiny_overrides(**{"data.tokenizer": "byte", **extra})
  return ["--config", str(ROOT / "experiments" / "shakespeare_char.py"), "--workdir", str(workdir),
          *[f"--config.{key}={value}" for key, value in overrides.items()]]


def test_prepare_then_train_reads_the_prepared_caches(tmp_path):
  env = {"LM_DATA_CACHE": str(tmp_path / "cache")}
  prepared = run_cli(*args(tmp_path / "run", **{"data.source": str(SST2)}), "--mode", "prepare", env=env, check=True)
  rows = [json.loads(line) for line in prepared.stdout.splitlines()]
  assert [row["split"].rsplit(":", 1)[1] for row in rows] == ["train", "validation"]
  assert rows[0]["documents"] == 67_349 and rows[1]["documents"] == 872 and not rows[0]["reused"]
  trained = run_cli(*args(tmp_path / "run", **{"data.source": str(SST2), "steps": 4}), env=env, check=True)
  assert "Preparing the token cache" not in trained.stderr
  assert json.loads(trained.stdout.splitlines()[-1])["step"] == 4
  again = run_cli(*args(tmp_path / "run", **{"data.source": str(SST2)}), "--mode", "prepare", env=env, check=True)
  assert all(json.loads(line)["reused"] for line in again.stdout.splitlines())


def test_a_document_masked_mixture_trains_reports_each_source_and_resumes_exactly(tmp_path):
  env = {"LM_DATA_CACHE": str(tmp_path / "cache")}
  mixture = '(("tfds:tiny_shakespeare", 0.7), ("%s", 0.3))' % SST2
  extra = {"data.mixture": mixture, "data.document_mask": True, "steps": 4, "log_every": 1, "eval_every": 4,
           "checkpoint_every": 2, "eval_batches": 2}
  workdir = tmp_path / "run"
  first = run_cli(*args(workdir, **extra), env=env, check=True)
  # The run prepared what it lacked, and said so: each source's train and eval splits.
  assert first.stderr.count("Preparing the token cache of") == 4
  assert len(list((tmp_path / "cache" / "tokens").glob("*/manifest.json"))) == 4
  full = metric_rows(workdir)
  for name in ("tiny_shakespeare", "sst2"):
    assert full[4][f"eval/{name}/loss"] > 0
  assert full[4]["eval/loss"] == pytest.approx(0.7 * full[4]["eval/tiny_shakespeare/loss"] +
                                               0.3 * full[4]["eval/sst2/loss"])
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  (resumed / "metrics.jsonl").write_text("")
  run_cli(*args(resumed, **extra), env=env, check=True)
  again = metric_rows(resumed)
  for step in (3, 4):
    assert again[step]["train/loss"] == pytest.approx(full[step]["train/loss"], rel=1e-6)
  assert again[4]["eval/loss"] == pytest.approx(full[4]["eval/loss"], rel=1e-6)
