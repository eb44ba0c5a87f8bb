"""The training loop: build, restore or initialize, train, evaluate, checkpoint.

`train(config, workdir)` is what `--mode train` runs and what a notebook
calls. It guards itself: a NaN/Inf loss or gradient norm stops the run before
a bad state is checkpointed, and SIGTERM/SIGINT save a checkpoint and exit
cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from lm import config as config_lib
from lm import interop
from lm.data import pipeline
from lm.core.errors import DataError, NonFiniteError
from lm.heads import ROWS
from lm.online.store import is_online_checkpoint
from lm.train import checkpoint as checkpoint_lib
from lm.train import perf
from lm.train.experiment import (TOKENIZER_DIR, Experiment, build_experiment, open_eval_split, open_train_split, saved_head,
                                 token_windows)
from lm.train.metrics import MetricWriter
from lm.train.state import TrainState


@dataclasses.dataclass
class TrainResult:
  step: int
  train_loss: float | None
  eval_loss: float | None
  interrupted: str | None  # name of the signal that stopped the run, if any
  workdir: str


class StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.received: str | None = None

  @contextlib.contextmanager
  def installed(self) -> Iterator[StopSignal]:
    if threading.current_thread() is not threading.main_thread():
      yield self  # signal handlers can only be set from the main thread (e.g. some notebook kernels)
      return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):  # pylint: disable=unused-argument
      self.received = signal.Signals(signum).name

    for sig in previous:
      signal.signal(sig, handler)
    try:
      yield self
    finally:
      for sig, old in previous.items():
        signal.signal(sig, old)


def _evaluate(experiment: Experiment, params: Any, windows: Any,
              num_batches: int | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Runs the eval step over eval examples: (summed outputs, gathered per-row outputs)."""
  dataset = pipeline.eval_dataset(windows, global_batch_size=experiment.config.batch_size,
                                  num_batches=num_batches or None, rows=experiment.process_rows)
  if len(dataset) == 0:
    raise DataError(f"The eval split has {len(windows)} examples, fewer than one batch of "
                    f"{experiment.config.batch_size}; lower batch_size or use a larger eval split.")
  sums: dict[str, float] = {}
  rows: dict[str, list[np.ndarray]] = {}
  with experiment.steps.context():
    for local in dataset:
      batch = pipeline.to_global_batch(local, experiment.steps.batch_shardings, experiment.config.batch_size)
      out = experiment.steps.eval_step(params, batch)
      for key, value in out.items():
        if key.startswith(ROWS):
          rows.setdefault(key, []).append(np.asarray(value))
        else:
          sums[key] = sums.get(key, 0.0) + float(value)
  return sums, {key: np.concatenate(values) for key, values in rows.items()}


def evaluate_params(experiment: Experiment, params: Any, windows: Any,
                    num_batches: int | None = None) -> dict[str, float]:
  """The head's eval metrics over eval examples (for the LM: mean token loss, perplexity, bits per token/char)."""
  sums, rows = _evaluate(experiment, params, windows, num_batches)
  return experiment.head.summarize(sums, rows, windows.chars_per_token(experiment.tokenizer))


def evaluate_rows(experiment: Experiment, params: Any, windows: Any,
                  num_batches: int | None = None) -> dict[str, np.ndarray]:
  """The eval step's per-row outputs ("rows/..." keys, gathered in example order), all batches by default."""
  return _evaluate(experiment, params, windows, num_batches)[1]


def _check_finite(step: int, metrics: dict[str, Any]) -> None:
  for name in ("train/loss", "train/grad_norm"):
    value = float(metrics[name])
    if not math.isfinite(value):
      raise NonFiniteError(
          f"{name} is {value} at step {step}. The run stopped without saving this state; the last good "
          "checkpoint is intact. Lower optim.lr, check the data, or raise optim.warmup_steps, then resume.")


def _write_run_files(experiment: Experiment, tokenizer_is_new: bool) -> None:
  """Tokenizer and resolved config into the workdir (process 0; called only after all checks)."""
  if jax.process_index() != 0:
    return
  os.makedirs(experiment.workdir, exist_ok=True)
  if tokenizer_is_new:
    experiment.tokenizer.save(os.path.join(experiment.workdir, TOKENIZER_DIR))
  with open(os.path.join(experiment.workdir, "config.json"), "w") as f:
    json.dump(experiment.metadata(), f, indent=2, default=str)


def initial_state(experiment: Experiment) -> tuple[TrainState, dict[str, Any] | None, str]:
  """Resume, warm-start, init-from or fresh init, in that order of precedence."""
  config = experiment.config
  if config.resume and checkpoint_lib.has_checkpoint(experiment.workdir):
    if is_online_checkpoint(experiment.workdir):
      raise checkpoint_lib.CheckpointError(
          f"{experiment.workdir} holds checkpoints of an online run (--mode online). Continue it with --mode "
          f"online, or start a new --workdir from its weights with --config.init_from={experiment.workdir}.")
    state, data_state, _, step = checkpoint_lib.restore(experiment.workdir, experiment.abstract_state)
    return state, data_state, f"resumed from step {step}"
  if config.warm_start:
    state, _, _, step = checkpoint_lib.restore(config.warm_start, experiment.abstract_state, with_data=False)
    return state, None, f"warm-started from {config.warm_start} step {step}"
  head = experiment.head
  if head.requires_init_from and not config.init_from:
    raise config_lib.ConfigError(head.requires_init_from)
  state = experiment.init_state()
  hf_dir = interop.hf_directory(config.init_from)
  if hf_dir is not None:  # a Hugging Face language model (lm.interop), e.g. GPT-2 or Llama
    target, merge = head.init_from_target(experiment.abstract_state.params, "lm")
    state = state.replace(params=merge(state.params, interop.load_sharded_params(hf_dir, experiment.model_config,
                                                                                  target)))
    return state, None, f"initialized weights from {config.init_from}"
  if config.init_from:
    source_head = saved_head(checkpoint_lib.read_metadata(config.init_from))
    target, merge = head.init_from_target(experiment.abstract_state.params, source_head)
    restored, step = checkpoint_lib.restore_params(config.init_from, target)
    state = state.replace(params=merge(state.params, restored))
    return state, None, f"initialized weights from {config.init_from} step {step} (a head={source_head!r} run)"
  return state, None, "initialized from scratch"


def train(config: ml_collections.ConfigDict, workdir: str, *, train_source: Any = None, eval_source: Any = None,
          final_report: bool = True) -> TrainResult:
  """Trains `config` in `workdir` (resuming if it holds checkpoints).

  train_source / eval_source: documents to use instead of data.source's train
  and eval splits (cross-validation folds: lm.train.crossval); final_report:
  False skips the head's after-training report.
  """
  experiment, tokenizer_is_new = build_experiment(config, workdir, "train")
  train_windows = token_windows(experiment, train_source or open_train_split(config), config.data.train_stride,
                                clean=config.data.clean_train, train=True)
  eval_windows = token_windows(experiment, eval_source or open_eval_split(config), config.seq_len)
  state, data_state, how = initial_state(experiment)
  _write_run_files(experiment, tokenizer_is_new)
  logging.info("Train state %s; %d training windows, %d eval windows.", how, len(train_windows), len(eval_windows))

  dataset = pipeline.train_dataset(train_windows, seed=config.seed, global_batch_size=config.batch_size,
                                   rows=experiment.process_rows)
  batches = pipeline.BatchIterator(dataset, experiment.steps.batch_shardings, global_batch_size=config.batch_size,
                                   prefetch=config.data.prefetch, threads=config.data.threads)
  if data_state:
    batches.set_state(data_state["iterator"])
  checkpointer = checkpoint_lib.Checkpointer(experiment.checkpoint_dir, keep=config.keep_checkpoints,
                                             keep_best=config.keep_best, asynchronous=config.async_checkpointing)
  writer = MetricWriter(workdir)
  metadata = experiment.metadata()
  num_params = perf.matmul_params(state.params, experiment.model_config)
  flops_per_step = perf.flops_per_token(num_params, experiment.model_config, config.seq_len) * (
      config.batch_size * config.seq_len)
  peak = perf.peak_flops_per_device(experiment.model_config.dtype, config.bench.peak_flops_per_device) * (
      jax.device_count())

  start_step = int(state.step)
  step = start_step
  if start_step >= config.steps:
    logging.warning("%s already holds step %d of %d: nothing to train. Raise config.steps to train on, "
                    "or use a new --workdir.", workdir, start_step, config.steps)
  last_eval: float | None = None
  last_train: float | None = None
  pending: tuple[int, dict[str, Any]] | None = None  # metrics of the previous step, checked one step late
  window_start, window_steps = time.perf_counter(), 0
  progress = _progress_bar(start_step, config.steps)

  def save(at_step: int, selection: float | None = None) -> None:
    if pending is not None:
      _check_finite(*pending)
    checkpointer.save(at_step, state, {"iterator": batches.get_state(), "step": at_step,
                                       "process_count": jax.process_count()}, metadata, selection)

  stop = StopSignal()
  try:
    with stop.installed(), experiment.steps.context():
      while step < config.steps:
        batch = next(batches)
        state, metrics = experiment.steps.train_step(state, batch)
        if pending is not None:
          # Checking the previous step's metrics here keeps one step in flight
          # on the device instead of synchronizing on every step.
          _check_finite(*pending)
        step += 1
        pending = (step, metrics)
        window_steps += 1
        row: dict[str, float] = {}  # one metrics.jsonl line per step, train and eval together
        if step % config.log_every == 0 or step == config.steps:
          _check_finite(*pending)
          step_time = (time.perf_counter() - window_start) / window_steps
          row.update({k: float(v) for k, v in metrics.items()})
          row["perf/step_time_ms"] = 1e3 * step_time
          row["perf/tokens_per_sec"] = config.batch_size * config.seq_len / step_time
          if experiment.head.counts_lm_flops:
            row["perf/mfu"] = flops_per_step / step_time / peak
          last_train = row["train/loss"]
          progress.set_postfix(loss=f"{last_train:.4f}", tok_s=f"{row['perf/tokens_per_sec']:,.0f}")
          window_start, window_steps = time.perf_counter(), 0
        selection = None
        if step % config.eval_every == 0 or step == config.steps:
          row.update(evaluate_params(experiment, state.params, eval_windows, config.eval_batches))
          last_eval = row["eval/loss"]
          selection = experiment.head.selection(row)
          logging.info("step %d: eval/loss %.4f", step, last_eval)
          window_start, window_steps = time.perf_counter(), 0  # keep eval time out of the step-time figure
        if row:
          writer.write(step, row)
        if step % config.checkpoint_every == 0 or step == config.steps:
          save(step, selection)
        progress.update(1)
        if stop.received:
          logging.warning("%s received: saving step %d and stopping.", stop.received, step)
          if step % config.checkpoint_every and step != config.steps:
            save(step)
          break
    if final_report and step >= config.steps and start_step < config.steps and not stop.received:
      checkpointer.wait()  # a report may read the best checkpoint, which may be the one just saved
      report = experiment.head.final_report(experiment, state.params)
      if report:
        writer.write(step, report)
        logging.info("Final report: %s", report)
  finally:
    progress.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  return TrainResult(step, last_train, last_eval, stop.received, workdir)


def _progress_bar(start: int, total: int):
  from tqdm import tqdm  # plain text bar: works in terminals, logs and notebooks alike  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=start, desc="train", unit="step", disable=jax.process_index() != 0,
              dynamic_ncols=True, mininterval=1.0)
