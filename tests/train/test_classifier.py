"""The classifier head: learns a toy sentiment task, shards and resumes, reports, selects by dev accuracy;
cross-validation and A/B tests from the command line; bad labels and configs refused."""

from __future__ import annotations

import json
import random
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import ConfigError, load_config
from lm.data import sources
from lm.data.labeled import derive_classes
from lm.tasks.classifier import parse_class_weights
from lm.models.classifier import classification_loss, pool
from lm.app.ab import ab_test
from lm.train import checkpoint as checkpoint_lib
from lm.app import train as train_mode
from lm.experiment import build_experiment, initial_state
from lm.train.metrics import read_metrics
from tests.helpers import device_env, run_cli, snapshot, tiny_overrides

POSITIVE = ("good", "great", "fine", "lovely", "superb")
NEGATIVE = ("bad", "awful", "poor", "dull", "boring")
FILLER = ("the", "movie", "film", "was", "really", "quite", "a", "plot", "story", "cast")


def toy_rows(count: int, seed: int) -> list[tuple[str, str]]:
  """(label, sentence): label 1 iff the sentence holds a positive word."""
  rng = random.Random(seed)
  rows = []
  for _ in range(count):
    label = rng.randint(0, 1)
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 5))]
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
    rows.append((str(label), " ".join(words)))
  return rows


def write_tsv(path, rows, header=("label", "sentence")) -> None:
  path.write_text("\t".join(header) + "\n" + "".join(f"{label}\t{text}\n" for label, text in rows))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  folder = tmp_path_factory.mktemp("toy_sst")
  write_tsv(folder / "train.tsv", toy_rows(400, 0))
  write_tsv(folder / "dev.tsv", toy_rows(48, 1))
  write_tsv(folder / "test.tsv", toy_rows(48, 2))
  return folder


def overrides(corpus, **extra) -> dict:
  return tiny_overrides(**{
      # Word-sized pieces: a char model needs far more steps to find the sentiment words.
      "head": "classifier", "data.source": str(corpus), "data.format": "sentences",
      "data.tokenizer": "sentencepiece", "data.tokenizer_vocab_size": 40,
      "data.eval_split": "validation", "data.cache_dir": str(corpus / ".cache"), "seq_len": 48,
      "model.vocab_multiple": 8, "optim.lr": 3e-3, "classifier.label_smoothing": 0.1, **extra})


def config_for(corpus, **extra):
  return load_config("experiments/sst2_classifier.py", overrides(corpus, **extra))


def cli(workdir, corpus, *args, devices: int = 1, **extra):
  flags = [f"--config.{key}={value}" for key, value in overrides(corpus, **extra).items()]
  return run_cli("--config", "experiments/sst2_classifier.py", "--workdir", str(workdir), *flags, *args,
                 env=device_env(devices), timeout=600)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  """A classifier trained in-process for 60 steps (eval every 20), with its report."""
  workdir = tmp_path_factory.mktemp("classifier") / "run"
  config = config_for(corpus, steps=60, eval_every=20, checkpoint_every=20, log_every=10, eval_batches=0,
                      keep_best=1)
  result = train_mode.train(config, str(workdir))
  return workdir, config, result


# -- units ---------------------------------------------------------------------
def test_pooling_reads_only_the_sentence():
  hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_allclose(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
  np.testing.assert_allclose(pool(hidden, mask, "max")[0], hidden[0, :2].max(0))
  np.testing.assert_allclose(pool(-hidden, mask, "max")[0], -hidden[0, 0])  # not the padding's values
  np.testing.assert_allclose(pool(hidden, mask, "last"), jnp.stack([hidden[0, 1], hidden[1, 3]]))
  for pooling in ("mean", "max", "last"):
    assert not np.asarray(pool(hidden, jnp.zeros_like(mask), pooling)).any()  # padding rows
  with pytest.raises(ValueError, match="pooling"):
    pool(hidden, mask, "median")


def test_class_weights_and_label_smoothing_follow_their_formulas():
  logits = jnp.asarray([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  labels = jnp.asarray([0, 1, 1])
  valid = jnp.asarray([1.0, 1.0, 0.0])  # the third row is padding
  log_p = jax.nn.log_softmax(logits)
  plain = -log_p[jnp.arange(3), labels]
  loss, rows = classification_loss(logits, labels, valid)
  np.testing.assert_allclose(rows, plain, rtol=1e-6)
  np.testing.assert_allclose(loss, plain[:2].mean(), rtol=1e-6)
  weights = jnp.asarray([1.0, 3.0])
  weighted, _ = classification_loss(logits, labels, valid, class_weights=weights)
  np.testing.assert_allclose(weighted, (plain[0] + 3 * plain[1]) / 4, rtol=1e-6)
  smoothed, _ = classification_loss(logits, labels, valid, label_smoothing=0.2)
  targets = jax.nn.one_hot(labels, 2) * 0.8 + 0.1
  np.testing.assert_allclose(smoothed, -(targets * log_p).sum(-1)[:2].mean(), rtol=1e-6)
  np.testing.assert_allclose(parse_class_weights("balanced", np.asarray([30, 10]), ["0", "1"]),
                             [40 / 60, 40 / 20], rtol=1e-6)
  np.testing.assert_allclose(parse_class_weights("1,2.5", np.asarray([1, 1]), ["0", "1"]), [1.0, 2.5])
  assert parse_class_weights("", np.asarray([1, 1]), ["0", "1"]) is None
  for bad in ("1", "1,-2", "a,b"):
    with pytest.raises(ConfigError, match="class_weights"):
      parse_class_weights(bad, np.asarray([1, 1]), ["0", "1"])


def test_classes_sort_numerically_when_they_are_integers():
  assert derive_classes(["10", "2", "2", "1"]) == ["1", "2", "10"]
  assert derive_classes(["neg", "pos", "neg"]) == ["neg", "pos"]


def test_labeled_sources_say_where_each_row_came_from(corpus, tmp_path):
  source = sources.open_split(str(corpus), "validation", text_field="sentence", label_field="label",
                              cache_dir=str(tmp_path))
  assert len(source.labels()) == len(source) == 48
  assert source.where(0) == "dev.tsv:2"
  assert source.labels()[0] == toy_rows(48, 1)[0][0] and source[0] == toy_rows(48, 1)[0][1]


# -- training ------------------------------------------------------------------
def test_the_classifier_learns_and_reports_with_its_best_dev_weights(trained):
  workdir, _, result = trained
  rows = read_metrics(str(workdir))
  evals = {row["step"]: row for row in rows if "eval/accuracy" in row}
  assert sorted(evals) == [20, 40, 60]
  # A positive or a negative word decides the label; chance is 0.5.
  assert max(row["eval/accuracy"] for row in evals.values()) >= 0.85, evals
  for key in ("eval/macro_f1", "eval/precision/0", "eval/recall/1", "eval/f1/1", "eval/weighted_f1"):
    assert 0.0 <= evals[60][key] <= 1.0
  report = json.loads((workdir / "classification.json").read_text())
  best = max(evals, key=lambda step: (evals[step]["eval/accuracy"], -step))
  assert report["step"] == best == checkpoint_lib.best_step(str(workdir))
  assert report["eval"]["split"] == "validation" and report["test"]["split"] == "test"
  assert report["eval"]["accuracy"] == pytest.approx(evals[best]["eval/accuracy"])
  assert report["test"]["num_examples"] == 48 and np.asarray(report["test"]["confusion_matrix"]).sum() == 48
  assert report["classes"] == ["0", "1"]
  assert (workdir / "confusion_validation.png").stat().st_size > 0
  assert (workdir / "confusion_test.png").stat().st_size > 0
  final = [row for row in rows if "final_test/accuracy" in row]
  assert final and final[-1]["final_test/accuracy"] == pytest.approx(report["test"]["accuracy"])
  assert result.step == 60


def test_the_classifier_labels_text_from_the_command_line(trained, corpus):
  workdir, _, _ = trained
  result = cli(workdir, corpus, "--mode", "sample", **{"steps": 60, "sample.prompt": "the film was superb"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert "--- sample 0 ---\n1 (p=" in result.stdout


def test_init_from_an_lm_fills_the_backbone(corpus, tmp_path):
  lm_dir = tmp_path / "lm"
  lm_config = config_for(corpus, head="lm", steps=2, eval_every=2, checkpoint_every=2)
  train_mode.train(lm_config, str(lm_dir))
  config = config_for(corpus, steps=1, init_from=str(lm_dir))
  experiment, _ = build_experiment(config, str(tmp_path / "classifier"))
  state, _, how = initial_state(experiment)
  assert "head='lm'" in how
  lm_params, _ = checkpoint_lib.restore_params(str(lm_dir), experiment.abstract_state.params["lm"])
  for restored, loaded in zip(jax.tree.leaves(lm_params), jax.tree.leaves(state.params["lm"])):
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(loaded))


def test_the_classifier_shards_and_resumes_exactly(corpus, tmp_path):
  extra = dict(steps=4, log_every=1, eval_every=4, checkpoint_every=2, keep_checkpoints=3, eval_batches=0,
               **{"mesh.preset": "fsdp_tp", "model.dropout": 0.1, "classifier.class_weights": "balanced"})
  full = tmp_path / "full"
  result = cli(full, corpus, devices=8, **extra)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {row["step"]: row for row in read_metrics(str(full)) if "train/loss" in row}
  resumed = tmp_path / "resumed"
  resumed.mkdir()
  shutil.copytree(full / "tokenizer", resumed / "tokenizer")
  shutil.copy(full / "config.json", resumed / "config.json")
  shutil.copytree(full / "checkpoints" / "2", resumed / "checkpoints" / "2")
  result = cli(resumed, corpus, devices=8, **extra)
  assert result.returncode == 0, result.stderr[-3000:]
  again = {row["step"]: row for row in read_metrics(str(resumed)) if "train/loss" in row}
  for step in (3, 4):
    assert again[step]["train/loss"] == pytest.approx(rows[step]["train/loss"], rel=1e-5, abs=1e-6)


# -- cross-validation and A/B tests ---------------------------------------------
def test_crossval_trains_one_model_per_stratified_fold(corpus, tmp_path):
  workdir = tmp_path / "cv"
  result = cli(workdir, corpus, "--mode", "crossval", **{"eval.folds": 3, "steps": 4, "eval_every": 4,
                                                        "checkpoint_every": 4})
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / "crossval.json").read_text())
  assert report["folds"] == 3 and report["stratified"]
  folds = report["per_fold"]
  assert sum(fold["eval_examples"] for fold in folds) == 400
  assert all(fold["train_examples"] + fold["eval_examples"] == 400 for fold in folds)
  positives = [fold["eval_class_counts"].get("1", 0) for fold in folds]
  assert max(positives) - min(positives) <= 1  # stratified
  accuracies = [fold["metrics"]["eval/accuracy"] for fold in folds]
  assert report["mean"]["eval/accuracy"] == pytest.approx(np.mean(accuracies))
  assert report["std"]["eval/accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
  rows = read_metrics(str(workdir))
  assert [row["crossval/fold"] for row in rows if "crossval/fold" in row] == [0, 1, 2]
  assert "crossval/mean/eval/accuracy" in rows[-1] and "crossval/std/eval/accuracy" in rows[-1]
  assert all((workdir / f"fold_{i}" / "checkpoints").is_dir() for i in range(3))
  assert "eval/accuracy" in result.stdout


def test_ab_compares_two_classifiers_on_the_same_examples(trained, corpus, tmp_path):
  workdir, _, _ = trained
  weak = tmp_path / "weak"
  # The same SentencePiece model file, so the pair shares its tokenizer.
  # Another architecture too: each run must be evaluated as it was built, not as this config says.
  train_mode.train(config_for(corpus, steps=2, eval_every=2, checkpoint_every=2, eval_batches=0,
                        **{"data.tokenizer_model": str(workdir / "tokenizer" / "spm.model"),
                           "classifier.pooling": "last", "classifier.attention": "bidirectional"}), str(weak))
  out = tmp_path / "ab"
  result = cli(out, corpus, "--mode", "ab", **{"ab.a": str(weak), "ab.b": str(workdir), "ab.bootstrap_samples": 200,
                                              "eval_batches": 0})
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((out / "ab.json").read_text())
  assert report["head"] == "classifier" and report["num_examples"] == 48
  accuracy = report["accuracy"]
  assert accuracy["difference"] == pytest.approx(accuracy["b"] - accuracy["a"])
  # The same figures each run's own evaluation of its latest checkpoint logged.
  for name, run, step in (("a", weak, 2), ("b", workdir, 60)):
    logged = [row for row in read_metrics(str(run)) if row["step"] == step and "eval/accuracy" in row][-1]
    assert accuracy[name] == pytest.approx(logged["eval/accuracy"]), name
  assert accuracy["lower"] <= accuracy["difference"] <= accuracy["upper"]
  assert 0.0 <= report["mcnemar"]["p_value"] <= 1.0 and 0.0 <= report["macro_f1"]["p_value"] <= 1.0
  assert "ab/accuracy/difference" in read_metrics(str(out))[-1]


def test_ab_compares_two_language_models(tmp_path):
  def lm_config(**extra):
    return load_config("experiments/shakespeare_char.py", tiny_overrides(eval_batches=2, **extra))

  a, b = tmp_path / "a", tmp_path / "b"
  train_mode.train(lm_config(steps=2, eval_every=2, checkpoint_every=2), str(a))
  train_mode.train(lm_config(steps=2, eval_every=2, checkpoint_every=2, init_from=str(a)), str(b))
  out = tmp_path / "ab"
  report = ab_test(lm_config(**{"ab.a": str(a), "ab.b": str(b), "ab.bootstrap_samples": 100}), str(out))
  assert json.loads((out / "ab.json").read_text()) == json.loads(json.dumps(report))
  assert report["head"] == "lm" and report["metric"] == "loss" and report["num_examples"] == 16
  assert report["lower"] <= report["difference"] <= report["upper"]
  assert report["difference"] == pytest.approx(report["b"] - report["a"])


# -- bad input -------------------------------------------------------------------
def test_a_bad_label_names_the_file_and_line(corpus, tmp_path):
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "train.tsv").write_text((corpus / "train.tsv").read_text())
  write_tsv(bad / "dev.tsv", [("1", "a good film"), ("neutral", "a film")])
  workdir = tmp_path / "run"
  result = cli(workdir, bad, **{"data.cache_dir": str(tmp_path / "cache")})
  assert result.returncode == 2
  assert "dev.tsv:3" in result.stderr and "'neutral'" in result.stderr and "classifier.labels" in result.stderr
  write_tsv(bad / "dev.tsv", [("1", "a good film"), ("", "a film")])
  result = cli(workdir, bad, **{"data.cache_dir": str(tmp_path / "cache")})
  assert result.returncode == 2 and "dev.tsv line 3 has an empty 'label'" in result.stderr


@pytest.mark.parametrize("change, match", [
    ({"data.label_field": "stars"}, "no label column 'stars'"),
    ({"classifier.class_weights": "1,2,3"}, "one per class"),
    ({"classifier.pooling": "median"}, "classifier.pooling"),
    ({"data.format": "windows"}, "data.format=sentences"),
])
def test_bad_classifier_settings_are_refused_before_anything_is_written(corpus, tmp_path, change, match):
  workdir = tmp_path / "run"
  with pytest.raises((ConfigError, sources.DataError), match=re.escape(match)):
    build_experiment(config_for(corpus, **change), str(workdir))
  assert not workdir.exists()


def test_resuming_with_other_classes_is_refused_and_the_run_kept(trained, corpus):
  workdir, _, _ = trained
  before = snapshot(workdir)
  with pytest.raises(checkpoint_lib.CheckpointError, match=re.escape("classifies into ['0', '1']")):
    build_experiment(config_for(corpus, steps=80, **{"classifier.labels": ("1", "0")}), str(workdir))
  assert snapshot(workdir) == before


def test_ab_refuses_runs_with_different_tokenizers(trained, corpus, tmp_path):
  workdir, _, _ = trained
  other = tmp_path / "byte"
  train_mode.train(config_for(corpus, steps=2, eval_every=2, checkpoint_every=2, **{"data.tokenizer": "byte"}), str(other))
  out = tmp_path / "ab"
  with pytest.raises(ConfigError, match="different tokenizers"):
    ab_test(config_for(corpus, **{"ab.a": str(workdir), "ab.b": str(other)}), str(out))
  assert not out.exists()


def test_ab_needs_both_runs(corpus, tmp_path):
  with pytest.raises(ConfigError, match="ab.a"):
    build_experiment(config_for(corpus), str(tmp_path), "ab")
