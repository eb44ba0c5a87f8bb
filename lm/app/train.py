"""`--mode train`: build, restore or initialize, then the engine's loop with the usual hooks.

`train(config, workdir)` is what `--mode train` runs and what a notebook
calls: `lm.experiment.build_experiment`, `initial_state` (resume, warm-start,
init-from), then `lm.train.loop.fit` with hooks that log (`log_every`),
evaluate (`eval_every`), write metrics.jsonl, checkpoint (`checkpoint_every`,
and on SIGTERM/SIGINT) and draw the progress bar. A NaN/Inf loss or gradient
norm stops the run before a bad state is checkpointed. After the last step
the task's report (`Task.final_report`) runs once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from lm.app.lock import run_lock
from lm.app.reports import report_context
from lm.core.errors import DataError
from lm.data import pipeline
from lm.experiment import (TOKENIZER_DIR, Experiment, build_experiment, initial_state, open_eval_split,
                           open_train_split, token_windows, train_dataset)
from lm.train import checkpoint as checkpoint_lib
from lm.train import perf
from lm.train.loop import CheckpointHook, EvalHook, LogHook, Loop, MetricsHook, ProgressHook, StopSignal, fit
from lm.train.metrics import MetricWriter


@dataclasses.dataclass
class TrainResult:
  step: int
  train_loss: float | None
  eval_loss: float | None
  interrupted: str | None  # name of the signal that stopped the run, if any
  workdir: str
  privacy: dict[str, float] = dataclasses.field(default_factory=dict)  # privacy/... of a DP-SGD run at its end


def write_run_files(experiment: Experiment, tokenizer_is_new: bool) -> None:
  """Tokenizer and resolved config into the workdir (process 0; called only after all checks)."""
  if jax.process_index() != 0:
    return
  os.makedirs(experiment.workdir, exist_ok=True)
  if tokenizer_is_new:
    experiment.tokenizer.save(os.path.join(experiment.workdir, TOKENIZER_DIR))
  with open(os.path.join(experiment.workdir, "config.json"), "w") as f:
    json.dump(experiment.metadata(), f, indent=2, default=str)


def train(config: ml_collections.ConfigDict, workdir: str, *, train_source: Any = None, eval_source: Any = None,
          final_report: bool = True) -> TrainResult:
  """Trains `config` in `workdir` (resuming if it holds checkpoints).

  train_source / eval_source: documents to use instead of data.source's train
  and eval splits (cross-validation folds: lm.app.crossval); final_report:
  False skips the task's after-training report. The run holds `WORKDIR/run.lock`
  from start to end (lm.app.lock): another live run in `workdir` stops this
  one with a WorkdirLockedError before anything is written.
  """
  with run_lock(workdir, "train"):
    return _train(config, workdir, train_source=train_source, eval_source=eval_source, final_report=final_report)


def _train(config: ml_collections.ConfigDict, workdir: str, *, train_source: Any, eval_source: Any,
           final_report: bool) -> TrainResult:
  """`train`'s work, inside the workdir lock."""
  experiment, tokenizer_is_new = build_experiment(config, workdir, "train")
  task = experiment.task
  train_examples = token_windows(experiment, train_source or open_train_split(config), config.data.train_stride,
                                 clean=config.data.clean_train, train=True)
  eval_examples = token_windows(experiment, eval_source or open_eval_split(config), config.seq_len)
  if len(eval_examples) < config.batch_size:  # the first evaluation would say so, after eval_every steps of work
    raise DataError(f"The eval split has {len(eval_examples)} examples, fewer than one batch of {config.batch_size} "
                    "(evaluation reads whole batches of config.batch_size). Fix: a smaller config.batch_size, or a "
                    "larger eval split (data.eval_split).")
  dataset, accounting = train_dataset(experiment, train_examples)  # DP-SGD: the batches its accountant describes
  if accounting is not None:
    logging.info("DP-SGD: clip %g, noise multiplier %.4g, %d examples, %s, delta %.3g, %s accountant: epsilon %.4g "
                 "after %d steps.", accounting.clip_norm, accounting.noise_multiplier, accounting.dataset_size,
                 accounting.describe(), accounting.delta, accounting.accountant, accounting.epsilon(config.steps),
                 config.steps)
  state, data_state, how = initial_state(experiment)
  write_run_files(experiment, tokenizer_is_new)
  logging.info("Train state %s; %d training windows, %d eval windows.", how, len(train_examples), len(eval_examples))

  batches = pipeline.BatchIterator(dataset, experiment.steps.train_shardings, global_batch_size=config.batch_size,
                                   prefetch=config.data.prefetch, threads=config.data.threads)
  if data_state:
    batches.set_state(data_state["iterator"])
  checkpointer = checkpoint_lib.Checkpointer(experiment.checkpoint_dir, keep=config.keep_checkpoints,
                                             keep_best=config.keep_best, asynchronous=config.async_checkpointing)
  writer = MetricWriter(workdir)
  metadata = experiment.metadata()
  tokens_per_step = config.batch_size * config.seq_len
  flops_per_step = peak = None
  if task.counts_lm_flops:  # the FLOP count is a decoder-only LM's (lm.train.perf); other tasks report no MFU
    num_params = perf.matmul_params(state.params, experiment.model_config)
    flops_per_step = perf.flops_per_token(num_params, experiment.model_config, config.seq_len) * tokens_per_step
    peak = perf.peak_flops_per_device(experiment.model_config.dtype, config.bench.peak_flops_per_device) * (
        jax.device_count())
    if (cpu_peak := perf.cpu_peak_in_use(config.bench.peak_flops_per_device)) is not None:
      logging.info("MFU's CPU peak: %s", cpu_peak)

  start_step = int(state.step)
  if start_step >= config.steps:
    logging.warning("%s already holds step %d of %d: nothing to train. Raise config.steps to train on, "
                    "or use a new --workdir.", workdir, start_step, config.steps)

  def save(loop: Loop) -> None:
    loop.check_finite()
    checkpointer.save(loop.step, loop.state, {"iterator": batches.get_state(), "step": loop.step,
                                              "process_count": jax.process_count()}, metadata, loop.selection)

  def evaluate(params: Any) -> dict[str, float]:
    metrics = experiment.evaluate(params, eval_examples, config.eval_batches)
    logging.info("eval/loss %.4f", metrics["eval/loss"])
    return metrics

  hooks = [LogHook(config.log_every, tokens_per_step, flops_per_step=flops_per_step, peak_flops=peak),
           EvalHook(config.eval_every, evaluate, task.selection,
                    extra=accounting.metrics if accounting is not None else None),
           MetricsHook(writer),
           CheckpointHook(config.checkpoint_every, save),
           ProgressHook(start_step, config.steps)]
  # The signal handlers stay installed until the last checkpoint is written: a second SIGTERM (a launcher
  # stopping the other processes of a job) must not kill a process while its asynchronous save commits.
  stop = StopSignal()
  try:
    with stop.installed(), experiment.steps.context():
      loop = fit(state, experiment.steps.train_step, lambda _: next(batches), first=start_step, last=config.steps,
                 hooks=hooks, stop=stop)
      if loop.stop.agreed:
        checkpointer.wait()
    if loop.stop.agreed:
      logging.warning("%s received: saved step %d and stopped.", loop.stop.agreed, loop.step)
    elif final_report and loop.step >= config.steps and start_step < config.steps:
      checkpointer.wait()  # a report may read the best checkpoint, which may be the one just saved
      report = task.final_report(report_context(experiment, loop.state.params))
      if report:
        writer.write(loop.step, report)
        logging.info("Final report: %s", report)
  finally:
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  return TrainResult(loop.step, loop.last_train_loss, loop.last_eval_loss, loop.stop.agreed, workdir,
                     accounting.metrics(loop.step) if accounting is not None else {})


def run(config: ml_collections.ConfigDict, workdir: str, report: Any = print) -> int:
  """The CLI's --mode train: trains, prints the summary line; exit code 0, or 130 after SIGINT."""
  result = train(config, workdir)
  report(json.dumps({"step": result.step, "train/loss": result.train_loss, "eval/loss": result.eval_loss,
                     **result.privacy}))
  if result.interrupted:
    logging.warning("Stopped by %s at step %d; the checkpoint is saved. Rerun the same command to resume.",
                    result.interrupted, result.step)
    return 0 if result.interrupted == "SIGTERM" else 128 + 2
  return 0
