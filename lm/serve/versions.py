"""Which model a workdir serves, and a watcher that hot-swaps the server to each newer one.

A workdir's served model is
  * an online run's promoted ("current") model: its version is the last gate
    decision that promoted (the chunk, the step, the time), and it changes only
    when the gate promotes again;
  * a train run's latest checkpoint: its version is the step;
  * with no checkpoint and `init_from=hf:DIR`, the imported weights (step 0),
    which never change.

`ModelWatcher` looks every serve.watch_interval seconds (a directory listing
and, for an online run, one small JSON file), loads a newer model on its own
thread, off the request path, and hands it to the engine, which swaps between
decode steps (`lm.serve.engine`). A checkpoint that disappears or cannot be
read while it is loaded (rotated away, half written by a run on another file
system) is skipped with a warning and tried again at the next look.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable

from lm.online.store import is_online_checkpoint
from lm.train import checkpoint as checkpoint_lib

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Version:
  """What a response names as the model it came from."""

  run: str
  kind: str  # "online" (a promoted model), "train" (a checkpoint), "hf" (imported weights)
  step: int
  chunk: str | None = None  # online: the chunk whose gate promoted it (None: the model the run started from)
  promoted_at: str | None = None  # online: when the gate promoted it (UTC, ISO 8601)
  checkpoint: int | None = None  # the checkpoint step it is read from (online: any step after its promotion)

  @property
  def id(self) -> str:
    """A short name, e.g. "shakespeare_char@step-300" or "online@step-40/chunk-0002.txt"."""
    return f"{self.run}@step-{self.step}" + (f"/{self.chunk}" if self.chunk else "")

  def to_json(self) -> dict[str, Any]:
    return {"id": self.id, **dataclasses.asdict(self)}


def probe(workdir: str, run: str) -> Version | None:
  """The version `workdir` serves now, from its files alone (None: no checkpoint)."""
  step = checkpoint_lib.latest_step(workdir)
  if step is None:
    return None
  if not is_online_checkpoint(workdir):
    return Version(run, "train", step, checkpoint=step)
  root = Path(checkpoint_lib.resolve_checkpoint_root(workdir))
  online = json.loads((root / str(step) / "online" / "metadata").read_text())
  promoted = [record for record in online.get("gate", []) if record.get("promoted")]
  if not promoted:
    return Version(run, "online", 0, checkpoint=step)
  last = promoted[-1]
  return Version(run, "online", int(last["step"]), str(last["chunk"]), last.get("time"), checkpoint=step)


def same_model(a: Version | None, b: Version | None) -> bool:
  return a is not None and b is not None and (a.kind, a.step, a.chunk) == (b.kind, b.step, b.chunk)


class ModelWatcher:
  """Looks at the workdir every `interval` seconds; loads a newer model (`load(version)`, from
  version.checkpoint) and calls `swap(params, version)`."""

  def __init__(self, workdir: str, run: str, served: Version, load: Callable[[Version], Any],
               swap: Callable[[Any, Version], None], interval: float):
    self.workdir, self.run, self.served = workdir, run, served
    self.load, self.swap, self.interval = load, swap, interval
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="lm-serve-watcher", daemon=True)

  def start(self) -> None:
    if self.interval > 0:
      self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join(timeout=30)

  def check(self) -> bool:
    """One look: True if a newer model was loaded and handed over."""
    try:
      found = probe(self.workdir, self.run)
      if found is None or same_model(found, self.served):
        return False
      params = self.load(found)  # from found.checkpoint, the step whose files said so
    except Exception as error:  # pylint: disable=broad-except  (a checkpoint mid-rotation must not stop serving)
      _log.warning("Could not load the newer model in %s (%s: %s); trying again in %.0f s.", self.workdir,
                   type(error).__name__, error, self.interval)
      return False
    self.served = found
    self.swap(params, found)
    return True

  def _watch(self) -> None:
    while not self._stop.wait(self.interval):
      self.check()
