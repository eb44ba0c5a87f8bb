"""`--mode online`: keep training a model on newly streamed data without forgetting.

  state <- the workdir's latest checkpoint, else config.online.init_from's weights
  loop:
    chunk <- the stream's next unconsumed chunk (wait for one; quarantine it if unreadable)
    clean it (normalize, filter, dedup against everything trained on), hold out
      a deterministic share of its documents as the domain's evaluation set
    train `steps_per_chunk` steps on it, mixing in replayed past sequences,
      with a per-chunk learning-rate schedule and optional regularizers
    evaluate every domain seen so far -> a new row of the continual matrix R
    gate: promote the new weights to "current" only if no old domain got worse
      by more than `gate.max_regression` (paired bootstrap over sequences)
    checkpoint everything (weights, current, cursor, replay, dedup, R) at once

A preference chunk (records with "chosen" and "rejected": the server's feedback
export, or any such file in the watched folder) trains DPO steps against the
current (served) model as the reference, with replayed text mixed in
(online.replay_fraction), from fresh AdamW moments; a deterministic share of its pairs is held out, and
from then on every gate also refuses a candidate whose accuracy on the held-out
pairs (log p(chosen) > log p(rejected)) falls below the current model's by more
than gate.max_preference_drop. Text and preference chunks alternate freely.

With config.privacy.enabled every text chunk trains with DP-SGD on Poisson-sampled
windows of the chunk and the replay buffer; epsilon is composed across chunks in a
ledger saved with the checkpoint, and online.max_epsilon stops the loop before a
chunk that would exceed it (lm.online.privacy).

A kill at any moment resumes from the last checkpoint: mid-chunk checkpoints
record the chunk and the step within it (and, with a regularizer on, its
anchor and EWC Fisher), and the chunk is re-read and re-cleaned identically
(the dedup index only absorbs a chunk when it ends), so no chunk is trained
on twice or skipped, and a resumed chunk keeps the anchor it started with.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging as py_logging
import math
import os
import time
from collections import Counter
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from lm.app.lock import run_lock
from lm.app.train import write_run_files
from lm.core import faults
from lm.core.configs import apply_overrides
from lm.core.errors import CheckpointError, ConfigError, DataError
from lm.data import clean as clean_lib
from lm.data import pairs as pairs_lib
from lm.data import pipeline, sources
from lm.data import stream as stream_lib
from lm.experiment import Experiment, build_experiment, open_eval_split, open_train_split
from lm.online import privacy as privacy_lib
from lm.online import regularizers
from lm.online import replay as replay_lib
from lm.online.run_state import OnlineRun, is_heldout, stable_seed, tokens_of, windows_of
from lm.online.step import (Regularization, chunk_learning_rate, make_online_preference_step, make_online_step,
                            make_preference_margins, make_sequence_losses)
from lm.online import store
from lm.online.store import OnlineCheckpointer, is_online_checkpoint
from lm.stats import ab
from lm.stats.continual import ContinualMatrix
from lm.train import checkpoint as checkpoint_lib
from lm.train import optim
from lm.train import privacy as train_privacy
from lm.train import sharding as sharding_lib
from lm.train import state as state_lib
from lm.train.loop import CheckpointHook, Hook, LogHook, Loop, MetricsHook, StopSignal, fit
from lm.train.metrics import MetricWriter
from lm.train.state import TrainState

HEATMAP_FILE = "continual_R.png"


@dataclasses.dataclass
class OnlineResult:
  chunks_done: int  # in this run
  step: int
  interrupted: str | None
  continual: dict[str, Any]
  workdir: str
  privacy: dict[str, float] | None = None  # a private run's privacy/... figures after its last chunk
  stopped: str | None = None  # why the loop stopped before the stream ended (online.max_epsilon's budget)


def _prepare_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The config `build_experiment` sees: the online model's weights come from online.init_from."""
  if not config.online.init_from and not checkpoint_lib.has_checkpoint(workdir):
    raise ConfigError(
        f"{workdir} has no checkpoint and config.online.init_from is empty: the online loop continues a trained "
        "model. Set --config.online.init_from=WORKDIR_OF_A_TRAINED_RUN (e.g. runs/shakespeare_byte).")
  if checkpoint_lib.has_checkpoint(workdir) and not is_online_checkpoint(workdir):
    raise CheckpointError(
        f"{workdir} holds checkpoints of a --mode train run, not of an online run. Give the online run its own "
        f"--workdir and start it from this one: --config.online.init_from={workdir}")
  saved = store.latest_online_json(workdir) if checkpoint_lib.has_checkpoint(workdir) else None
  if saved is not None:  # before anything opens the workdir (start() checks the checkpoint it restores, too)
    check_privacy_matches(config, workdir, bool((saved.get("privacy") or {}).get("enabled")))
  # The per-chunk schedule is the online loop's own; the optimizer's total steps do not matter.
  return apply_overrides(config, {"init_from": config.online.init_from, "warm_start": ""})


def check_privacy_matches(config: ml_collections.ConfigDict, workdir: str, saved: bool) -> None:
  """A run's DP-SGD guarantee covers all of it or none of it: refuse to resume it with privacy switched."""
  enabled = bool(config.privacy.enabled)
  if enabled != saved:
    how = "with DP-SGD" if saved else "without DP-SGD"
    raise ConfigError(
        f"config.privacy.enabled={enabled}, but the online run in {workdir} trained {how}: "
        + ("chunks trained without noise have no privacy guarantee that later private chunks could extend. "
           if enabled else "resuming it without DP-SGD would void the guarantee of what it has trained. ")
        + f"Fix: --config.privacy.enabled={saved} to continue it, or start a new online run in another --workdir "
        "(--config.online.init_from=THIS_RUN's workdir starts from its weights).")


def _warn_unknown_tokens(experiment: Experiment, chunk_id: str, windows: pipeline.Windows) -> None:
  unk = experiment.tokenizer.unk_id
  if unk is not None:
    count = int(np.sum(windows.tokens == unk))
    if count:
      logging.warning("Chunk %s has %d characters this %s tokenizer has never seen; they map to its unknown id "
                      "(a byte tokenizer represents any text).", chunk_id, count, experiment.tokenizer.kind)


class OnlineLoop:
  """Builds once, then runs chunks; `run()` is what `--mode online` calls."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, stream: stream_lib.Stream | None = None):
    config = _prepare_config(config, workdir)
    self.experiment, self.tokenizer_is_new = build_experiment(config, workdir, "online")
    self.config = self.experiment.config
    self.online = self.config.online
    self.workdir = workdir
    self.pretrain_domain = self.online.pretrain_domain or _domain_of(self.config.data.source)
    self.stream = stream or stream_lib.parse_stream(
        self.online.stream, num_chunks=int(self.online.chunks), domain=self.online.domain or None,
        split=self.online.split, text_field=self.config.data.text_field, cache_dir=self.config.data.cache_dir or None,
        settle_seconds=float(self.online.settle_seconds))
    experiment = self.experiment
    self.direction = optim.make_update_direction(self.config.optim)
    self.reg = Regularization.from_config(self.online)
    self.abstract_state = self._abstract_online_state()
    state_shardings = jax.tree.map(lambda leaf: leaf.sharding, self.abstract_state)
    privacy = self.config.privacy
    # DP-SGD (lm.online.privacy): the divisor of the noisy sum is each chunk's expected rows, given per call.
    self.dp_sgd = train_privacy.DpSgd(float(privacy.clip_norm), float(privacy.noise_multiplier),
                                      expected_rows_from_inputs=True) if privacy.enabled else None
    self.budget_spent: str | None = None  # set when online.max_epsilon stops the loop before a chunk
    self.step_fn = jax.jit(make_online_step(experiment.model, self.direction, self.reg,
                                            grad_accum_steps=int(self.config.grad_accum_steps), privacy=self.dp_sgd),
                           donate_argnums=0, out_shardings=(state_shardings, sharding_lib.replicated(experiment.mesh)))
    dpo = self.config.dpo
    self.preference_step_fn = jax.jit(
        make_online_preference_step(experiment.model, self.direction, beta=float(dpo.beta),
                                    label_smoothing=float(dpo.label_smoothing), kind=str(dpo.loss),
                                    grad_accum_steps=int(self.config.grad_accum_steps)),
        donate_argnums=0, out_shardings=(state_shardings, sharding_lib.replicated(experiment.mesh)))
    # Replicated output: every process reads all per-sequence losses (the gate pairs them).
    self.sequence_losses = jax.jit(make_sequence_losses(experiment.model),
                                   out_shardings=sharding_lib.replicated(experiment.mesh))
    self.preference_margins = jax.jit(make_preference_margins(experiment.model),
                                      out_shardings=sharding_lib.replicated(experiment.mesh))
    self.chunk_pairs: tuple[str, pairs_lib.PreferenceExamples] | None = None  # the preference chunk read last
    self.current_margins: np.ndarray | None = None  # the current model's, on the held-out pairs (cached)
    self.checkpointer = OnlineCheckpointer(experiment.checkpoint_dir, keep=int(self.config.keep_checkpoints))
    self.run_state = OnlineRun(experiment.config)
    self.writer = MetricWriter(workdir)
    self.last_step = 0  # the step of the latest save: metrics of chunk-level events are logged there
    self.chunk_row: dict[str, float] = {}  # evaluation and gate figures of the chunk being finished
    # Per-sequence losses of the current (served) model on each domain's held-out set: reused
    # until the current model changes or the set grows, instead of recomputed every chunk.
    self.current_losses: dict[str, np.ndarray] = {}
    # The regularizer anchor (and EWC Fisher) of the chunk in progress, read from the checkpoint resumed from:
    # {"id": chunk id, "anchor", "fisher"}, consumed by the first run_chunk (`_chunk_anchor`).
    self.resumed: dict[str, Any] | None = None

  # -- start ---------------------------------------------------------------
  def _abstract_online_state(self) -> TrainState:
    """The online TrainState's shapes and shardings (its optimizer has no learning-rate schedule)."""
    experiment = self.experiment
    boxed = state_lib.abstract_state(experiment.task.init_params, experiment.tx, self.config.seed)
    boxed_opt = jax.eval_shape(self.direction.init, boxed.params)
    opt_shardings = sharding_lib.logical_shardings(boxed_opt, experiment.mesh, experiment.rules)
    abstract_opt = checkpoint_lib.abstract_with_shardings(nn.meta.unbox(boxed_opt), opt_shardings)
    return experiment.abstract_state.replace(opt_state=abstract_opt)

  def fresh_opt_state(self, params: Any) -> Any:
    """The update direction's initial state (zero moments) for `params`, sharded like the state's."""
    opt_shardings = jax.tree.map(lambda leaf: leaf.sharding, self.abstract_state.opt_state)
    return jax.jit(self.direction.init, out_shardings=opt_shardings)(params)

  def _fresh_state(self, abstract: TrainState) -> tuple[TrainState, Any]:
    experiment = self.experiment
    params, step = checkpoint_lib.restore_params(self.config.init_from, experiment.abstract_state.params)
    logging.info("Online run starts from %s (step %d).", self.config.init_from, step)
    opt_state = self.fresh_opt_state(params)
    place = lambda value, leaf: jax.device_put(value, leaf.sharding)  # noqa: E731
    state = TrainState(step=place(np.zeros((), np.int32), abstract.step), params=params, opt_state=opt_state,
                       rng=place(jax.random.key_data(jax.random.key(self.config.seed)), abstract.rng))
    return state, jax.tree.map(lambda x: x.copy(), params)

  def start(self) -> tuple[TrainState, Any, str]:
    abstract = self.abstract_state
    restored = self.checkpointer.restore_latest(abstract, self.experiment.abstract_state.params) if (
        checkpoint_lib.has_checkpoint(self.workdir)) else None
    if restored is not None:
      self.run_state.load(restored.online, restored.arrays)
      check_privacy_matches(self.config, self.workdir, self.run_state.private)
      in_progress = self.run_state.in_progress
      self.resumed = {"id": in_progress["id"], "anchor": restored.anchor, "fisher": restored.fisher} if (
          in_progress) else None
      return restored.state, restored.current, f"resumed from checkpoint step {restored.step}"
    state, current = self._fresh_state(abstract)
    self._begin(state)
    write_run_files(self.experiment, self.tokenizer_is_new)
    self._save(state, current)  # row 0 and the seeded replay buffer survive a kill during the first chunk
    return state, current, f"started from {self.config.init_from}"

  def _begin(self, state: TrainState) -> None:
    """Row 0 of R and the pretraining domain's held-out set and replay windows."""
    run = self.run_state
    heldout = pipeline.tokenize_split(open_eval_split(self.config), self.experiment.tokenizer)
    run.heldout[self.pretrain_domain] = self._heldout_windows(heldout)
    train_tokens = pipeline.tokenize_split(open_train_split(self.config), self.experiment.tokenizer)
    seq_len = self.config.seq_len
    run.replay.add(self.pretrain_domain, pipeline.Windows(train_tokens, seq_len, seq_len, name=self.pretrain_domain))
    loss = float(np.mean(self._losses(state.params, run.heldout[self.pretrain_domain])))
    run.matrix = ContinualMatrix.start({self.pretrain_domain: loss}, [self.pretrain_domain])

  def _heldout_windows(self, tokens: np.ndarray) -> np.ndarray:
    seq_len = self.config.seq_len
    count = min((len(tokens) - 1) // seq_len, int(self.online.heldout_max_windows))
    return np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)]) if count else (
        np.zeros((0, seq_len + 1), np.int32))

  # -- evaluation ----------------------------------------------------------
  def _losses(self, params: Any, windows: np.ndarray) -> np.ndarray:
    """Per-sequence mean losses [n] of held-out windows [n, seq_len + 1]."""
    batch_size = self.config.batch_size
    out = []
    with self.experiment.steps.context():
      for start in range(0, len(windows), batch_size):
        rows = windows[start:start + batch_size]
        padded = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), axis=0)]) if (
            len(rows) < batch_size) else rows
        rows_of_process = self.experiment.process_rows
        padded = padded[rows_of_process.start:rows_of_process.stop]
        batch = {"inputs": padded[:, :-1], "targets": padded[:, 1:]}
        batch = {k: pipeline.to_global(v, self.experiment.steps.batch_sharding, batch_size) for k, v in batch.items()}
        out.append(np.asarray(self.sequence_losses(params, batch))[:len(rows)])
    return np.concatenate(out) if out else np.zeros(0, np.float32)

  # -- one chunk -----------------------------------------------------------
  def _read_chunk(self) -> stream_lib.Chunk | None:
    run = self.run_state
    while True:
      try:
        chunk = self.stream.next_chunk(run.consumed)
        if chunk is not None and chunk.preferences is not None:
          if self.dp_sgd is not None:
            raise stream_lib.ChunkError(
                f"Chunk {chunk.id!r} holds preference pairs, which a private online run does not train on (DPO has "
                "no DP-SGD step here: lm.online.privacy); train it in a run with config.privacy.enabled=False.",
                chunk_id=chunk.id, path=chunk.path)
          self._pairs_of(chunk)
        return chunk
      except stream_lib.ChunkError as error:
        moved = stream_lib.quarantine(error.path, self.workdir, str(error)) if error.path else None
        logging.warning("Chunk %s quarantined (%s): %s", error.chunk_id, moved, error)
        run.quarantined.append({"chunk": error.chunk_id, "reason": str(error), "moved_to": str(moved)})
        run.consumed.append(error.chunk_id)
        self.writer.write(self.last_step, {"online/quarantined": float(len(run.quarantined))})

  def _prepare(self, chunk: stream_lib.Chunk) -> tuple[pipeline.Windows | None, list[str], list[str], Counter]:
    kept, dropped = self.run_state.cleaner.clean(chunk.documents, add=False)
    faults.point("online/clean", len(self.run_state.consumed) + 1)  # cleaned in memory, nothing kept yet
    fraction = float(self.online.heldout_fraction)
    heldout = [doc for doc in kept if is_heldout(doc, fraction)]
    train_docs = [doc for doc in kept if not is_heldout(doc, fraction)]
    # A private run's examples are windows without overlap (a token in one example: lm.online.privacy).
    stride = self.config.seq_len if self.dp_sgd is not None else 1
    windows = windows_of(self.experiment.tokenizer, self.config.seq_len, train_docs, chunk.id, stride=stride)
    return windows, train_docs, heldout, dropped

  def _steps_for(self, windows: pipeline.Windows) -> int:
    if self.online.epochs_per_chunk > 0:
      tokens = len(windows.tokens)
      return max(1, math.ceil(self.online.epochs_per_chunk * tokens / (self.config.batch_size * self.config.seq_len)))
    return int(self.online.steps_per_chunk)

  def run_chunk(self, state: TrainState, current: Any, chunk: stream_lib.Chunk, stop: StopSignal):
    """Trains on one chunk (from its recorded step if resuming). Returns (state, current, finished)."""
    if chunk.preferences is not None:
      return self.run_preference_chunk(state, current, chunk, stop)
    run = self.run_state
    windows, train_docs, heldout_docs, dropped = self._prepare(chunk)
    if windows is None:
      logging.warning("Chunk %s has too little text after cleaning (%d documents kept); skipped.", chunk.id,
                      len(train_docs))
      self._finish_chunk_bookkeeping(chunk, train_docs, heldout_docs, dropped)
      return state, current, True
    _warn_unknown_tokens(self.experiment, chunk.id, windows)
    index = len(run.matrix.chunks) - 1 if run.matrix else 0
    replay = run.replay if self.online.replay_fraction > 0 and len(run.replay) else None
    progress = run.in_progress if run.in_progress and run.in_progress["id"] == chunk.id else {
        "id": chunk.id, "step_in_chunk": 0, "steps": self._steps_for(windows), "index": index}
    draw = None
    if self.dp_sgd is not None:
      draw = self._private_draw(chunk, progress, windows, replay)
      if draw is None:  # online.max_epsilon: the chunk stays unconsumed
        return state, current, False
    run.in_progress = progress
    if progress["step_in_chunk"] == 0:
      self._add_heldout(state, chunk.domain, heldout_docs)
    anchor, fisher = self._chunk_anchor(state, chunk, progress)
    seed = stable_seed(self.config.seed, chunk.id)
    sharding = self.experiment.steps.batch_sharding
    row_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0]))
    rows = self.experiment.process_rows
    steps = progress["steps"]
    config = self.config

    def batch_at(k: int) -> dict[str, jax.Array]:
      if draw is not None:
        local = privacy_lib.private_batch(windows, replay, draw, step=k, seed=seed)
      else:
        local = replay_lib.mixed_batch(windows, replay, batch_size=config.batch_size,
                                       replay_fraction=float(self.online.replay_fraction), step=k, seed=seed)
      # Every process builds the whole (cheap) global batch and contributes its own rows.
      return {name: pipeline.to_global(value[rows.start:rows.stop], sharding if value.ndim == 2 else row_sharding,
                                       config.batch_size) for name, value in local.items()}

    def inputs_at(k: int) -> dict[str, Any]:
      lr = chunk_learning_rate(k, steps, progress["index"], lr=float(config.optim.lr), min_lr=float(config.optim.min_lr),
                               warmup_steps=int(config.optim.warmup_steps), schedule=self.online.lr_schedule)
      out = {"lr": np.float32(lr), "anchor": anchor, "fisher": fisher}
      if draw is not None:
        out["dp_expected_rows"] = np.float32(draw.expected_rows)
      return out

    def save(loop: Loop) -> None:
      # Mid-chunk (or on a stop): with the anchor and Fisher, so a resumed chunk keeps the ones it started with.
      loop.check_finite()
      self._save(loop.state, current, anchor=anchor if self.reg.needs_anchor else None,
                 fisher=fisher if self.reg.ewc else None)

    # The chunk's end is saved after its gate (without the anchor: the next chunk takes its own).
    hooks = [_ChunkProgress(progress),
             LogHook(config.log_every, config.batch_size * config.seq_len, extra={"online/chunk": progress["index"] + 1}),
             MetricsHook(self.writer),
             CheckpointHook(int(self.online.checkpoint_every), save, at_last=False, save_on_stop=True)]
    with self.experiment.steps.context():
      loop = fit(state, self.step_fn, batch_at, first=progress["step_in_chunk"], last=steps, hooks=hooks,
                 inputs_at=inputs_at, stop=stop)
    state = loop.state
    if stop.agreed:
      return state, current, False
    self.last_step = int(state.step)
    current = self._evaluate_and_gate(state, current, chunk)
    if draw is not None:  # the chunk's steps join the run's privacy ledger, reported with its row
      run.ledger.draws.append(draw)
      self.chunk_row.update(self.privacy_metrics())
      classes = run.ledger.class_epsilons(float(self.config.privacy.delta))
      worst = max(classes, key=classes.get)
      logging.info("Chunk %s: privacy epsilon %.4g (delta %g), the most spent by %s's windows.", chunk.id,
                   classes[worst], float(self.config.privacy.delta), worst)
    # The chunk is done: its documents join the dedup index and the replay buffer.
    self._finish_chunk_bookkeeping(chunk, train_docs, heldout_docs, dropped, windows)
    self._save(state, current)
    faults.point("online/between_chunks", len(run.consumed))  # the chunk's last checkpoint written
    return state, current, True

  def _private_draw(self, chunk: stream_lib.Chunk, progress: dict[str, Any], windows: pipeline.Windows,
                    replay: replay_lib.ReplayBuffer | None) -> privacy_lib.ChunkDraw | None:
    """The chunk's Poisson draw (lm.online.privacy), kept in its progress record so a resumed chunk draws the
    same; None when it would take the run past online.max_epsilon (then the loop stops: `budget_spent`)."""
    if "privacy" in progress:
      return privacy_lib.ChunkDraw.from_json(progress["privacy"])
    config = self.config
    draw = privacy_lib.plan(chunk.id, steps=int(progress["steps"]), noise_multiplier=float(self.dp_sgd.noise_multiplier),
                            new_windows=len(windows), replay_windows=len(replay) if replay is not None else 0,
                            batch_size=int(config.batch_size),
                            replay_rows=replay_lib.replay_rows(int(config.batch_size),
                                                               float(self.online.replay_fraction), replay),
                            expected_batch_size=train_privacy.expected_batch_size(int(config.batch_size),
                                                                                  config.privacy.expected_batch_size))
    budget = float(self.online.max_epsilon)
    if budget:
      ledger = self.run_state.ledger
      delta = float(config.privacy.delta)
      before, after = ledger.epsilon(delta), ledger.epsilon(delta, ledger.draws + [draw])
      if after > budget:
        self.budget_spent = (f"chunk {chunk.id} would take epsilon from {before:.4g} to {after:.4g} (delta "
                             f"{delta:g}), past online.max_epsilon={budget:g}")
        logging.warning("Privacy budget: %s; stopping before it (it stays unconsumed).", self.budget_spent)
        return None
    progress["privacy"] = draw.to_json()
    return draw

  def privacy_metrics(self) -> dict[str, float]:
    """A private run's privacy/... figures (lm.online.privacy.Ledger.metrics); {} without DP-SGD."""
    if self.dp_sgd is None:
      return {}
    return self.run_state.ledger.metrics(float(self.config.privacy.delta), float(self.config.privacy.clip_norm))

  def _chunk_anchor(self, state: TrainState, chunk: stream_lib.Chunk, progress: dict[str, Any]) -> tuple[Any, Any]:
    """The regularizers' anchor (the parameters before the chunk) and EWC Fisher; () for those not needed.

    A chunk resumed mid-way takes both from the checkpoint (saved with every
    mid-chunk checkpoint), not from the resumed weights. A checkpoint without
    them (written with no regularizer on) anchors at the resumed weights, with
    a warning; a missing Fisher is recomputed at the saved anchor (the replay
    buffer only changes at chunk ends, so it is the chunk start's).
    """
    resumed, self.resumed = self.resumed, None
    if not self.reg.needs_anchor:
      return (), ()
    anchor = fisher = None
    if progress["step_in_chunk"] > 0 and resumed is not None and resumed["id"] == chunk.id:
      anchor, fisher = resumed["anchor"], resumed["fisher"]
      if anchor is None:
        logging.warning("Chunk %s resumes at step %d from a checkpoint without the regularizers' anchor (saved with "
                        "no regularizer on): the rest of the chunk is anchored at the resumed weights.", chunk.id,
                        progress["step_in_chunk"])
    if anchor is None:
      anchor = jax.tree.map(lambda x: x.copy(), state.params)
    if not self.reg.ewc:
      return anchor, ()
    return anchor, fisher if fisher is not None else self._fisher(anchor)

  def _add_heldout(self, state: TrainState, domain: str, heldout_docs: list[str]) -> None:
    """Adds a chunk's held-out documents to its domain's evaluation set (before training on the chunk).

    A new domain also gets its column in R: the loss before training on it
    and the initial model's loss (forward transfer compares the two).
    """
    run = self.run_state
    if not heldout_docs:
      return
    windows = self._heldout_windows(tokens_of(self.experiment.tokenizer, heldout_docs))
    if domain in run.heldout:
      room = int(self.online.heldout_max_windows) - len(run.heldout[domain])
      if room > 0:
        run.heldout[domain] = np.concatenate([run.heldout[domain], windows[:room]])
      return
    if not len(windows):
      return
    run.heldout[domain] = windows
    loss_before = float(np.mean(self._losses(state.params, windows)))
    run.matrix.add_domain(domain, self._initial_loss(windows, loss_before), loss_before)

  def _initial_loss(self, windows: np.ndarray, fallback: float) -> float:
    """The initial model's loss on a domain's held-out set (for forward transfer)."""
    if len(self.run_state.matrix.chunks) <= 1:
      return fallback  # no chunk trained yet: the current model is the initial one
    params, _ = checkpoint_lib.restore_params(self.config.init_from, self.experiment.abstract_state.params)
    return float(np.mean(self._losses(params, windows)))

  def _fisher(self, params: Any) -> Any:
    run = self.run_state
    if not len(run.replay):
      return jax.tree.map(jnp.ones_like, params)
    model = self.experiment.model

    def loss_fn(p, batch):
      logits = model.apply({"params": p}, batch["inputs"], deterministic=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"]).mean()

    batches = []
    for index in range(int(self.online.ewc_batches)):
      rows = run.replay.sample(self.config.batch_size, step=index, seed=stable_seed(self.config.seed, "fisher"))
      rows = rows[self.experiment.process_rows.start:self.experiment.process_rows.stop]
      batches.append({k: pipeline.to_global(v, self.experiment.steps.batch_sharding, self.config.batch_size)
                      for k, v in (("inputs", rows[:, :-1]), ("targets", rows[:, 1:]))})
    with self.experiment.steps.context():
      fisher = regularizers.diagonal_fisher(loss_fn, params, batches)
    return regularizers.normalize_fisher(fisher)

  def _evaluate_and_gate(self, state: TrainState, current: Any, chunk: stream_lib.Chunk):
    run = self.run_state
    domain = chunk.domain
    trains_text = chunk.preferences is None
    # Old domains: every domain known before this chunk (the chunk's own counts if trained before); a
    # preference chunk trains on no domain's text, so every domain is old.
    trained_before = any(domain in row for row in run.matrix.trained)
    old_domains = [d for d in run.matrix.domains if d != domain or trained_before or not trains_text]
    candidate, baseline = {}, {}
    per_domain = {}
    for name in run.matrix.domains:
      windows = run.heldout[name]
      candidate[name] = self._losses(state.params, windows)
      faults.point("online/eval", len(run.consumed) + 1)  # the n-th chunk's evaluation, one domain done
      cached = self.current_losses.get(name)
      if cached is None or len(cached) != len(windows):
        cached = self.current_losses[name] = self._losses(current, windows)
      baseline[name] = cached
      per_domain[name] = (baseline[name], candidate[name])
    # A domain whose held-out share was too short for one window has no column (yet).
    trained = [domain] if domain in run.matrix.domains and trains_text else []
    run.matrix.add_row(chunk.id, trained, {name: float(np.mean(v)) for name, v in candidate.items()})
    gate = self.online.gate
    decision = ab.gate(per_domain, old_domains=old_domains, max_regression=float(gate.max_regression),
                       confidence=float(gate.confidence), num_samples=int(gate.bootstrap_samples),
                       seed=stable_seed(self.config.seed, chunk.id, "gate"))
    promote, reasons = decision.promote, list(decision.reasons)
    preference = self._preference_gate(state.params, current)
    if preference is not None and not preference["passed"]:
      promote = False
      reasons.append(preference["reason"])
    record = {"chunk": chunk.id, "step": int(state.step), "promoted": promote, "reasons": reasons,
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "comparisons": decision.to_json().get("comparisons")}
    if preference is not None:
      record["preferences"] = {key: value for key, value in preference.items() if key != "margins"}
    run.gate_history.append(record)
    if promote:
      current = jax.tree.map(lambda x: x.copy(), state.params)
      self.current_losses = dict(candidate)  # the candidate's losses are now the current model's
      self.current_margins = None if preference is None else preference["margins"]
      logging.info("Chunk %s: promoted the new weights to current.", chunk.id)
    else:
      logging.warning("Chunk %s: kept the previous current model: %s", chunk.id, "; ".join(reasons))
    metrics = run.matrix.metrics()
    row = {f"online/{name}/loss": float(np.mean(v)) for name, v in candidate.items()}
    if preference is not None:
      row["online/preference_accuracy"] = preference["candidate_accuracy"]
      row["gate/preference_accuracy_current"] = preference["current_accuracy"]
    row.update({f"continual/{key}": float(metrics[key]) for key in ("avg_loss", "forgetting", "bwt", "fwt")
                if metrics.get(key) is not None})
    row["gate/promoted"] = float(promote)
    self.chunk_row = row
    if jax.process_index() == 0:
      run.matrix.write(self.workdir)
      run.matrix.heatmap(os.path.join(self.workdir, HEATMAP_FILE))
    return current

  # -- preference chunks ---------------------------------------------------------------------------
  def _pairs_of(self, chunk: stream_lib.Chunk) -> pairs_lib.PreferenceExamples:
    """The chunk's pairs encoded for this model (cached for the chunk read last); ChunkError if one cannot be
    (a prompt that leaves no room in the context), so the chunk is quarantined like an unreadable one."""
    if self.chunk_pairs is None or self.chunk_pairs[0] != chunk.id:
      try:
        examples = pairs_lib.PreferenceExamples(chunk.preferences, self.experiment.tokenizer, self.config.seq_len,
                                                sentences=False, name=chunk.id)
      except DataError as error:
        raise stream_lib.ChunkError(f"Chunk {chunk.id!r} cannot be trained on: {error}", chunk_id=chunk.id,
                                    path=chunk.path) from None
      self.chunk_pairs = (chunk.id, examples)
    return self.chunk_pairs[1]

  def _split_pairs(self, chunk: stream_lib.Chunk) -> tuple[np.ndarray, np.ndarray]:
    """(training pair indices, held-out pair indices) of a preference chunk, by a hash of each record."""
    fraction = float(self.online.heldout_fraction)
    held = np.asarray([is_heldout(json.dumps(record, sort_keys=True), fraction) for record, _ in chunk.preferences])
    return np.flatnonzero(~held), np.flatnonzero(held)

  def run_preference_chunk(self, state: TrainState, current: Any, chunk: stream_lib.Chunk, stop: StopSignal):
    """DPO steps on a preference chunk against the current model, with replayed text; then the gate."""
    run = self.run_state
    examples = self._pairs_of(chunk)
    train, heldout = self._split_pairs(chunk)
    pair_rows = lambda indices: {key: np.stack([examples[int(i)][key] for i in indices])  # noqa: E731
                                 for key in pairs_lib.PREFERENCE_BATCH_RANKS if key != "index"}
    config = self.config
    replay = run.replay if self.online.replay_fraction > 0 and len(run.replay) else None
    per_batch = config.batch_size - replay_lib.replay_rows(config.batch_size, float(self.online.replay_fraction),
                                                           replay)
    steps = (max(1, math.ceil(self.online.epochs_per_chunk * len(train) / per_batch))
             if self.online.epochs_per_chunk > 0 else int(self.online.steps_per_chunk))
    index = len(run.matrix.chunks) - 1 if run.matrix else 0
    progress = run.in_progress if run.in_progress and run.in_progress["id"] == chunk.id else {
        "id": chunk.id, "step_in_chunk": 0, "steps": steps, "index": index}
    run.in_progress = progress
    if progress["step_in_chunk"] == 0:
      if len(heldout):
        run.add_preference_heldout(pair_rows(heldout), int(self.online.heldout_max_windows))
        self.current_margins = None  # the held-out set grew
      # Fresh AdamW moments: the previous chunk's (another objective's gradients, or the opposite preference)
      # would carry its first steps along (b1=0.9 remembers ~10 steps). A resumed chunk keeps its saved ones.
      state = state.replace(opt_state=self.fresh_opt_state(state.params))
    if not len(train):
      logging.warning("Chunk %s has %d preference pairs, all held out: nothing to train on.", chunk.id,
                      len(chunk.preferences))
      self._finish_chunk_bookkeeping(chunk, [], [], Counter())
      return state, current, True
    self.resumed = None  # preference steps take no regularizer anchor
    seed = stable_seed(config.seed, chunk.id)
    sharding = self.experiment.steps.batch_sharding
    row_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0]))
    rows = self.experiment.process_rows
    seq_len = config.seq_len

    def batch_at(k: int) -> dict[str, jax.Array]:
      order, replayed = replay_lib.mixed_rows(len(train), replay, batch_size=config.batch_size,
                                              replay_fraction=float(self.online.replay_fraction), step=k, seed=seed,
                                              window=seq_len + 1)
      local = pair_rows(train[order])
      if len(replayed):  # a replayed window is a pair's chosen side, its whole window scored; no rejected side
        text = {"chosen_inputs": replayed[:, :-1], "chosen_targets": replayed[:, 1:],
                "chosen_mask": np.ones((len(replayed), seq_len), np.int32)}
        local = {key: np.concatenate([value, text.get(key, np.zeros((len(replayed), seq_len), np.int32))])
                 for key, value in local.items()}
      local["is_replay"] = np.arange(config.batch_size) >= len(order)
      return {name: pipeline.to_global(value[rows.start:rows.stop], row_sharding if name == "is_replay" else sharding,
                                       config.batch_size) for name, value in local.items()}

    def inputs_at(k: int) -> dict[str, Any]:
      lr = chunk_learning_rate(k, progress["steps"], progress["index"], lr=float(config.optim.lr),
                               min_lr=float(config.optim.min_lr), warmup_steps=int(config.optim.warmup_steps),
                               schedule=self.online.lr_schedule)
      return {"lr": np.float32(lr), "reference": current}

    def save(loop: Loop) -> None:
      loop.check_finite()
      self._save(loop.state, current)

    hooks = [_ChunkProgress(progress),
             LogHook(config.log_every, config.batch_size * seq_len, extra={"online/chunk": progress["index"] + 1}),
             MetricsHook(self.writer),
             CheckpointHook(int(self.online.checkpoint_every), save, at_last=False, save_on_stop=True)]
    with self.experiment.steps.context():
      loop = fit(state, self.preference_step_fn, batch_at, first=progress["step_in_chunk"], last=progress["steps"],
                 hooks=hooks, inputs_at=inputs_at, stop=stop)
    state = loop.state
    if stop.agreed:
      return state, current, False
    self.last_step = int(state.step)
    current = self._evaluate_and_gate(state, current, chunk)
    self._finish_chunk_bookkeeping(chunk, [], [], Counter())
    self._save(state, current)
    faults.point("online/between_chunks", len(run.consumed))
    return state, current, True

  def _margins(self, params: Any) -> np.ndarray:
    """log p(chosen) - log p(rejected) [n] of every held-out preference pair under `params`."""
    held = self.run_state.preference_heldout
    batch_size, count = self.config.batch_size, self.run_state.preference_pairs
    rows_of_process = self.experiment.process_rows
    out = []
    with self.experiment.steps.context():
      for start in range(0, count, batch_size):
        batch = {}
        for key, value in held.items():
          rows = value[start:start + batch_size]
          rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), axis=0)]) if (
              len(rows) < batch_size) else rows
          batch[key] = pipeline.to_global(rows[rows_of_process.start:rows_of_process.stop],
                                          self.experiment.steps.batch_sharding, batch_size)
        out.append(np.asarray(self.preference_margins(params, batch))[:min(batch_size, count - start)])
    return np.concatenate(out) if out else np.zeros(0, np.float32)

  def _preference_gate(self, candidate: Any, current: Any) -> dict[str, Any] | None:
    """The held-out preference accuracy of the candidate and the current model; None without held-out pairs."""
    if not self.run_state.preference_pairs:
      return None
    margins = self._margins(candidate)
    if self.current_margins is None or len(self.current_margins) != len(margins):
      self.current_margins = self._margins(current)
    decision = ab.preference_gate(margins, self.current_margins,
                                  max_drop=float(self.online.gate.max_preference_drop))
    return {**decision, "margins": margins}

  def _finish_chunk_bookkeeping(self, chunk, train_docs, heldout_docs, dropped, windows=None) -> None:
    run = self.run_state
    for document in train_docs + heldout_docs:
      run.cleaner.index.add(document)
    run.clean_counts.update(dropped)
    if windows is not None:
      seq_len = self.config.seq_len
      starts = range(0, len(windows.tokens) - seq_len - 1, seq_len)
      if len(starts):
        run.replay.add(chunk.domain, np.stack([windows.tokens[s:s + seq_len + 1] for s in starts]))
    run.consumed.append(chunk.id)
    run.in_progress = None
    row = self.chunk_row
    row.update({f"clean/dropped_{reason}": float(dropped.get(reason, 0)) for reason in clean_lib.REASONS})
    row["clean/kept"] = float(len(train_docs) + len(heldout_docs))
    self.writer.write(self.last_step, row)
    self.chunk_row = {}

  def _save(self, state: TrainState, current: Any, *, anchor: Any = None, fisher: Any = None) -> None:
    """Checkpoints everything; anchor / fisher: the chunk in progress's (mid-chunk saves with regularizers only)."""
    self.last_step = int(state.step)
    self.checkpointer.save(int(state.step), state, current, self.run_state.to_json(), self.run_state.arrays(),
                           self.experiment.metadata(), anchor=anchor, fisher=fisher)

  # -- the loop ------------------------------------------------------------
  def run(self) -> OnlineResult:
    """Runs chunks until the stream ends or a signal; holds the workdir lock (lm.app.lock) meanwhile."""
    with run_lock(self.workdir, "online"):
      return self._run()

  def _run(self) -> OnlineResult:
    state, current, how = self.start()
    self.last_step = int(state.step)
    logging.info("Online: %s; stream %s.", how, self.stream.describe())
    stop = StopSignal()
    chunks_done = 0
    idle_since = time.monotonic()
    max_chunks = int(self.online.max_chunks)
    try:
      with stop.installed():
        # Every process must take the same turn here, so the stop is agreed (StopSignal.agree_now).
        while not stop.agree_now() and (not max_chunks or chunks_done < max_chunks):
          chunk = self._read_chunk()
          if chunk is None:
            if self.stream.exhausted(self.run_state.consumed):
              logging.info("The stream has no more chunks.")
              break
            if self.online.idle_timeout and time.monotonic() - idle_since > self.online.idle_timeout:
              logging.info("No new chunk for %.0f s (online.idle_timeout): stopping.", self.online.idle_timeout)
              break
            time.sleep(float(self.online.poll_interval))
            continue
          logging.info("Chunk %s (%s): %d documents.", chunk.id, chunk.domain, len(chunk.documents))
          state, current, finished = self.run_chunk(state, current, chunk, stop)
          if self.budget_spent:
            break
          if finished:
            chunks_done += 1
            idle_since = time.monotonic()
    finally:
      self.checkpointer.close()
      self.writer.close()
    metrics = self.run_state.matrix.metrics() if self.run_state.matrix else {}
    return OnlineResult(chunks_done, int(state.step), stop.agreed, metrics, self.workdir,
                        self.privacy_metrics() or None, self.budget_spent)


class _ChunkProgress(Hook):
  """Keeps the chunk's recorded step (saved in every checkpoint) at the loop's."""

  def __init__(self, progress: dict[str, Any]):
    self.progress = progress

  def after_step(self, loop: Loop) -> None:
    self.progress["step_in_chunk"] = loop.step


def _domain_of(source: str) -> str:
  kind, name, _ = sources.parse_source(source)
  if kind == "tfds":
    return name.split("/")[0]
  return os.path.splitext(os.path.basename(os.path.normpath(name)))[0]


def run_online(config: ml_collections.ConfigDict, workdir: str, stream: stream_lib.Stream | None = None) -> OnlineResult:
  """Runs the online loop in `workdir` (resuming it if it holds checkpoints); see the module docstring."""
  py_logging.getLogger("lm.online").setLevel(py_logging.INFO)
  with run_lock(workdir, "online"):  # before the loop's constructor opens metrics.jsonl (run() re-enters it)
    return OnlineLoop(config, workdir, stream).run()


def run(config: ml_collections.ConfigDict, workdir: str, report: Any = print) -> int:
  """The CLI's --mode online: prints chunks done, the step and the continual metrics; 130 after SIGINT."""
  outcome = run_online(config, workdir)
  summary = {"chunks": outcome.chunks_done, "step": outcome.step, **{
      key: outcome.continual.get(key) for key in ("avg_loss", "forgetting", "bwt", "fwt")}}
  if outcome.privacy is not None:
    summary.update({key: outcome.privacy[key] for key in ("privacy/epsilon", "privacy/delta", "privacy/steps")})
  if outcome.stopped:
    summary["stopped"] = outcome.stopped
  report(json.dumps(summary))
  return 0 if outcome.interrupted in (None, "SIGTERM") else 128 + 2
