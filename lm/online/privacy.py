"""DP-SGD in the online loop: each chunk's Poisson draws, and the privacy ledger composed across chunks.

A private online run (`config.privacy.enabled` with `--mode online`; docs/privacy.md) trains every text chunk
with the engine's DP-SGD step (per-example clipping, Gaussian noise once per batch) on batches drawn as its
accountant describes:

* an example is one window of `seq_len + 1` tokens of a chunk's training documents, the windows cut without
  overlap (stride `seq_len`), so a token is in one example; the replay buffer stores these same windows;
* a batch of B = `config.batch_size` rows has B_r = round(B * online.replay_fraction) replay rows and
  B - B_r new rows. Each new window of the chunk (N_new of them) joins the batch independently with
  q_new = min(1, b_new / N_new) and each window stored in the replay buffer (N_r, all domains together)
  with q_r = min(1, b_r / N_r), where b = `privacy.expected_batch_size` (default B - 4 sqrt(B)) is split
  as the rows are (b_new = b (B - B_r) / B, b_r = b B_r / B). Each source is truncated to its own rows (a
  uniform subset when more are drawn) and padded, the padding marked `dp_real` = 0. The noisy sum is
  divided by the expected rows q_new N_new + q_r N_r, a constant of the chunk (`ChunkDraw.expected_rows`);
* so, for one example, each step of a chunk is `TruncatedSubsampledGaussian(N, q, rows, sigma)` of the source
  it is in (dp_accounting; add/remove neighbours), or nothing.

Which steps an example can be drawn in depends on where it came from, and each origin is a class of
examples with one schedule (individual accounting with public schedules):

* the windows of chunk i: chunk i's steps as new data, then every later chunk's steps as replay;
* the pretraining data seeded into the buffer at the start: every chunk's steps as replay.

The run's epsilon is the largest over these classes, each class composed by dp_accounting's PLD (`Ledger`).
A window the reservoir evicts is counted as if it stayed: an upper bound. Every rate is computed from counts
of windows (chunk and buffer sizes), treated as public, as in the train mode's accounting.

Not covered by the guarantee, by design: the held-out share of each chunk (evaluation and the promotion gate
read it; it is never trained on), and the model the run starts from (`online.init_from`, trained and
accounted, or not, by its own run). EWC is refused (its Fisher reads replayed data without noise), and so are
preference chunks (DPO's loss is per pair and has no private step here): they are quarantined.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import numpy as np

from lm.data import pipeline
from lm.online import replay as replay_lib
from lm.train import privacy as privacy_lib

# The Poisson draws of a private online batch: a stream apart from the replay buffer's others.
_POISSON_STREAM = 0xD9D9


@dataclasses.dataclass(frozen=True)
class ChunkDraw:
  """How one chunk's private steps draw their batches: what the ledger composes for it."""

  chunk: str
  steps: int
  noise_multiplier: float
  new_windows: int  # N_new: the chunk's training windows
  new_rows: int  # B - B_r: rows of a batch for them (drawn rows beyond it are truncated)
  new_rate: float  # q_new
  replay_windows: int  # N_r: windows in the replay buffer during the chunk (0: no replay)
  replay_rows: int
  replay_rate: float

  @property
  def expected_rows(self) -> float:
    """The expected number of examples in a batch: the divisor of the noisy gradient sum."""
    return self.new_rate * self.new_windows + self.replay_rate * self.replay_windows

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> ChunkDraw:
    return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls)})


def plan(chunk: str, *, steps: int, noise_multiplier: float, new_windows: int, replay_windows: int,
         batch_size: int, replay_rows: int, expected_batch_size: float) -> ChunkDraw:
  """The chunk's draw (module doc): rows and rates of its new and replayed windows."""
  if new_windows < 1:
    raise ValueError(f"chunk {chunk!r} has no training windows to draw from")
  if not 0 < expected_batch_size <= batch_size:
    raise ValueError(f"the expected batch {expected_batch_size:g} must be in (0, {batch_size}], the batch size")
  replay_rows = int(replay_rows) if replay_windows else 0
  new_rows = int(batch_size) - replay_rows
  new_rate = min(1.0, expected_batch_size * new_rows / batch_size / new_windows)
  replay_rate = min(1.0, expected_batch_size * replay_rows / batch_size / replay_windows) if replay_rows else 0.0
  return ChunkDraw(str(chunk), int(steps), float(noise_multiplier), int(new_windows), new_rows, float(new_rate),
                   int(replay_windows), replay_rows, float(replay_rate))


def private_batch(new_windows: Any, replay: Any, draw: ChunkDraw, *, step: int, seed: int) -> dict[str, np.ndarray]:
  """Batch `step` of a private chunk: {'inputs', 'targets' [B, seq_len], 'is_replay', 'dp_real' [B]}.

  Rows [0, draw.new_rows) hold the drawn new windows, then padding; rows [new_rows, B) the drawn replayed
  windows, then padding. A pure function of (seed, step, the windows, the buffer's content), the same in
  every process. new_windows: `lm.data.pipeline.Windows` or an array [n, seq_len + 1]; replay: a
  `lm.online.replay.ReplayBuffer` (its windows of every domain, as one set) or None.
  """
  rng = np.random.default_rng([_POISSON_STREAM, int(seed), int(step)])
  window = len(np.asarray(new_windows[0]))
  batch = np.zeros((draw.new_rows + draw.replay_rows, window), np.int32)
  real = np.zeros(len(batch), np.int32)
  new = np.sort(pipeline.poisson_rows(len(new_windows), draw.new_rate, draw.new_rows, rng))
  batch[:len(new)] = replay_lib.gather(new_windows, new, window)
  real[:len(new)] = 1
  if draw.replay_rows:
    if len(replay) != draw.replay_windows:
      raise ValueError(f"the replay buffer holds {len(replay)} windows, the chunk's draw was planned for "
                       f"{draw.replay_windows}: keep the buffer fixed while training on a chunk")
    drawn = np.sort(pipeline.poisson_rows(len(replay), draw.replay_rate, draw.replay_rows, rng))
    batch[draw.new_rows:draw.new_rows + len(drawn)] = replay.take(drawn)
    real[draw.new_rows:draw.new_rows + len(drawn)] = 1
  return {"inputs": batch[:, :-1], "targets": batch[:, 1:], "is_replay": np.arange(len(batch)) >= draw.new_rows,
          "dp_real": real}


# -- the ledger -------------------------------------------------------------------------------------------
# Each chunk's two distributions, built once per process (the ledger composes them again after every chunk).
_pld = functools.lru_cache(maxsize=256)(privacy_lib.truncated_poisson_pld)


def _new_pld(draw: ChunkDraw) -> Any:
  return _pld(draw.new_windows, draw.new_rate, draw.new_rows, draw.noise_multiplier, draw.steps)


def _replay_pld(draw: ChunkDraw) -> Any:
  return _pld(draw.replay_windows, draw.replay_rate, draw.replay_rows, draw.noise_multiplier, draw.steps)


@dataclasses.dataclass
class Ledger:
  """Every private chunk's draw, in order: the run's epsilon (module doc), saved with the online checkpoint."""

  draws: list[ChunkDraw] = dataclasses.field(default_factory=list)
  # class_epsilons by (draws, delta): the budget's check before a chunk and the metrics after it ask for the same.
  _epsilons: dict[tuple, dict[str, float]] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

  @property
  def steps(self) -> int:
    return sum(draw.steps for draw in self.draws)

  def epsilon(self, delta: float, draws: Sequence[ChunkDraw] | None = None) -> float:
    """The largest epsilon at `delta` over the classes of examples (the pretraining windows, each chunk's)."""
    return max(self.class_epsilons(delta, draws).values(), default=0.0)

  def class_epsilons(self, delta: float, draws: Sequence[ChunkDraw] | None = None) -> dict[str, float]:
    """Each class's epsilon at `delta`: "pretraining" (the windows seeded into the replay buffer) and each
    chunk's windows, by chunk id; {} before any chunk. `draws`: these instead of the ledger's."""
    draws = tuple(self.draws if draws is None else draws)
    if not draws:
      return {}
    key = (draws, float(delta))
    if key not in self._epsilons:
      if any(draw.noise_multiplier <= 0 for draw in draws):
        return {name: math.inf for name in ["pretraining"] + [draw.chunk for draw in draws]}
      # suffix[j]: the replay steps of chunks j, j + 1, ... composed (what an example stored before chunk j meets).
      suffix = [_pld(0, 0.0, 0, 1.0, 0)] * (len(draws) + 1)
      for j in range(len(draws) - 1, -1, -1):
        suffix[j] = _replay_pld(draws[j]).compose(suffix[j + 1])
      classes = {"pretraining": suffix[0], **{draw.chunk: _new_pld(draw).compose(suffix[i + 1])
                                              for i, draw in enumerate(draws)}}
      self._epsilons[key] = {name: float(pld.get_epsilon_for_delta(delta)) for name, pld in classes.items()}
    return dict(self._epsilons[key])

  def metrics(self, delta: float, clip_norm: float) -> dict[str, float]:
    """privacy/... as a run's metrics.jsonl reports them (lm.train.privacy.Accounting.metrics' names)."""
    last = self.draws[-1] if self.draws else None
    out = {"privacy/epsilon": self.epsilon(delta), "privacy/delta": float(delta), "privacy/clip_norm": clip_norm,
           "privacy/steps": float(self.steps), "privacy/chunks": float(len(self.draws))}
    if last is not None:
      out.update({"privacy/noise_multiplier": last.noise_multiplier, "privacy/sampling_rate": last.new_rate,
                  "privacy/replay_sampling_rate": last.replay_rate, "privacy/expected_batch_size": last.expected_rows})
    return out

  def to_json(self) -> list[dict[str, Any]]:
    return [draw.to_json() for draw in self.draws]

  @classmethod
  def from_json(cls, data: list[dict[str, Any]] | None) -> Ledger:
    return cls([ChunkDraw.from_json(item) for item in data or ()])

