"""One run per workdir: an advisory lock file held for the life of a run.

    with workdir_lock("runs/x", "train"):
      ...  # nothing else can take runs/x until this block ends

`--mode train`, `online` and `crossval` hold `WORKDIR/run.lock` while they
run (`lm.app.lock.run_lock` takes it once per job); the read-only modes (eval,
sample, export, ab, bench, prepare) take no lock and may read a workdir a run
is writing.

How it works:
  * the lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on `WORKDIR/run.lock`, held
    open until the block ends. The kernel drops it when the process ends in
    any way (SIGKILL included), so a crash never leaves a lock behind that
    another run has to respect;
  * the file holds JSON naming the holder (host, pid, mode, started,
    processes) for the message of a run it refuses (`WorkdirLockedError`:
    which workdir, who holds it, since when, and the fix). A refused run
    changes nothing in the workdir;
  * the holder deletes the file when the block ends (however it ends). A file
    left by a killed run names a holder whose lock is gone: it is taken over
    and `Lock.previous` names the old holder, for the caller's warning;
  * where the file system does not support `flock` the file's content decides:
    a live pid on this host holds it, anything else is stale;
  * it is re-entrant within one process: a block inside a block for the same
    directory holds nothing more (`Lock.reentered`). Locks are per directory,
    a sub-folder has its own (crossval's folds `WORKDIR/fold_i` take theirs
    inside crossval's `WORKDIR` lock);
  * a URL workdir (`gs://...`, no local file system) is not locked
    (`Lock.skipped` says why);
  * folders it created for the lock file are removed again if the run left them
    empty (a run refused for a config error leaves no workdir behind).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
from typing import Any, Iterator

from lm.core.errors import WorkdirLockedError

LOCK_FILE = "run.lock"
# flock is not supported by this file system (some network and FUSE mounts): fall back to the file's content.
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@dataclasses.dataclass
class Lock:
  """What `workdir_lock` did (for the caller's log line)."""

  workdir: str
  path: str | None  # the lock file; None when skipped
  holder: dict[str, Any] | None = None  # what the lock file says (this process)
  previous: dict[str, Any] | None = None  # the holder a stale lock file named, now taken over
  reentered: bool = False  # this process already held it: nothing more is held
  skipped: str | None = None  # why no lock was taken (a URL workdir)
  flock_unsupported: bool = False  # the file system has no flock: the pid in the file decides


# realpath of a locked workdir -> [fd, depth]: the locks this process holds.
_HELD: dict[str, list[int]] = {}


def is_url(workdir: str) -> bool:
  """gs://, s3://, ... : a workdir without a local file system to lock in."""
  return "://" in str(workdir)


def lock_path(workdir: str) -> str:
  return os.path.join(os.fspath(workdir), LOCK_FILE)


def read_holder(workdir: str) -> dict[str, Any] | None:
  """What `WORKDIR/run.lock` says (None: no lock file, or one being written); the file may be stale."""
  try:
    with open(lock_path(workdir), encoding="utf-8") as f:
      return _parse(f.read())
  except OSError:
    return None


def _parse(text: str) -> dict[str, Any] | None:
  try:
    holder = json.loads(text) if text.strip() else None
  except ValueError:
    return None
  return holder if isinstance(holder, dict) else None


def _read_fd(fd: int) -> dict[str, Any] | None:
  try:
    return _parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
  except OSError:
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  except OSError:
    return False
  return True


def _alive_elsewhere(holder: dict[str, Any] | None) -> bool:
  """Without flock: does the file name a live process on this host, other than this one?"""
  if not holder or holder.get("host") != socket.gethostname():
    return False
  try:
    pid = int(holder.get("pid"))  # type: ignore[arg-type]
  except (TypeError, ValueError):
    return False
  return pid != os.getpid() and _pid_alive(pid)


def refusal_message(workdir: str, holder: dict[str, Any] | None) -> str:
  """The `error:` line of a run refused because `holder` holds `workdir`."""
  path = lock_path(workdir)
  fix = "or pass another --workdir."
  if not holder:
    return (f"{workdir} is in use by another run (it holds {path}, which does not yet say who: see `fuser -v "
            f"{path}`). Two runs in one workdir would interleave their checkpoints and metrics.jsonl. Wait for that "
            f"run to finish or stop it, {fix}")
  host, pid = holder.get("host", "?"), holder.get("pid", "?")
  processes = int(holder.get("processes") or 1)
  job = f" (process 0 of a {processes}-process job)" if processes > 1 else ""
  return (f"{workdir} is in use by another run: --mode {holder.get('mode', '?')} started "
          f"{holder.get('started', '?')} by pid {pid} on host {host}{job}, which holds {path}. Two runs in one "
          f"workdir would interleave their checkpoints and metrics.jsonl. Wait for that run to finish, stop it "
          f"(`kill {pid}` on {host}), {fix}")


def _missing_folders(workdir: str) -> list[str]:
  """The folders of `workdir` that do not exist yet, deepest first."""
  missing, folder = [], os.path.abspath(workdir)
  while not os.path.isdir(folder):
    missing.append(folder)
    parent = os.path.dirname(folder)
    if parent == folder:
      break
    folder = parent
  return missing


def _remove_if_empty(folders: list[str]) -> None:
  for folder in folders:  # deepest first
    try:
      os.rmdir(folder)
    except OSError:
      return


def _same_file(fd: int, path: str) -> bool:
  """Is `fd` still the file at `path` (the previous holder may have deleted it as we opened it)?"""
  try:
    here, there = os.fstat(fd), os.stat(path)
  except OSError:
    return False
  return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _acquire(workdir: str, path: str) -> tuple[int, dict[str, Any] | None, bool]:
  """(open fd holding the lock, what a stale file named, flock unsupported); raises WorkdirLockedError."""
  for _ in range(100):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    unsupported = False
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_fd(fd)
      os.close(fd)
      raise WorkdirLockedError(refusal_message(workdir, holder)) from None
    except OSError as error:
      if error.errno not in _UNSUPPORTED:
        os.close(fd)
        raise
      unsupported = True
    if not _same_file(fd, path):  # locked a file its holder deleted on release: lock the one there now
      os.close(fd)
      continue
    previous = _read_fd(fd)
    if unsupported and _alive_elsewhere(previous):
      os.close(fd)
      raise WorkdirLockedError(refusal_message(workdir, previous))
    return fd, previous, unsupported
  raise WorkdirLockedError(f"Could not lock {path}: it kept being replaced. Is another run starting in {workdir}?")


@contextlib.contextmanager
def workdir_lock(workdir: str, mode: str, *, processes: int = 1) -> Iterator[Lock]:
  """Holds `WORKDIR/run.lock` for the block; raises WorkdirLockedError if another live run holds it.

  mode: the run's --mode (for the message of a refused run); processes: the
  job's process count (the lock is the job's, taken by process 0).
  """
  workdir = os.fspath(workdir)
  if is_url(workdir):
    yield Lock(workdir, None, skipped=f"{workdir} is a URL (no local file system to lock in)")
    return
  key = os.path.realpath(workdir)
  if key in _HELD:
    _HELD[key][1] += 1
    try:
      yield Lock(workdir, lock_path(workdir), reentered=True)
    finally:
      _HELD[key][1] -= 1
    return

  created = _missing_folders(workdir)
  path = lock_path(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, previous, unsupported = _acquire(workdir, path)
  except BaseException:
    _remove_if_empty(created)
    raise
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "mode": mode,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "processes": int(processes),
            "workdir": os.path.abspath(workdir)}
  _HELD[key] = [fd, 1]
  try:
    data = (json.dumps(holder) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    yield Lock(workdir, path, holder=holder, previous=previous, flock_unsupported=unsupported)
  finally:
    del _HELD[key]
    try:
      if _same_file(fd, path):
        os.unlink(path)  # while still holding it: the next run finds no file, or a fresh one
    except OSError:
      pass
    finally:
      os.close(fd)
    _remove_if_empty(created)
