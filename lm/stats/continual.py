"""Continual-learning metrics over a stream of chunks: forgetting, BWT, FWT.

An online loop trains on chunks of text, each from a named domain, and after
every chunk evaluates the validation loss (mean token cross-entropy, lower is
better) on every domain seen so far. The results form a matrix

  R[i][j] = loss on domain j after row i,

where row 0 is the initial model (before any online chunk) and row i >= 1 is
the model after chunk i. Columns are domains in order of first appearance. A
domain that appears mid-stream gets a column whose earlier rows are None (not
evaluated), except the row just before it appears, which holds the current
model's loss on it before any training on it ("loss before"). The pretraining
domain(s) count as trained in row 0.

Definitions (losses, so lower is better; T = the last row; None = undefined,
written as JSON null, never NaN):
  * avg_loss   = mean over domains j of R[T][j].
  * forgetting_j = R[T][j] - min over rows i < T with a value of R[i][j]
                   (positive = the model forgot). Undefined for a domain whose
                   only value is in row T. `forgetting` is the mean over the
                   domains where it is defined. It is negative when the final
                   loss is the best so far.
  * bwt_j (backward transfer, GEM: Lopez-Paz & Ranzato 2017, for losses and for
           domains trained over several rows) = R[k_j][j] - R[T][j], with k_j
           the last row that trained on j; defined when k_j < T (positive =
           later training helped j, negative = it hurt). `bwt` is the mean.
  * fwt_j (forward transfer) = b_j - R[f_j - 1][j], with b_j the initial
           model's loss on j and f_j >= 1 the first row that trained on j;
           defined for domains not trained in row 0, once trained, when
           R[f_j - 1][j] is known (positive = the chunks before f_j helped j
           before the model ever trained on it). A domain first trained in
           chunk 1 has fwt 0 by construction. `fwt` is the mean.
  * per_domain[j] = {"final": R[T][j], "best": min over rows of R[i][j],
           "forgetting", "bwt", "fwt", "initial": b_j}.

`ContinualMatrix.write` saves all of it as `continual.json` in the workdir, so
the run's curves can be read without rerunning anything; `heatmap` draws R.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from lm.core import files

FILENAME = "continual.json"
INITIAL_ROW = "initial"
STATE_KEYS = ("domains", "chunks", "R", "trained", "initial")
METRIC_KEYS = ("avg_loss", "forgetting", "bwt", "fwt", "per_domain")
# Past this many cells the numbers overlap and only the colours are readable.
MAX_ANNOTATED_CELLS = 600
CELL_INCHES = 0.55  # size of one heatmap cell; a figure grows with the matrix
MIN_FIGURE_INCHES = 4.0
MAX_FIGURE_INCHES = 40.0  # keeps a very long stream's PNG within a sane pixel count
HEATMAP_DPI = 100
# Cells whose normalized value lies above this get dark text (the colormap is light there).
DARK_TEXT_ABOVE = 0.6


def _mean(values: list[float]) -> float | None:
  return float(np.mean(values)) if values else None


def _loss(domain: str, value: Any) -> float:
  """A finite Python float: JSON has no NaN, and a NaN mean would hide every other domain."""
  loss = float(value)
  if not math.isfinite(loss):
    raise ValueError(
        f"The loss for domain {domain!r} is {loss}; the model diverged or the evaluation was empty. "
        "Stop the stream (or lower the learning rate) instead of recording a non-finite loss.")
  return loss


@dataclasses.dataclass
class ContinualMatrix:
  """R[i][j] = loss on domain j after row i; row 0 = the initial model, row i>=1 = after chunk i."""
  domains: list[str]  # column order = order of first appearance
  chunks: list[str]  # row labels: ["initial", chunk ids...]
  R: list[list[float | None]]  # [rows][domains]; None where the domain was not evaluated in that row
  trained: list[list[str]]  # per row, the domains trained in it (row 0: the pretraining domain(s))
  initial: dict[str, float]  # b_j: the initial model's loss on domain j (for forward transfer)

  @classmethod
  def start(cls, initial_losses: dict[str, float], pretrained_domains: list[str]) -> ContinualMatrix:
    """Row 0: the initial model's losses {domain: loss}; `pretrained_domains` count as trained there."""
    unknown = [d for d in pretrained_domains if d not in initial_losses]
    if unknown:
      raise ValueError(
          f"Pretrained domains {unknown} have no initial loss; evaluate the initial model on them "
          "and pass them in initial_losses.")
    losses = {d: _loss(d, v) for d, v in initial_losses.items()}
    return cls(domains=list(losses), chunks=[INITIAL_ROW], R=[list(losses.values())],
               trained=[list(pretrained_domains)], initial=dict(losses))

  @property
  def num_rows(self) -> int:
    return len(self.R)

  def add_domain(self, domain: str, initial_loss: float, loss_before: float) -> None:
    """A new domain appears: a new column, empty except in the last row.

    Args:
      domain: the new domain's name.
      initial_loss: b_j, the initial (row 0) model's loss on it, for forward transfer.
      loss_before: the current model's loss on it before training on it, stored in the last row.
    """
    if domain in self.domains:
      raise ValueError(f"Domain {domain!r} is already a column; call add_domain once per domain.")
    self.domains.append(domain)
    self.initial[domain] = _loss(domain, initial_loss)
    for row in self.R[:-1]:
      row.append(None)
    self.R[-1].append(_loss(domain, loss_before))

  def add_row(self, chunk_id: str, trained_domains: list[str], losses: dict[str, float]) -> None:
    """After a chunk: the losses {domain: loss} on every known domain, and the domains it trained on."""
    missing = [d for d in self.domains if d not in losses]
    if missing:
      raise ValueError(
          f"Chunk {chunk_id!r} has no loss for domains {missing}; evaluate every known domain "
          "after each chunk (R must have no holes after a domain appears).")
    unknown = sorted((set(losses) | set(trained_domains)) - set(self.domains))
    if unknown:
      raise ValueError(f"Chunk {chunk_id!r} names unknown domains {unknown}; call add_domain for them first.")
    self.R.append([_loss(d, losses[d]) for d in self.domains])
    self.chunks.append(str(chunk_id))
    self.trained.append(list(trained_domains))

  def _column(self, j: int) -> list[float | None]:
    return [row[j] for row in self.R]

  def _trained_rows(self, domain: str) -> list[int]:
    return [i for i, names in enumerate(self.trained) if domain in names]

  def metrics(self) -> dict[str, Any]:
    """avg_loss, forgetting, bwt, fwt (floats or None) and per_domain; see the module docstring."""
    last = self.num_rows - 1
    per_domain: dict[str, dict[str, float | None]] = {}
    for j, domain in enumerate(self.domains):
      column = self._column(j)
      final = column[last]
      known = [v for v in column if v is not None]
      earlier = [v for v in column[:last] if v is not None]
      forgetting = final - min(earlier) if earlier and final is not None else None
      rows = self._trained_rows(domain)
      bwt = fwt = None
      if rows and rows[-1] < last and final is not None and column[rows[-1]] is not None:
        bwt = column[rows[-1]] - final
      if rows and rows[0] >= 1 and column[rows[0] - 1] is not None:
        fwt = self.initial[domain] - column[rows[0] - 1]
      per_domain[domain] = {"final": final, "best": min(known) if known else None,
                            "forgetting": forgetting, "bwt": bwt, "fwt": fwt,
                            "initial": self.initial[domain]}

    def mean_of(key: str) -> float | None:
      return _mean([m[key] for m in per_domain.values() if m[key] is not None])

    return {"avg_loss": mean_of("final"), "forgetting": mean_of("forgetting"),
            "bwt": mean_of("bwt"), "fwt": mean_of("fwt"), "per_domain": per_domain}

  def to_json(self) -> dict[str, Any]:
    """The matrix and its metrics as JSON-ready data; `from_json` reads the matrix back."""
    data = {"domains": list(self.domains), "chunks": list(self.chunks),
            "R": [list(row) for row in self.R]}
    data.update(self.metrics())
    data["trained"] = [list(names) for names in self.trained]
    data["initial"] = dict(self.initial)
    return data

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> ContinualMatrix:
    """Inverse of `to_json` (metrics are recomputed, not read)."""
    missing = [k for k in STATE_KEYS if k not in data]
    if missing:
      raise ValueError(f"Continual data lacks keys {missing}; pass the output of ContinualMatrix.to_json.")
    matrix = cls(domains=list(data["domains"]), chunks=list(data["chunks"]),
                 R=[[None if v is None else float(v) for v in row] for row in data["R"]],
                 trained=[list(names) for names in data["trained"]],
                 initial={d: float(v) for d, v in data["initial"].items()})
    rows, width = len(matrix.R), len(matrix.domains)
    if (len(matrix.chunks) != rows or len(matrix.trained) != rows
        or any(len(row) != width for row in matrix.R) or set(matrix.initial) != set(matrix.domains)):
      raise ValueError(
          f"Continual data is inconsistent: {rows} rows of R, {len(matrix.chunks)} chunks, "
          f"{len(matrix.trained)} trained lists, {width} domains; the file is corrupt or hand-edited, "
          "rewrite it with ContinualMatrix.write.")
    return matrix

  def write(self, workdir: str | os.PathLike) -> str:
    """Writes workdir/continual.json atomically, so a reader never sees half a file; returns its path."""
    text = json.dumps(self.to_json(), indent=2, allow_nan=False)
    return files.atomic_write(os.path.join(os.fspath(workdir), FILENAME), text.encode("utf-8"))

  def heatmap(self, path: str | os.PathLike) -> str:
    """Draws R as a PNG (rows x domains, values annotated, blank where None); returns the path."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    values = np.array([[np.nan if v is None else v for v in row] for row in self.R], np.float64)
    rows, cols = values.shape
    width = min(max(MIN_FIGURE_INCHES, 2.0 + CELL_INCHES * 1.6 * cols), MAX_FIGURE_INCHES)
    height = min(max(MIN_FIGURE_INCHES, 1.5 + CELL_INCHES * rows), MAX_FIGURE_INCHES)
    figure = files.new_figure((width, height), HEATMAP_DPI)
    axes = figure.add_subplot()
    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="white")  # None cells stay blank
    image = axes.imshow(np.ma.masked_invalid(values), cmap=colormap, aspect="auto", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="validation loss (lower is better)")
    axes.set_xticks(range(cols), self.domains, rotation=30, ha="right")
    axes.set_yticks(range(rows), self.chunks)
    axes.set_xlabel("domain")
    axes.set_ylabel("after chunk")
    summary = self.metrics()
    subtitle = ", ".join(f"{k} {summary[k]:.3f}" for k in ("avg_loss", "forgetting", "bwt", "fwt")
                         if summary[k] is not None)
    axes.set_title(f"Loss per domain after each chunk\n{subtitle}", fontsize="medium")
    if rows * cols <= MAX_ANNOTATED_CELLS and np.isfinite(values).any():
      low, high = np.nanmin(values), np.nanmax(values)
      for i in range(rows):
        for j in range(cols):
          if np.isfinite(values[i, j]):
            shade = (values[i, j] - low) / (high - low) if high > low else 0.0
            axes.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize="small",
                      color="black" if shade > DARK_TEXT_ABOVE else "white")
    figure.tight_layout()
    return files.save_png(figure, path)

