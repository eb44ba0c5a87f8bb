"""Writing reports and PNG figures so a reader never sees a half-written file.

Every file goes to a temporary name in its own folder and is moved into
place with `os.replace`, which is atomic on one filesystem; a failed write
leaves the previous file, and no temporary, behind. Figures are bare
matplotlib `Figure`s on the Agg canvas: no pyplot, so the process's backend
(a notebook's inline plots) is left alone.
"""

from __future__ import annotations

import errno
import os
from typing import Any

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "ENOSPC", "RESOURCE_EXHAUSTED: Failed to write")


def disk_full(error: BaseException | None) -> bool:
  """Whether `error`, or an error it was raised from, is a full disk (or quota): an OSError's errno, or the
  text of one wrapped by a library (TensorStore reports ENOSPC in its message, Orbax re-raises it)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
      return True
    if any(text in str(error) for text in _DISK_FULL_TEXTS):
      return True
    error = error.__cause__ or error.__context__
  return False


def append_line(path: str | os.PathLike, line: str) -> None:
  """Appends `line` (and a newline) to `path` whole or not at all: if the write fails (a full disk), the file
  is cut back to its previous length, so it never ends in half a line; the error is re-raised."""
  data = (line + "\n").encode("utf-8")
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    size = os.fstat(fd).st_size
    try:
      written = 0
      while written < len(data):
        written += os.write(fd, data[written:])
    except OSError:
      os.ftruncate(fd, size)
      raise
  finally:
    os.close(fd)


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
