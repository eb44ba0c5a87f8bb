"""`--mode ab`: two trained runs evaluated on the same examples, their difference with a paired bootstrap.

Each run is built as it was trained (its own model, task, data format and
tokenizer), with this config's data and evaluation settings, so both read
the same examples; the task pairs them (`Task.compare`: a language model's
per-example loss, a classifier's accuracy, macro-F1 and McNemar's test;
`lm.stats.ab`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from lm.core import files
from lm.core.configs import to_json_dict
from lm.core.errors import CheckpointError, ConfigError
from lm.experiment import load_trained, open_eval_split, token_windows, tokenizer_identity
from lm.experiment.config import config_from_saved, validate
from lm.train import checkpoint as checkpoint_lib
from lm.train.metrics import MetricWriter

AB_REPORT_FILE = "ab.json"


def _ab_run_config(config: ml_collections.ConfigDict, metadata: dict[str, Any]
                   ) -> ml_collections.ConfigDict:
  """The run's own config (model, head, tokenizer) with this config's data and evaluation settings,
  so both runs of an A/B pair read the same examples."""
  run = config_from_saved(metadata.get("config", {})).to_dict()
  ours = to_json_dict(config)
  # What the model is (model, head, vae/gan/classifier groups, the data format and tokenizer) stays the run's;
  # what is evaluated, where and how is this config's.
  kept_data = {key: run["data"][key] for key in ("format", "tokenizer", "tokenizer_vocab_size", "tokenizer_model")}
  for key in ("data", "eval", "mesh", "distributed", "xla_cpu_options", "cpu_malloc"):
    run[key] = ours[key]
  run["data"].update(kept_data)
  for key in ("seq_len", "batch_size", "eval_batches"):
    run[key] = ours[key]
  if metadata.get("classes"):
    run["classifier"]["labels"] = tuple(metadata["classes"])
  # The model keeps its own context length whatever seq_len this evaluation uses.
  run["model"]["max_len"] = metadata.get("model", {}).get("max_len") or run["model"]["max_len"]
  run.update(init_from="", warm_start="", resume=True)
  return config_from_saved(run)


def ab_test(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates runs config.ab.a and config.ab.b on the same examples and compares them (lm.stats.ab).

  Language models: per-example loss (each sequence's or sentence's mean token
  loss), B - A with a paired-bootstrap interval and p-value, and the relative
  change the online gate uses. Classifiers: accuracy and macro-F1, B - A with
  intervals and p-values, and McNemar's test. Written to WORKDIR/ab.json and a
  metrics.jsonl row; both runs must share the tokenizer (and classes).
  """
  validate(config, "ab")
  split = config.eval.split or config.data.eval_split
  runs = {}
  for name in ("a", "b"):
    directory = config.ab[name]
    if not checkpoint_lib.has_checkpoint(directory):
      raise CheckpointError(
          f"config.ab.{name}={directory!r} holds no checkpoint. Point it at the workdir (or checkpoints folder) "
          "of a trained run.")
    metadata = checkpoint_lib.read_metadata(directory)
    run_config = _ab_run_config(config, metadata)
    experiment, params, step = load_trained(run_config, directory, "eval")
    runs[name] = (experiment, params, step, directory)
  (exp_a, _, step_a, dir_a), (exp_b, _, step_b, dir_b) = runs["a"], runs["b"]
  # Two runs compare when their tasks pair examples the same way (a denoising LM with a plain one, say).
  if type(exp_a.task).compare is not type(exp_b.task).compare:
    raise ConfigError(f"config.ab.a ({dir_a}) is a head={exp_a.task.name!r} run and config.ab.b ({dir_b}) "
                      f"a head={exp_b.task.name!r} run; an A/B test compares two runs of one kind.")
  if tokenizer_identity(exp_a.tokenizer) != tokenizer_identity(exp_b.tokenizer):
    raise ConfigError(
        f"The runs have different tokenizers ({dir_a}/tokenizer: {exp_a.tokenizer!r}; {dir_b}/tokenizer: "
        f"{exp_b.tokenizer!r}), so their examples and losses do not pair. Compare runs trained with the same "
        "tokenizer (start B with config.init_from=A, or set data.tokenizer_model to one SentencePiece file).")
  if exp_a.config.data.format != exp_b.config.data.format:
    raise ConfigError(f"config.ab.a ({dir_a}) was trained on data.format={exp_a.config.data.format!r} "
                                 f"and config.ab.b ({dir_b}) on {exp_b.config.data.format!r}; their examples differ.")
  exp_a.task.check_comparable(exp_b.task, (dir_a, dir_b))
  # One tokenizer, one seq_len, the same classes: the examples are built once and fed to both runs.
  examples = token_windows(exp_a, open_eval_split(exp_a.config, split), config.seq_len)
  rows = {name: experiment.evaluate_rows(params, examples, config.eval_batches)
          for name, (experiment, params, _, _) in runs.items()}
  comparison, headline = exp_a.task.compare(rows["a"], rows["b"], exp_b.task, confidence=float(config.ab.confidence),
                                            samples=int(config.ab.bootstrap_samples), seed=int(config.ab.seed))
  report = {"a": {"run": dir_a, "step": step_a}, "b": {"run": dir_b, "step": step_b}, "head": exp_a.task.name,
            "source": config.data.source, "split": split, **comparison, "headline": headline}
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.atomic_write(os.path.join(workdir, AB_REPORT_FILE), json.dumps(report, indent=2).encode())
    MetricWriter(workdir, tensorboard=False).write(0, headline)
  return report


def run(config: ml_collections.ConfigDict, workdir: str, report: Any = print) -> int:
  """The CLI's --mode ab: prints the headline figures (the metrics.jsonl row) as one JSON line."""
  outcome = ab_test(config, workdir)
  report(json.dumps(outcome["headline"]))
  return 0
