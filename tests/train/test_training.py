"""Training in-process: loss falls, exact resume, start modes, NaN guard, schedule."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lm.config import apply_overrides
from lm.train import checkpoint as checkpoint_lib
from lm.app import train as train_mode
from lm.core.errors import NonFiniteError
from lm.train import optim
from lm.train.metrics import read_metrics
from tests.helpers import ROOT


def losses_by_step(workdir) -> dict[int, float]:
  rows = read_metrics(str(workdir))
  return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_loss_falls_on_a_short_run(tiny_config, tmp_path, variant):
  config = tiny_config(**{"model.variant": variant, "steps": 30, "log_every": 1, "optim.lr": 3e-3})
  result = train_mode.train(config, str(tmp_path))
  losses = losses_by_step(tmp_path)
  assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.5
  assert result.step == 30 and result.eval_loss is not None and np.isfinite(result.eval_loss)
  rows = read_metrics(str(tmp_path))
  for name in ("train/loss", "train/grad_norm", "train/lr", "perf/tokens_per_sec", "perf/mfu", "perf/step_time_ms"):
    assert any(name in row for row in rows), name
  assert any("eval/loss" in row for row in rows)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["config"]["model"]["variant"] == variant and saved["tokenizer"]["kind"] == "char"
  assert list((tmp_path / "tensorboard").iterdir())


def test_resume_reproduces_the_uninterrupted_losses(tiny_config, tmp_path):
  fixed_schedule = {"optim.decay_steps": 20, "log_every": 1, "model.dropout": 0.1}  # dropout: rng must resume too
  full = tmp_path / "full"
  train_mode.train(tiny_config(**fixed_schedule), str(full))
  part = tmp_path / "part"
  train_mode.train(tiny_config(steps=10, **fixed_schedule), str(part))
  assert checkpoint_lib.latest_step(str(part)) == 10
  train_mode.train(tiny_config(**fixed_schedule), str(part))  # same workdir: resumes at step 10
  uninterrupted, resumed = losses_by_step(full), losses_by_step(part)
  for step in range(11, 21):
    assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-6), step


def test_warm_start_and_init_from(tiny_config, tmp_path):
  source = tmp_path / "source"
  train_mode.train(tiny_config(steps=10), str(source))
  warm = train_mode.train(tiny_config(steps=15, warm_start=str(source)), str(tmp_path / "warm"))
  assert warm.step == 15  # continued from step 10
  assert min(losses_by_step(tmp_path / "warm")) == 15  # first logged step after 10 (log_every 5)
  init = train_mode.train(tiny_config(steps=5, init_from=str(source)), str(tmp_path / "init"))
  assert init.step == 5  # weights only: step 0, fresh optimizer
  first_init = losses_by_step(tmp_path / "init")[5]
  scratch = train_mode.train(tiny_config(steps=5), str(tmp_path / "scratch"))
  assert first_init < losses_by_step(tmp_path / "scratch")[5]  # pretrained weights start better
  assert scratch.step == 5


def test_non_finite_loss_stops_before_checkpointing(tiny_config, tmp_path):
  config = tiny_config(**{"optim.lr": 1e30, "optim.grad_clip": 0.0, "optim.warmup_steps": 0,
                          "checkpoint_every": 1, "steps": 20})
  with pytest.raises(NonFiniteError, match="last good checkpoint"):
    train_mode.train(config, str(tmp_path))
  # Every checkpoint that exists holds finite parameters.
  from lm.experiment import build_experiment  # pylint: disable=g-import-not-at-top
  experiment, _ = build_experiment(config, str(tmp_path))
  latest = checkpoint_lib.latest_step(str(tmp_path))
  if latest is not None:
    state, _, _, _ = checkpoint_lib.restore(str(tmp_path), experiment.abstract_state)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_grad_accumulation_matches_the_full_batch(tiny_config, tmp_path):
  plain = train_mode.train(tiny_config(steps=5, log_every=1), str(tmp_path / "plain"))
  accumulated = train_mode.train(tiny_config(steps=5, log_every=1, grad_accum_steps=2), str(tmp_path / "accum"))
  a, b = losses_by_step(tmp_path / "plain"), losses_by_step(tmp_path / "accum")
  for step in range(1, 6):
    assert a[step] == pytest.approx(b[step], rel=1e-4)
  assert plain.step == accumulated.step == 5


def test_schedule_warms_up_then_decays_to_min_lr():
  schedule = optim.learning_rate_schedule({"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100}, 2000)
  assert float(schedule(0)) == 0.0
  assert float(schedule(100)) == pytest.approx(1e-3)
  assert float(schedule(2000)) == pytest.approx(1e-4, rel=1e-3)
  assert 1e-4 < float(schedule(1000)) < 1e-3


def test_overrides_reject_unknown_keys(tiny_config):
  from lm.config import ConfigError  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match="lrr.*lr"):
    apply_overrides(tiny_config(), {"optim.lrr": 1})


def test_local_corpus_with_sentencepiece_trains_and_resumes_with_the_saved_tokenizer(tiny_config, tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  source = (ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt")
  if not source.exists():
    pytest.skip("../shared/data/tinyshakespeare/input.txt is not beside the checkout")
  text = source.read_text()
  (corpus / "train.txt").write_text(text[:60_000])
  (corpus / "validation.txt").write_text(text[60_000:70_000])
  overrides = {"data.source": str(corpus), "data.tokenizer": "sentencepiece", "data.tokenizer_vocab_size": 400,
               "data.cache_dir": str(tmp_path / "cache"), "steps": 4, "eval_every": 4, "checkpoint_every": 4}
  workdir = tmp_path / "run"
  first = train_mode.train(tiny_config(**overrides), str(workdir))
  saved = (workdir / "tokenizer" / "spm.model").read_bytes()
  assert first.step == 4 and np.isfinite(first.eval_loss)
  # Resuming must reuse the saved tokenizer, not train a new one.
  (workdir / "tokenizer" / "spm.model").touch()
  resumed = train_mode.train(tiny_config(**{**overrides, "steps": 6}), str(workdir))
  assert resumed.step == 6 and (workdir / "tokenizer" / "spm.model").read_bytes() == saved
  metadata = json.loads((workdir / "config.json").read_text())
  assert metadata["tokenizer"]["kind"] == "sentencepiece" and metadata["model"]["vocab_size"] == 400


def test_relative_workdir(tiny_config, tmp_path, monkeypatch):
  # `make train` passes runs/NAME; Orbax only accepts absolute paths.
  monkeypatch.chdir(tmp_path)
  result = train_mode.train(tiny_config(steps=10), "runs/relative")
  assert result.step == 10 and checkpoint_lib.latest_step("runs/relative") == 10
  assert train_mode.train(tiny_config(steps=12), "runs/relative").step == 12  # and resumes from it
