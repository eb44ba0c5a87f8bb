"""Heads in the shared loop: each trains on an 8-device mesh and resumes exactly; bad heads are refused.

The LM-on-sentences and VAE runs of the module fixture are the init_from
models of the GAN runs, as in experiments/sentence_vae.py and text_gan.py.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from lm.config import ConfigError, load_config, validate
from lm.train import checkpoint as checkpoint_lib
from lm.app import train as train_mode
from lm.experiment import build_experiment
from lm.app.sample import sample_checkpoint
from tests.helpers import ROOT, SHARED, device_env, metric_rows, run_cli, snapshot, tiny_overrides

SENTENCES = {
    "data.source": str(SHARED / "data" / "sst2"), "data.text_field": "sentence", "data.format": "sentences",
    "data.train_split": "dev", "data.eval_split": "dev", "data.tokenizer": "char", "seq_len": 32,
    "model.vocab_multiple": 8,  # the vocabulary splits over tensor=2
    "vae.iw_samples": 4, "vae.iw_chunk": 2, "vae.word_dropout": 0.2, "vae.free_bits": 0.1,
    "gan.eval_samples": 8, "gan.temperatures": (1.0,), "gan.critic_steps": 2,
}
HEADS = {
    "lm": {"head": "lm"},
    "vae": {"head": "vae"},
    "relgan": {"head": "gan", "gan.kind": "relgan"},
    "latent": {"head": "gan", "gan.kind": "latent"},
    # DP-SGD (lm.train.privacy): per-example gradients of rows split over fsdp x tensor, noise once per batch;
    # Poisson sampling, so the padding rows' `dp_real` is split over the mesh with the rest of the batch
    "lm_private": {"head": "lm", "privacy.enabled": True, "privacy.noise_multiplier": 0.5, "privacy.clip_norm": 0.5,
                   "privacy.sampling": "poisson", "privacy.expected_batch_size": 6.0},
}
INIT_FROM = {"relgan": "lm", "latent": "vae"}


def overrides(name: str, **extra) -> dict:
  return tiny_overrides(**{**SENTENCES, **HEADS[name], "steps": 4, "log_every": 1, "eval_every": 4,
                           "eval_batches": 2, "checkpoint_every": 2, "keep_checkpoints": 3, **extra})


def cli(workdir, name: str, **extra):
  args = [f"--config.{key}={value}" for key, value in overrides(name, **extra).items()]
  return run_cli("--config", "experiments/shakespeare_char.py", "--workdir", str(workdir), *args,
                 env=device_env(8), timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """name -> (workdir, metrics of the uninterrupted run), trained on 8 devices (fsdp 4 x tensor 2)."""
  root = tmp_path_factory.mktemp("heads")
  done = {}
  for name in ("lm", "vae", "relgan", "latent", "lm_private"):
    workdir = root / name
    extra = {"mesh.preset": "fsdp_tp"}
    if name in INIT_FROM:
      extra["init_from"] = str(done[INIT_FROM[name]][0])
    result = cli(workdir, name, **extra)
    assert result.returncode == 0, result.stderr[-3000:]
    done[name] = (workdir, metric_rows(workdir), extra)
  return done


@pytest.mark.parametrize("name", ["lm", "vae", "relgan", "latent"])  # lm_private: its own test below
def test_each_head_trains_on_eight_devices_and_resumes_exactly(runs, name):
  workdir, full, extra = runs[name]
  assert all(np.isfinite(full[step]["train/loss"]) for step in (1, 2, 3, 4))
  assert "eval/loss" in full[4] and np.isfinite(full[4]["eval/loss"])
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["head"] == HEADS[name]["head"] and saved["mesh"]["shape"] == {"data": 1, "fsdp": 4, "tensor": 2}
  # Rewind to the checkpoint of step 2 and train again: steps 3 and 4 must come out the same.
  resumed = workdir.parent / f"{name}_resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  (resumed / "metrics.jsonl").write_text("")
  result = cli(resumed, name, **extra)
  assert result.returncode == 0, result.stderr[-3000:]
  again = metric_rows(resumed)
  for step in (3, 4):
    for key, value in full[step].items():
      if key.startswith("train/"):
        assert again[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, step, key)
  assert again[4]["eval/loss"] == pytest.approx(full[4]["eval/loss"], rel=1e-5)


def test_the_private_run_reports_its_privacy_and_equals_one_device(runs, tmp_path):
  workdir, full, _ = runs["lm_private"]
  row = full[4]
  assert 0 < row["privacy/epsilon"] < math.inf and row["privacy/noise_multiplier"] == 0.5
  assert row["privacy/steps"] == 4 and row["privacy/sampling_rate"] == pytest.approx(6 / row["privacy/dataset_size"])
  assert row["privacy/expected_batch_size"] == 6.0
  assert all(0 <= full[step]["train/clip_fraction"] <= 1 and 0 <= full[step]["train/dp_rows"] <= 8
             for step in (1, 2, 3, 4))
  # The same run on this process's one device: the same per-example clipping and the same noise (the key's
  # draw does not depend on how the gradient is sharded).
  train_mode.train(config_for("lm_private", steps=2), str(tmp_path / "one"))
  one = metric_rows(tmp_path / "one")
  for step in (1, 2):
    for key in ("train/loss", "train/grad_norm", "train/example_grad_norm"):
      assert one[step][key] == pytest.approx(full[step][key], rel=1e-4), (step, key)


def test_the_vae_reports_its_latent_metrics(runs):
  row = runs["vae"][1][4]
  for key in ("eval/recon", "eval/kl", "eval/elbo", "eval/iw_nll", "eval/mutual_info", "eval/active_units"):
    assert key in row and np.isfinite(row[key]), key
  assert row["eval/elbo"] == pytest.approx(row["eval/recon"] + row["eval/kl"])
  assert row["eval/kl"] >= 0 and 0 <= row["eval/active_units"] <= 32
  assert all(0.0 <= runs["vae"][1][step]["train/beta"] <= 1.0 for step in (1, 2, 3, 4))


def test_the_gans_write_the_quality_diversity_report(runs):
  for name in ("relgan", "latent"):
    workdir = runs[name][0]
    report = json.loads((workdir / "generation.json").read_text())
    assert len(report["points"]) == 1 and len(report["curve"]) == (1 if name == "relgan" else 0)
    assert (workdir / "quality_diversity.png").stat().st_size > 1000
    samples = [json.loads(line) for line in (workdir / "samples.jsonl").read_text().splitlines()]
    labels = [sample["label"] for sample in samples]
    assert labels.count(report["points"][0]["label"]) == 8 and len(samples) == 8 * (1 + len(report["curve"]))
    assert all(isinstance(sample["text"], str) for sample in samples)


def config_for(name: str, **extra):
  """The config of the CLI runs above (on this process's one device)."""
  return load_config(str(ROOT / "experiments" / "shakespeare_char.py"), overrides(name, **extra))


@pytest.mark.parametrize("key, value, match", [
    ("head", "bogus", "config.head='bogus' is not one of"),
    ("vae.latent_size", 0, "latent_size=0 must be a positive integer"),
    ("data.format", "windows", "set --config.data.format=sentences"),
    ("gan.kind", "seqgan", "gan.kind='seqgan' is not one of"),
])
def test_bad_head_settings_are_refused(key, value, match):
  with pytest.raises(ConfigError, match=match):
    validate(config_for("vae", **{key: value}))


def test_an_unknown_head_on_the_command_line_is_one_line(tmp_path):
  result = run_cli("--config", "experiments/sentence_vae.py", "--workdir", str(tmp_path / "w"), "--config.head=vea")
  assert result.returncode == 2 and "config.head='vea' is not one of" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()


@pytest.mark.parametrize("written, loaded", [("vae", "lm"), ("lm", "vae")])
def test_a_checkpoint_of_another_head_is_refused_and_kept(runs, written, loaded):
  workdir = runs[written][0]
  before = snapshot(workdir)
  with pytest.raises(checkpoint_lib.CheckpointError, match=f"written by a head='{written}' run.*config.head="
                     f"'{loaded}'.*--config.head={written}"):
    build_experiment(config_for(loaded), str(workdir), "train")
  assert snapshot(workdir) == before


def test_a_gan_needs_its_mle_model(runs, tmp_path):
  with pytest.raises(ConfigError, match="set config.init_from to the workdir of a head='lm' run"):
    train_mode.train(config_for("relgan"), str(tmp_path / "gan"))
  with pytest.raises(checkpoint_lib.CheckpointError, match="can start only from lm, gan"):
    build_experiment(config_for("relgan", init_from=str(runs["vae"][0])), str(tmp_path / "gan"), "train")
  with pytest.raises(checkpoint_lib.CheckpointError, match="another VAE .*vae.latent_size: checkpoint 32, config 8"):
    build_experiment(config_for("latent", init_from=str(runs["vae"][0]), **{"vae.latent_size": 8}),
                     str(tmp_path / "gan"), "train")
  assert not (tmp_path / "gan").exists()


@pytest.mark.parametrize("kind, count", [("prior", 3), ("reconstruct", 3), ("interpolate", 4)])
def test_the_vae_samples_from_its_latent_space(runs, kind, count):
  config = config_for("vae", **{"sample.kind": kind, "sample.num_samples": 3, "sample.interpolation_steps": 4,
                                "sample.temperature": 0.0, "sample.prompt": "a gorgeous movie .",
                                "sample.prompt_b": "a dull mess ."})
  texts = sample_checkpoint(config, str(runs["vae"][0]))
  assert len(texts) == count and all(isinstance(text, str) for text in texts)
  if kind == "interpolate":  # greedy decoding of the same end points is deterministic
    assert texts == sample_checkpoint(config, str(runs["vae"][0]))


def test_sample_kinds_need_a_vae_on_the_command_line(runs):
  result = run_cli("--config", "experiments/sentence_vae.py:lm", "--workdir", str(runs["lm"][0]), "--mode", "sample",
                   "--config.sample.kind=prior")
  assert result.returncode == 2 and "needs config.head='vae'" in result.stderr


def test_the_gans_write_from_noise(runs):
  for name in ("relgan", "latent"):
    texts = sample_checkpoint(config_for(name, **{"sample.num_samples": 2}), str(runs[name][0]))
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)
