"""Writing reports and PNG figures so a reader never sees a half-written file.

Every file goes to a temporary name in its own folder and is moved into
place with `os.replace`, which is atomic on one filesystem; a failed write
leaves the previous file, and no temporary, behind. Figures are bare
matplotlib `Figure`s on the Agg canvas: no pyplot, so the process's backend
(a notebook's inline plots) is left alone.
"""

from __future__ import annotations

import os
from typing import Any


def _temporary_name(path: str) -> str:
  directory, name = os.path.split(path)
  return os.path.join(directory, f".{name}.tmp{os.getpid()}")


def _replace_atomically(path: str | os.PathLike, write: Any) -> str:
  """Calls write(temporary_path), then moves it to `path` (parent folders created); returns the path."""
  path = os.fspath(path)
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  temporary = _temporary_name(path)
  try:
    write(temporary)
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
  return path


def atomic_write(path: str | os.PathLike, data: bytes) -> str:
  """Writes `data` to `path` atomically; returns the path."""

  def write(temporary: str) -> None:
    with open(temporary, "wb") as f:
      f.write(data)

  return _replace_atomically(path, write)


def new_figure(size: tuple[float, float], dpi: int) -> Any:
  """A matplotlib Figure of `size` inches on the Agg canvas (no pyplot)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  figure = Figure(figsize=size, dpi=dpi)
  FigureCanvasAgg(figure)
  return figure


def save_png(figure: Any, path: str | os.PathLike) -> str:
  """Saves a figure as PNG at `path` atomically; returns the path."""
  return _replace_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
