"""`--mode eval`: a trained run's metrics on any split; for a language model loss, perplexity and bits per
token, character and byte.

`evaluate_checkpoint` scores `eval.split` of `eval.source` (empty:
`data.eval_split` of `data.source`) with the task's own evaluation, then runs
the task's report (`Task.final_report`: a classifier's test report, a GAN's
quality-diversity comparison). A language model is scored in one of two ways:

* non-overlapping windows (`eval.stride = 0`, what training's evaluation
  does): window i holds tokens [i * seq_len, (i + 1) * seq_len], so the first
  target of every window is predicted from one token of context;
* a sliding window (`0 < eval.stride = S <= seq_len`, head="lm" on
  data.format="windows"): windows start every S tokens and each scores only
  the targets the previous window did not, its last S (the first window
  scores all of them; a last window, aligned to the end of the split, scores
  what is left). Every target after the first token is scored exactly once,
  with at least seq_len - S tokens of context; S = seq_len is the
  non-overlapping evaluation of the whole split. Scoring is a per-target
  weight mask through a jitted eval step sharded like training's, and the
  last batch is filled with zero-weight windows, so no target is dropped.

Bits per character and per byte: `lm.data.scoring` (the windows too).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import ml_collections

from lm.app.reports import report_context
from lm.core.configs import apply_overrides
from lm.data import pipeline, scoring, sources
from lm.experiment import Experiment, load_trained, open_eval_split, quantize_trained, token_windows
from lm.train.evaluate import evaluate
from lm.train.metrics import MetricWriter


# -- which split, and the names its metrics go under -------------------------------
def metric_key(text: str) -> str:
  """A name safe inside a metric key: runs of other characters become one "_" ("train[:10%]" -> "train_10")."""
  return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_") or "split"


def source_name(source: str) -> str:
  """A short name of a source string: the TFDS dataset's name, or the local file's stem / folder's name."""
  kind, target, _ = sources.parse_source(source)
  if kind == "tfds":
    return target.split(":", 1)[0]
  path = Path(target).expanduser()
  return path.stem if path.suffix else path.name


def eval_split(config: ml_collections.ConfigDict, split: str | None = None) -> tuple[str, str, str]:
  """(source, split, metrics prefix) that `--mode eval` scores.

  The split is, in order: `split`, config.eval.split, a split written into
  config.eval.source (tfds:NAME:SPLIT, file.txt:SPLIT), the only split of a
  local eval.source that has one (a single file), then config.data.eval_split.
  Metrics go under "eval_<split>/" for data.source and under
  "eval_<source name>_<split>/" when config.eval.source is set.
  """
  source = config.eval.source or config.data.source
  chosen = split or config.eval.split
  if config.eval.source and not chosen:
    kind, _, written = sources.parse_source(source)
    chosen = written
    if not chosen and kind == "local":
      names = sources.list_splits(source)
      chosen = names[0] if len(names) == 1 else None
  chosen = chosen or config.data.eval_split
  prefix = f"eval_{metric_key(source_name(source))}_{metric_key(chosen)}/" if config.eval.source else (
      f"eval_{metric_key(chosen)}/")
  return source, chosen, prefix


def evaluate_sliding(experiment: Experiment, params: Any, windows: scoring.SlidingWindows,
                     num_batches: int | None = None) -> dict[str, float]:
  """The task's eval metrics over sliding windows (every target once), plus eval/stride.

  The task's eval step scores the windows' masks, jitted on the run's mesh like its own.
  num_batches: score only the first this many global batches (None or 0: all).
  """
  steps = experiment.steps
  eval_step = steps.jit_eval(experiment.task.make_eval_step(), ("inputs", "targets", "mask"))
  sums, rows = evaluate(steps, params, windows, num_batches=num_batches, eval_step=eval_step,
                        batch_shardings=steps.batch_sharding)
  metrics = experiment.task.summarize(sums, rows, windows.chars_per_token(experiment.tokenizer))
  metrics["eval/stride"] = float(windows.stride)
  return metrics


def evaluate_split(experiment: Any, params: Any, source: Any, *, stride: int = 0,
                   num_batches: int | None = None) -> dict[str, float]:
  """Eval metrics of a split (`eval/...`), with eval/bits_per_byte for head="lm".

  stride 0: the task's own examples and evaluation (`Experiment.evaluate`);
  stride > 0: sliding windows (a language model on data.format="windows").
  """
  config = experiment.config
  if stride:
    if not experiment.task.sliding_eval or config.data.format != "windows":
      raise ValueError("A sliding window (eval.stride > 0) scores a token stream: head='lm', data.format='windows'.")
    tokens = pipeline.tokenize_split(source, experiment.tokenizer)
    examples = scoring.SlidingWindows(tokens, config.seq_len, stride, multiple=config.batch_size, name=source.name)
    metrics = evaluate_sliding(experiment, params, examples, num_batches)
    ratio = scoring.bytes_per_token(examples.stream, source, experiment.tokenizer)
  else:
    examples = token_windows(experiment, source, config.seq_len)
    metrics = experiment.evaluate(params, examples, num_batches)
    ratio = scoring.bytes_per_token(examples, source, experiment.tokenizer)
  return scoring.add_bits_per_byte(metrics, ratio) if experiment.task.language_model else metrics


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, split: str | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint on a split and appends the metrics to metrics.jsonl.

  The split: `split`, else config.eval.split of config.eval.source (empty:
  config.data.eval_split of config.data.source; `eval_split` gives the order). Reports loss, perplexity, bits per token, character and
  byte (head="lm") and the tokens scored; config.eval.stride > 0 scores a
  sliding window (module doc). config.eval.quantize=int8 scores the model with
  int8 matmul weights (lm.models.quantize): its metrics are named
  "eval_<split>_int8/...", and the result says its parameter bytes. Metrics are named "eval_<split>/..."
  (with eval.source: "eval_<source name>_<split>/...").
  """
  source, split, prefix = eval_split(config, split)
  experiment, params, step = load_trained(config, workdir, "eval")
  experiment, params, weights = quantize_trained(experiment, params, config.eval.quantize, "eval.quantize")
  if weights:  # a quantized model's figures go under their own names, beside the float model's
    prefix = prefix[:-1] + f"_{config.eval.quantize}/"
  # Opened as data.source would be (text and label fields, cache), whichever source it is.
  text = open_eval_split(apply_overrides(config, {"data.source": source}), split)
  metrics = evaluate_split(experiment, params, text, stride=config.eval.stride,
                                      num_batches=config.eval_batches)
  metrics = {key.replace("eval/", prefix, 1): value for key, value in metrics.items()}
  metrics.update(experiment.task.final_report(report_context(experiment, params)))
  MetricWriter(workdir, tensorboard=False).write(step, metrics)
  return {"step": step, "source": source, "split": split, **weights, **metrics}


def run(config: ml_collections.ConfigDict, workdir: str, report: Any = print) -> int:
  """The CLI's --mode eval: prints the metrics as one JSON line."""
  report(json.dumps(evaluate_checkpoint(config, workdir)))
  return 0
