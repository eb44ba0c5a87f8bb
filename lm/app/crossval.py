"""`--mode crossval`: K models on deterministic stratified folds of the training split.

  python -m lm.main --config experiments/sst2_classifier.py --workdir runs/sst2_cv \
      --mode crossval --config.eval.folds=5

The training split's documents are dealt into `eval.folds` folds
(`lm.stats.classify.stratified_folds`, seeded by config.seed: a task with
labels, a classifier, has its classes spread evenly over the folds; other
tasks get plain random folds, `Task.fold_labels`).
Fold i trains a fresh model on the other folds in `WORKDIR/fold_i/` (a normal
run directory: it resumes, so an interrupted cross-validation continues where
it stopped and finished folds are not retrained) and is evaluated, with its
final weights, on fold i. The data.eval_split and the test split are not
used: the held-out fold is each model's evaluation data, and choosing the
best checkpoint on it would bias the estimate.

The tokenizer is built once, from the whole training split's text (no labels),
and shared by every fold (`WORKDIR/tokenizer`).

Outputs in WORKDIR: `crossval.json` (the folds' sizes and class counts, each
fold's metrics, their mean and sample standard deviation, ddof = 1) and
`metrics.jsonl` (a row per fold with `crossval/fold`, then the mean and std rows).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from lm.app.lock import run_lock
from lm.app.train import train
from lm.core import files
from lm.core.configs import apply_overrides
from lm.core.errors import CheckpointError, ConfigError
from lm.data.labeled import Subset
from lm.experiment import TOKENIZER_DIR, open_train_split, resolve_tokenizer
from lm.experiment.config import validate
from lm.experiment.registry import task_class
from lm.stats import classify
from lm.train import checkpoint as checkpoint_lib
from lm.train.metrics import MetricWriter

REPORT_FILE = "crossval.json"
PREFIX = "crossval/"


def _fold_metrics(fold_dir: str, steps: int) -> dict[str, float]:
  """The eval metrics at the fold's final step, from its metrics.jsonl (written by lm.app.train)."""
  final: dict[str, float] = {}
  with open(os.path.join(fold_dir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if row.get("step") == steps and "eval/loss" in row:
        final = {key: value for key, value in row.items() if key.startswith("eval/")}
  if not final:
    raise CheckpointError(
        f"{fold_dir} finished training but its metrics.jsonl has no evaluation at step {steps}. Delete "
        f"{fold_dir} and rerun --mode crossval to train that fold again.")
  return final


def crossval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates `config.eval.folds` models; returns the crossval.json report.

  Holds `WORKDIR/run.lock` throughout (lm.app.lock), and each fold's `train`
  holds `WORKDIR/fold_i/run.lock` while it trains: locks are per directory.
  """
  with run_lock(workdir, "crossval"):
    return _crossval(config, workdir)


def _crossval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  validate(config, "crossval")
  folds_wanted = int(config.eval.folds)
  if checkpoint_lib.has_checkpoint(workdir):
    raise ConfigError(
        f"{workdir} holds a training run's checkpoints; --mode crossval writes one run per fold under "
        "WORKDIR/fold_i. Use a new --workdir.")
  source = open_train_split(config)
  labels = task_class(config.head).fold_labels(source)
  stratified = labels is not None
  labels = labels if stratified else ["all"] * len(source)
  if folds_wanted > len(source):
    raise ConfigError(f"config.eval.folds={folds_wanted} is more than the {len(source)} documents of "
                      f"{source.name}; lower it.")
  folds = classify.stratified_folds(np.asarray(labels), folds_wanted, seed=int(config.seed))

  tokenizer, tokenizer_is_new = resolve_tokenizer(config, workdir)
  shared_tokenizer = os.path.join(workdir, TOKENIZER_DIR)
  if tokenizer_is_new and jax.process_index() == 0:
    tokenizer.save(shared_tokenizer)
  # Each fold trains without a test split, is evaluated on its whole held-out fold, and reports afterwards here.
  fold_config = apply_overrides(config, {"classifier.test_split": "", "eval_batches": 0})
  per_fold = []
  for index in range(folds_wanted):
    fold_dir = os.path.join(workdir, f"fold_{index}")
    if jax.process_index() == 0 and not os.path.exists(os.path.join(fold_dir, TOKENIZER_DIR)):
      shutil.copytree(shared_tokenizer, os.path.join(fold_dir, TOKENIZER_DIR))
    train_indices, eval_indices = classify.fold_split(folds, index)
    logging.info("Fold %d of %d: %d training, %d held-out documents.", index + 1, folds_wanted,
                 len(train_indices), len(eval_indices))
    result = train(fold_config, fold_dir,
                        train_source=Subset(source, train_indices, f"{source.name} fold {index} train"),
                        eval_source=Subset(source, eval_indices, f"{source.name} fold {index}"),
                        final_report=False)
    if result.interrupted:
      logging.warning("Cross-validation stopped by %s in fold %d (saved); rerun the same command to continue.",
                      result.interrupted, index)
      return {"interrupted": result.interrupted, "fold": index}
    held_out = np.asarray(labels)[eval_indices]
    per_fold.append({
        "fold": index, "train_examples": int(len(train_indices)), "eval_examples": int(len(eval_indices)),
        "eval_class_counts": {str(c): int(n) for c, n in zip(*np.unique(held_out, return_counts=True))},
        "metrics": _fold_metrics(fold_dir, int(config.steps)),
    })

  keys = sorted(set.intersection(*(set(fold["metrics"]) for fold in per_fold)))
  values = {key: np.asarray([fold["metrics"][key] for fold in per_fold], np.float64) for key in keys}
  mean = {key: float(v.mean()) for key, v in values.items()}
  std = {key: float(v.std(ddof=1)) for key, v in values.items()}
  report = {"folds": folds_wanted, "seed": int(config.seed), "stratified": stratified, "steps": int(config.steps),
            "source": source.name, "per_fold": per_fold, "mean": mean, "std": std}
  if jax.process_index() == 0:
    files.atomic_write(os.path.join(workdir, REPORT_FILE), json.dumps(report, indent=2).encode())
    writer = MetricWriter(workdir, tensorboard=False)
    for fold in per_fold:
      writer.write(int(config.steps), {PREFIX + "fold": float(fold["fold"]),
                                       **{PREFIX + k: v for k, v in fold["metrics"].items()}})
    writer.write(int(config.steps), {**{PREFIX + "mean/" + k: v for k, v in mean.items()},
                                     **{PREFIX + "std/" + k: v for k, v in std.items()}})
    writer.close()
  return report


def summary_line(report: dict[str, Any]) -> dict[str, Any]:
  """The headline figures of a crossval report, for the CLI."""
  if "interrupted" in report:
    return report
  keys = [key for key in ("eval/accuracy", "eval/macro_f1", "eval/loss") if key in report["mean"]]
  return {"folds": report["folds"], **{key: f"{report['mean'][key]:.4f} ± {report['std'][key]:.4f}" for key in keys}}


def run(config: ml_collections.ConfigDict, workdir: str, report: Any = print) -> int:
  """The CLI's --mode crossval: prints the mean ± std line; exit code 130 after SIGINT."""
  outcome = crossval(config, workdir)
  report(json.dumps(summary_line(outcome), ensure_ascii=False))
  return 0 if outcome.get("interrupted") in (None, "SIGTERM") else 128 + 2
