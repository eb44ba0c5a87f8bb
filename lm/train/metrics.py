"""Metric outputs of a run: `metrics.jsonl` and TensorBoard events (process 0 only)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np

from lm.core import files
from lm.core.errors import DiskFullError


class MetricWriter:
  """Appends `{"step": s, name: value, ...}` lines to `<workdir>/metrics.jsonl`.

  Read back with `pandas.read_json(path, lines=True)`. A resumed run appends,
  so steps after the restored checkpoint may appear twice; the later line is
  the resumed run's (`df.drop_duplicates("step", keep="last")`).
  """

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard = None
    if self.enabled and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row: dict[str, Any] = {"step": int(step)}
    for name, value in metrics.items():
      value = float(np.asarray(value))
      row[name] = value if math.isfinite(value) else None
      if self._tensorboard is not None and math.isfinite(value):
        self._tensorboard.add_scalar(name, value, int(step))
    try:
      files.append_line(self.path, json.dumps(row))
    except OSError as error:
      if not files.disk_full(error):
        raise
      raise DiskFullError(
          f"The disk holding {self.path} is full: the metrics of step {int(step)} were not written (the file "
          "keeps every earlier line). Free space on that disk (or point --workdir at a larger one) and rerun the "
          "same command: the run resumes from its last checkpoint.") from None

  def flush(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All rows of a workdir's metrics.jsonl (for tests and notebooks without pandas)."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
