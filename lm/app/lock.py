"""The workdir lock of a run (--mode train, online, crossval), taken once for the whole job.

`run_lock(workdir, mode)` wraps `lm.core.workdir_lock.workdir_lock`: in a
multi-process job (`jax.distributed`) process 0 alone takes the lock, and the
other processes learn from it whether it got it, so a job refused by another
run's lock stops on every process with process 0's message, and a job's own
processes never refuse each other. Taken by `lm.app.train.train`,
`lm.app.online.run_online` / `OnlineLoop.run` and `lm.app.crossval.crossval`,
so a notebook calling them holds it too.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import numpy as np
from absl import logging

from lm.core.errors import DistributedError, WorkdirLockedError
from lm.core.workdir_lock import Lock, workdir_lock

# Bytes of process 0's message shared with the other processes (an `error:` line fits).
_MESSAGE_BYTES = 2048
_OK, _LOCKED, _FAILED = 0, 1, 2


def _log(lock: Lock, mode: str) -> None:
  if lock.skipped:
    logging.info("No workdir lock: %s. Make sure no other run uses it.", lock.skipped)
    return
  if lock.reentered:
    return
  if lock.previous:
    logging.warning("Took over the stale lock %s of pid %s on host %s (--mode %s, started %s): that process is "
                    "gone.", lock.path, lock.previous.get("pid", "?"), lock.previous.get("host", "?"),
                    lock.previous.get("mode", "?"), lock.previous.get("started", "?"))
  if lock.flock_unsupported:
    logging.warning("%s's file system does not support flock: the lock file's pid alone keeps other runs out.",
                    lock.workdir)
  logging.info("Holding %s: no other train/online/crossval run can use %s until this %s run ends.", lock.path,
               lock.workdir, mode)


def _from_process_0(kind: int, message: str) -> tuple[int, str]:
  """Process 0's (kind, message), on every process (a collective: every process calls it)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.zeros(_MESSAGE_BYTES + 1, np.int32)
  encoded = message.encode("utf-8")[:_MESSAGE_BYTES]
  data[0] = kind
  data[1:1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(data[None])).reshape(jax.process_count(), -1)
  first = gathered[0]
  return int(first[0]), bytes(first[1:].astype(np.uint8)).rstrip(b"\0").decode("utf-8", "ignore")


@contextlib.contextmanager
def run_lock(workdir: str, mode: str) -> Iterator[None]:
  """Holds the job's lock of `workdir` for the block; raises WorkdirLockedError (on every process) if taken."""
  processes = jax.process_count()
  if processes == 1:
    with workdir_lock(workdir, mode) as lock:
      _log(lock, mode)
      yield
    return
  # Every process goes through the same collective, whether process 0 locks, is refused or fails.
  with contextlib.ExitStack() as stack:
    kind, message, own_error = _OK, "", None
    if jax.process_index() == 0:
      try:
        lock = stack.enter_context(workdir_lock(workdir, mode, processes=processes))
        _log(lock, mode)
      except WorkdirLockedError as error:
        kind, message, own_error = _LOCKED, str(error), error
      except Exception as error:  # pylint: disable=broad-except  # re-raised below, after the others heard of it
        kind, message, own_error = _FAILED, f"{type(error).__name__}: {error}", error
    kind, message = _from_process_0(kind, message)
    if own_error is not None:
      raise own_error
    if kind == _LOCKED:
      raise WorkdirLockedError(message)
    if kind == _FAILED:
      raise DistributedError(f"Process 0 could not lock {workdir} ({message}); its own output has the details.")
    yield
