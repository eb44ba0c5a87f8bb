"""One run per workdir: WORKDIR/run.lock (lm/core/workdir_lock.py, taken once per job by lm/app/lock.py)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lm.core import workdir_lock as lock_lib
from lm.core.errors import UserError, WorkdirLockedError
from tests.helpers import ROOT, cli_args, run_cli, run_launcher, snapshot

CONFIG = ("--config", "experiments/shakespeare_char.py")
TRAIN_ARGS = cli_args(steps=2, log_every=1, eval_every=1000, checkpoint_every=1000)
HOST = socket.gethostname()

# A real other process that holds a workdir's lock until its stdin closes (then releases it, as a run that ends).
HOLD = textwrap.dedent("""
    import sys
    from lm.core.workdir_lock import workdir_lock
    with workdir_lock(sys.argv[1], "train"):
      print("locked", flush=True)
      sys.stdin.read()
""")


@contextlib.contextmanager
def held(workdir: Path):
  """Another live process holding `workdir`'s lock for the block; yields it."""
  process = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
  try:
    assert process.stdout.readline().strip() == "locked"
    yield process
  finally:
    process.stdin.close()
    try:
      process.wait(timeout=30)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()


def dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def write_stale_lock(workdir: Path, pid: int) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / lock_lib.LOCK_FILE).write_text(json.dumps(
      {"host": HOST, "pid": pid, "mode": "train", "started": "2026-01-01 00:00:00 UTC", "processes": 1}))


def error_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


# -- the lock module -------------------------------------------------------------------------------


def _flock_free(path: Path) -> bool:
  """Can a new open file description lock `path` (False while this process or another holds it)?"""
  fd = os.open(path, os.O_RDWR | os.O_CREAT)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  finally:
    os.close(fd)


def test_held_for_the_block_with_its_holder_named_then_removed(tmp_path):
  workdir = tmp_path / "run"
  with lock_lib.workdir_lock(str(workdir), "train") as lock:
    path = workdir / "run.lock"
    assert lock.path == str(path) and lock.previous is None and not lock.reentered
    holder = json.loads(path.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == HOST and holder["mode"] == "train"
    assert lock_lib.read_holder(str(workdir)) == holder
    assert not _flock_free(path)
  assert not path.exists() and not workdir.exists()  # the folder it made for the lock, left empty: removed
  # A notebook calling train twice in a row: the lock is free again.
  with lock_lib.workdir_lock(str(workdir), "train"):
    (workdir / "metrics.jsonl").write_text("{}\n")
  assert sorted(os.listdir(workdir)) == ["metrics.jsonl"]  # the run's files stay, the lock goes


def test_reentrant_in_one_process(tmp_path):
  with lock_lib.workdir_lock(str(tmp_path), "crossval"):
    with lock_lib.workdir_lock(str(tmp_path / "."), "train") as inner:
      assert inner.reentered
    assert not _flock_free(tmp_path / "run.lock")  # the outer block still holds it
    with lock_lib.workdir_lock(str(tmp_path / "fold_0"), "train") as fold:  # a sub-folder has its own lock
      assert not fold.reentered and (tmp_path / "fold_0" / "run.lock").exists()
  assert not (tmp_path / "run.lock").exists()


def test_released_when_the_block_raises(tmp_path):
  with pytest.raises(KeyError):
    with lock_lib.workdir_lock(str(tmp_path), "train"):
      raise KeyError("boom")
  assert not (tmp_path / "run.lock").exists()
  with lock_lib.workdir_lock(str(tmp_path), "train") as lock:
    assert not lock.reentered


def test_url_workdirs_are_not_locked(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with lock_lib.workdir_lock("gs://bucket/runs/x", "train") as lock:
    assert lock.path is None and "gs://bucket/runs/x" in lock.skipped
  assert not os.listdir(tmp_path)


def test_another_process_refuses_with_the_holder_named(tmp_path):
  with held(tmp_path) as holder:
    before = snapshot(tmp_path)
    with pytest.raises(WorkdirLockedError) as refused:
      with lock_lib.workdir_lock(str(tmp_path), "online"):
        pass
    assert snapshot(tmp_path) == before
  assert isinstance(refused.value, UserError)
  message = str(refused.value)
  for part in (str(tmp_path), f"pid {holder.pid}", HOST, f"`kill {holder.pid}` on {HOST}", "--workdir",
               "--mode train"):
    assert part in message, message
  assert not (tmp_path / "run.lock").exists()  # the holder removed it when it ended


def test_a_stale_lock_file_is_taken_over(tmp_path):
  pid = dead_pid()
  write_stale_lock(tmp_path, pid)
  with lock_lib.workdir_lock(str(tmp_path), "train") as lock:
    assert lock.previous["pid"] == pid
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()


def test_without_flock_the_pid_decides(tmp_path, monkeypatch):
  def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(lock_lib.fcntl, "flock", no_flock)
  write_stale_lock(tmp_path, os.getppid())  # a live process on this host
  with pytest.raises(WorkdirLockedError, match=f"pid {os.getppid()}"):
    with lock_lib.workdir_lock(str(tmp_path), "train"):
      pass
  write_stale_lock(tmp_path, dead_pid())
  with lock_lib.workdir_lock(str(tmp_path), "train") as lock:
    assert lock.flock_unsupported and lock.previous


def test_the_job_lock_nests_within_a_process(tmp_path):
  from lm.app.lock import run_lock  # pylint: disable=g-import-not-at-top
  with run_lock(str(tmp_path), "online"):
    with run_lock(str(tmp_path), "online"):  # run_online, then OnlineLoop.run
      assert json.loads((tmp_path / "run.lock").read_text())["mode"] == "online"
    assert (tmp_path / "run.lock").exists()
  assert not (tmp_path / "run.lock").exists()


def test_each_mode_that_writes_takes_the_lock_before_anything_else(tmp_path):
  from lm.app.crossval import crossval  # pylint: disable=g-import-not-at-top
  from lm.app.online import run_online  # pylint: disable=g-import-not-at-top
  from lm.app.train import train  # pylint: disable=g-import-not-at-top
  from lm.config import load_config  # pylint: disable=g-import-not-at-top
  config = load_config(str(ROOT / "experiments" / "shakespeare_char.py"))
  with held(tmp_path) as holder:
    before = snapshot(tmp_path)
    for mode in (train, crossval, run_online):
      with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid}"):
        mode(config, str(tmp_path))
    assert snapshot(tmp_path) == before


# -- the command line ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 2-process job, started over a stale lock file that names a dead pid: (workdir, stale pid, output)."""
  workdir = tmp_path_factory.mktemp("lock") / "run"
  pid = dead_pid()
  write_stale_lock(workdir, pid)
  result = run_launcher(2, 2, *CONFIG, "--workdir", str(workdir), *TRAIN_ARGS, timeout=240)
  return workdir, pid, result



@pytest.mark.slow
@pytest.mark.faults
def test_a_multi_process_job_takes_one_lock_over_a_stale_one(finished):
  workdir, pid, result = finished
  assert result.returncode == 0, result.stdout[-4000:]  # process 1 was not refused by process 0's lock
  warnings = [line for line in result.stdout.splitlines() if "stale lock" in line]
  assert len(warnings) == 1 and warnings[0].startswith("[p0]") and f"pid {pid}" in warnings[0], result.stdout[-4000:]
  assert not (workdir / "run.lock").exists()
  assert json.loads(result.stdout.strip().splitlines()[-1].split("] ", 1)[1])["step"] == 2


@pytest.mark.slow
@pytest.mark.faults
def test_a_second_run_stops_at_once_and_changes_nothing(finished):
  workdir = finished[0]
  with held(workdir) as holder:
    before = snapshot(workdir)
    start = time.monotonic()
    result = run_cli(*CONFIG, "--workdir", str(workdir), *cli_args(steps=100000), timeout=120)
    assert snapshot(workdir) == before
  assert result.returncode == 2, result.stderr[-3000:]
  assert time.monotonic() - start < 60 and "Train state" not in result.stderr  # refused before the build
  line = error_line(result.stderr)
  for part in (str(workdir), f"pid {holder.pid}", HOST, f"`kill {holder.pid}` on {HOST}", "another --workdir"):
    assert part in line, line
  assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.faults
def test_eval_reads_a_locked_workdir(finished):
  workdir = finished[0]
  with held(workdir):
    result = run_cli(*CONFIG, "--workdir", str(workdir), *TRAIN_ARGS, "--mode", "eval", timeout=120)
    assert (workdir / "run.lock").exists()
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.faults
def test_a_multi_process_job_on_a_locked_workdir_stops_on_every_process(finished):
  workdir = finished[0]
  with held(workdir) as holder:
    before = snapshot(workdir)
    refused = run_launcher(2, 2, *CONFIG, "--workdir", str(workdir), *cli_args(steps=100000), timeout=240)
    assert snapshot(workdir) == before
  assert refused.returncode == 2, refused.stdout[-4000:]
  for process in (0, 1):
    lines = [line for line in refused.stdout.splitlines() if line.startswith(f"[p{process}] error:")]
    assert lines and f"pid {holder.pid}" in lines[0] and str(workdir) in lines[0], refused.stdout[-4000:]
