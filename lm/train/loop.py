"""`fit`: the one training loop, with hooks for what happens between steps.

    loop.state, metrics = train_step(state, batch_at(step)[, inputs_at(step)])
    (the previous step's metrics are checked for NaN/Inf while this one runs)
    for hook in hooks: hook.after_step(loop)      log, evaluate, write, checkpoint, progress
    a stop signal (SIGTERM/SIGINT), agreed by every process, ends the loop after the hooks: hook.on_stop(loop)

The loop knows no task and no mode: `--mode train` (`lm.app.train`) runs it
over the whole run with `LogHook`, `EvalHook`, `MetricsHook`,
`CheckpointHook` and `ProgressHook`; the online loop (`lm.app.online`) runs
it once per chunk with its own checkpoint hook. It guards itself: a NaN/Inf
`train/loss` or `train/grad_norm` raises `NonFiniteError` before a hook can
checkpoint the bad state (hooks call `loop.check_finite()` before saving).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm.core import faults
from lm.core.errors import NonFiniteError
from lm.train.state import TrainState

Metrics = Mapping[str, Any]


_SIGNALS = ("SIGINT", "SIGTERM")  # what a StopSignal catches; its code in an agreement is the signal's number


class StopSignal:
  """Turns SIGTERM/SIGINT into a stop that every process of the run agrees on, at a step boundary.

  `received` is the signal this process got; `agreed` the one the run stops
  for. One process: the same, at the step during which it came. Several
  processes (`jax.process_count() > 1`): a signal reaches each at its own
  moment (a preemption notice, `scancel`, Ctrl-C), so each step every process
  contributes its signal to a tiny all-reduce (the max of one int32 per
  device), started after the step and read one step later, after that step's
  work has been dispatched: every process sees the same result after the same
  step, stops there, and saves the same step. (Checking one's own flag instead
  lets one process enter the checkpoint's barrier while another enters the
  next step's collectives: a hang, not a save.)
  """

  def __init__(self):
    self.received: str | None = None
    self.agreed: str | None = None
    self._agreement: _Agreement | None = None
    self._in_flight: jax.Array | None = None

  @contextlib.contextmanager
  def installed(self) -> Iterator[StopSignal]:
    if threading.current_thread() is not threading.main_thread():
      yield self  # signal handlers can only be set from the main thread (e.g. some notebook kernels)
      return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):  # pylint: disable=unused-argument
      name = signal.Signals(signum).name
      if self.received is None or _SIGNALS.index(name) > _SIGNALS.index(self.received):
        self.received = name  # SIGTERM (save and exit 0) outranks SIGINT

    for sig in previous:
      signal.signal(sig, handler)
    try:
      yield self
    finally:
      for sig, old in previous.items():
        signal.signal(sig, old)

  def _code(self) -> int:
    return int(getattr(signal, self.received)) if self.received else 0

  def _decide(self, code: int) -> str | None:
    if code and self.agreed is None:
      self.agreed = signal.Signals(code).name
    return self.agreed

  def after_step(self) -> str | None:
    """At a step boundary: the signal every process stops for now, or None (module doc). Every process
    must call it after the same steps."""
    if jax.process_count() == 1:
      return self._decide(self._code())
    self._agreement = self._agreement or _Agreement()
    previous, self._in_flight = self._in_flight, self._agreement.start(self._code())
    return self._decide(int(previous)) if previous is not None else self.agreed

  def agree_now(self) -> str | None:
    """The agreed signal, synchronously (between loops, e.g. between an online run's chunks)."""
    if jax.process_count() == 1:
      return self._decide(self._code())
    self._agreement = self._agreement or _Agreement()
    previous, self._in_flight = self._in_flight, None
    codes = [int(previous)] if previous is not None else []
    codes.append(int(self._agreement.start(self._code())))
    return self._decide(max(codes))


class _Agreement:
  """The max over every process of one int32, as one small jitted all-reduce over all devices."""

  def __init__(self):
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("all",))
    self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("all"))
    self.shape = (len(devices),)
    self.reduce = jax.jit(jnp.max, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def start(self, code: int) -> jax.Array:
    value = np.array([code], np.int32)
    shards = [jax.device_put(value, device) for device in self.sharding.addressable_devices]
    return self.reduce(jax.make_array_from_single_device_arrays(self.shape, self.sharding, shards))


def check_finite(step: int, metrics: Metrics) -> None:
  """Raises NonFiniteError if the step's train/loss or train/grad_norm is NaN/Inf."""
  for name in ("train/loss", "train/grad_norm"):
    value = float(metrics[name])
    if not math.isfinite(value):
      raise NonFiniteError(
          f"{name} is {value} at step {step}. The run stopped without saving this state; the last good "
          "checkpoint is intact. Lower optim.lr, check the data, or raise optim.warmup_steps, then resume.")


@dataclasses.dataclass
class Loop:
  """What hooks see after a step: the counter, the state, the step's metrics and the row being logged."""

  step: int  # steps done, in the caller's counting (the run's step, or the step within an online chunk)
  last: int  # the loop ends when step reaches it
  state: TrainState
  stop: StopSignal
  global_step: int = 0  # the train state's step (the x-axis of metrics.jsonl)
  metrics: Metrics | None = None  # this step's, device arrays
  row: dict[str, float] = dataclasses.field(default_factory=dict)  # this step's figures (MetricsHook writes them)
  selection: float | None = None  # this step's selection figure (lower is better), set by an EvalHook
  saved: bool = False  # whether a hook checkpointed this step
  last_train_loss: float | None = None
  last_eval_loss: float | None = None
  _pending: tuple[int, Metrics] | None = None  # metrics not yet checked for NaN/Inf
  _timer_start: float = dataclasses.field(default_factory=time.perf_counter)
  _timer_steps: int = 0

  def every(self, interval: int) -> bool:
    """True every `interval` steps and at the loop's last step (interval 0: only at the last)."""
    return (interval > 0 and self.step % interval == 0) or self.step == self.last

  def check_finite(self) -> None:
    """Checks the metrics not checked yet (blocks on them); NonFiniteError if they are NaN/Inf."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      check_finite(*pending)

  def seconds_per_step(self) -> float:
    """Mean wall time per step since the timer was last restarted."""
    return (time.perf_counter() - self._timer_start) / max(self._timer_steps, 1)

  def restart_timer(self) -> None:
    """Starts timing afresh (after logging, and after an evaluation, so its time is not a step's)."""
    self._timer_start, self._timer_steps = time.perf_counter(), 0


class Hook:
  """Something done between steps. Every method is optional."""

  def after_step(self, loop: Loop) -> None:
    """After every step, in the order the hooks were given."""

  def on_stop(self, loop: Loop) -> None:
    """After the hooks of the step during which a stop signal arrived; the loop then ends."""

  def close(self, loop: Loop) -> None:
    """When the loop ends, however it ends (errors included)."""


def fit(state: TrainState, train_step: Callable[..., tuple[TrainState, Metrics]], batch_at: Callable[[int], Any], *,
        first: int, last: int, hooks: Sequence[Hook] = (), inputs_at: Callable[[int], Any] | None = None,
        stop: StopSignal | None = None) -> Loop:
  """Runs steps first+1 .. last of `train_step` (module doc); returns the loop as it ended.

  batch_at(step) / inputs_at(step): the batch and the extra inputs of the
  step that follows `step` steps. stop: a StopSignal whose handlers the
  caller installed (one that spans several loops); by default the loop
  installs its own. A loop stopped by a signal has `loop.stop.agreed` set (the
  same step on every process: StopSignal).
  """
  own_stop = stop is None
  stop = stop or StopSignal()
  loop = Loop(step=first, last=last, state=state, stop=stop, global_step=int(state.step))
  try:
    with stop.installed() if own_stop else contextlib.nullcontext():
      while loop.step < last:
        batch = batch_at(loop.step)
        args = (loop.state, batch) if inputs_at is None else (loop.state, batch, inputs_at(loop.step))
        loop.state, metrics = train_step(*args)
        faults.point("train/step", loop.global_step + 1)  # dispatched, not yet computed
        # Checking the previous step's metrics only now keeps one step in flight on the device
        # instead of synchronizing on every step.
        loop.check_finite()
        loop.step += 1
        loop.global_step += 1
        loop.metrics, loop._pending = metrics, (loop.global_step, metrics)
        loop._timer_steps += 1
        loop.row, loop.selection, loop.saved = {}, None, False
        for hook in hooks:
          hook.after_step(loop)
        if stop.after_step():
          for hook in hooks:
            hook.on_stop(loop)
          return loop
      loop.check_finite()
  finally:
    for hook in hooks:
      hook.close(loop)
  return loop


# -- the usual hooks -------------------------------------------------------------------------------------
class LogHook(Hook):
  """Every `every` steps: the step's train metrics and its speed into the row (checked for NaN/Inf first).

  perf/step_time_ms and perf/tokens_per_sec over the steps since the last
  log; perf/mfu when `flops_per_step` and `peak_flops` are given (the LM's FLOP
  count); `extra` figures go into every logged row.
  """

  def __init__(self, every: int, tokens_per_step: int, *, flops_per_step: float | None = None,
               peak_flops: float | None = None, extra: Mapping[str, float] | None = None,
               on_log: Callable[[Loop], None] | None = None):
    self.every, self.tokens_per_step = every, tokens_per_step
    self.flops_per_step, self.peak_flops, self.extra, self.on_log = flops_per_step, peak_flops, extra or {}, on_log

  def after_step(self, loop: Loop) -> None:
    if not loop.every(self.every):
      return
    loop.check_finite()
    step_time = loop.seconds_per_step()
    loop.row.update({name: float(value) for name, value in loop.metrics.items()})
    loop.row["perf/step_time_ms"] = 1e3 * step_time
    loop.row["perf/tokens_per_sec"] = self.tokens_per_step / step_time
    if self.flops_per_step and self.peak_flops:
      loop.row["perf/mfu"] = self.flops_per_step / step_time / self.peak_flops
    loop.row.update(self.extra)
    loop.last_train_loss = loop.row["train/loss"]
    if self.on_log is not None:
      self.on_log(loop)
    loop.restart_timer()


class EvalHook(Hook):
  """Every `every` steps: `evaluate(params)`'s metrics into the row, and the selection figure they give."""

  def __init__(self, every: int, evaluate: Callable[[Any], dict[str, float]],
               selection: Callable[[Mapping[str, float]], float],
               extra: Callable[[int], dict[str, float]] | None = None):
    """extra(step): more figures for the row at each eval that depend on the step, not the params (a
    DP-SGD run's privacy/epsilon)."""
    self.every, self.evaluate, self.selection, self.extra = every, evaluate, selection, extra

  def after_step(self, loop: Loop) -> None:
    if not loop.every(self.every):
      return
    metrics = self.evaluate(loop.state.params)
    if self.extra is not None:
      metrics = {**metrics, **self.extra(loop.global_step)}
    loop.row.update(metrics)
    loop.selection = self.selection(metrics)
    loop.last_eval_loss = metrics.get("eval/loss")
    loop.restart_timer()  # keep eval time out of the step-time figure


class MetricsHook(Hook):
  """Writes the step's row (if any) to metrics.jsonl / TensorBoard (`lm.train.metrics.MetricWriter`)."""

  def __init__(self, writer: Any):
    self.writer = writer

  def after_step(self, loop: Loop) -> None:
    if loop.row:
      self.writer.write(loop.global_step, loop.row)


class CheckpointHook(Hook):
  """`save(loop)` every `every` steps (0: never between) and at the last step (unless `at_last` is False);
  on a stop signal too, unless `save_on_stop` is False.

  `save` should call `loop.check_finite()` first, so a NaN/Inf state is never saved.
  """

  def __init__(self, every: int, save: Callable[[Loop], None], *, at_last: bool = True, save_on_stop: bool = True):
    self.every, self.save, self.at_last, self.save_on_stop = every, save, at_last, save_on_stop

  def after_step(self, loop: Loop) -> None:
    due = self.every > 0 and loop.step % self.every == 0
    if loop.step == loop.last:
      due = self.at_last
    if due:
      self.save(loop)
      loop.saved = True

  def on_stop(self, loop: Loop) -> None:
    if self.save_on_stop and not loop.saved:
      self.save(loop)
      loop.saved = True


class ProgressHook(Hook):
  """A text progress bar (tqdm: terminals, logs and notebooks alike) on process 0, with the last loss."""

  def __init__(self, first: int, last: int, description: str = "train"):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self.bar = tqdm(total=last, initial=first, desc=description, unit="step", disable=jax.process_index() != 0,
                    dynamic_ncols=True, mininterval=1.0)

  def after_step(self, loop: Loop) -> None:
    if "perf/tokens_per_sec" in loop.row:
      self.bar.set_postfix(loss=f"{loop.row['train/loss']:.4f}", tok_s=f"{loop.row['perf/tokens_per_sec']:,.0f}")
    self.bar.update(1)

  def close(self, loop: Loop) -> None:
    self.bar.close()
