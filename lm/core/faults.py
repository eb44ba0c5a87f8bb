"""Fault injection: named points in the code where a process can be made to signal itself, for the
fault-tolerance tests (tests/integration/test_faults.py) and for anyone checking a change against them.

    LM_FAULTS="train/step@7=SIGKILL"                 kill this process right after dispatching step 7
    LM_FAULTS="p1:train/step@5=SIGTERM"              only process 1 of a multi-process job
    LM_FAULTS="checkpoint/save@2=SIGKILL;online/eval@1=SIGKILL"

A point is `point(name, index)`: `index` is what the point counts (the step for
train/step and checkpoint/save, the chunk's number for the online points), or
its own occurrence count in this process (1, 2, ...) when it counts nothing.
The signal is real (`os.kill` of this process), so what follows is what a
preemption, `kill -9` or Ctrl-C at that instant does. Unset (always, outside
tests), a point costs one dict lookup.

Points: train/step (a step dispatched, its result not yet computed), train/eval
(an evaluation half done), checkpoint/save (a checkpoint's files being
written, not yet committed), online/clean (a chunk being cleaned),
online/eval (a chunk's evaluation half done), online/between_chunks (a
chunk's last checkpoint written, the next chunk not yet read),
serve/feedback_assigned and serve/feedback_written (a feedback chunk's
records given its number / its files renamed into place, not yet marked
written; both count chunk numbers).
"""

from __future__ import annotations

import os
import signal

from lm.core.errors import ConfigError

_ENV = "LM_FAULTS"


def _parse(text: str, process: str) -> dict[tuple[str, int], str]:
  plan = {}
  for entry in filter(None, (part.strip() for part in text.split(";"))):
    try:
      where, action = entry.split("=")
      if ":" in where:
        only, where = where.split(":", 1)
        if only.removeprefix("p") != process:
          continue
      name, index = where.rsplit("@", 1)
      getattr(signal, action)
      plan[(name, int(index))] = action
    except (ValueError, AttributeError):
      raise ConfigError(f"{_ENV} entry {entry!r} is not [pN:]POINT@INDEX=SIGNAL (e.g. train/step@7=SIGKILL). Fix: "
                        f"correct it or unset {_ENV}.") from None
  return plan


_PLAN = _parse(os.environ.get(_ENV, ""), os.environ.get("JAX_PROCESS_ID", "0"))
_COUNTS: dict[str, int] = {}


def point(name: str, index: int | None = None) -> None:
  """A place where LM_FAULTS may signal this process (module doc)."""
  if not _PLAN:
    return
  if index is None:
    index = _COUNTS[name] = _COUNTS.get(name, 0) + 1
  action = _PLAN.get((name, int(index)))
  if action:
    os.kill(os.getpid(), getattr(signal, action))
