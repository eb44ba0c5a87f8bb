"""Faults a real run meets: signals to some processes of a job, kills during asynchronous saves, a full disk.

The faults are real: signals a process sends itself at a named point of the code (`lm.core.faults`, through
the LM_FAULTS environment variable, so the instant is exact and the test deterministic), SIGKILL, and a small
tmpfs that fills up. Every run checkpoints asynchronously, as runs do by default.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from lm.train import checkpoint as checkpoint_lib
from tests.helpers import cli_args, device_env, run_cli, run_launcher, train_losses

pytestmark = pytest.mark.faults  # make test-faults (CI runs it after make test)

CONFIG = ("--config", "experiments/shakespeare_char.py")
STEPS = 12


def args(**extra) -> list[str]:
  return cli_args(**{"steps": STEPS, "log_every": 1, "eval_every": 100, "checkpoint_every": 100,
                     "keep_checkpoints": 10, "async_checkpointing": True, **extra})


def faults(plan: str) -> dict:
  return {"LM_FAULTS": plan}


def finished_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def partial_saves(workdir: Path) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
  """The uninterrupted run's losses: one process of 4 devices (2 processes of 2 devices compute the same)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  run_cli(*CONFIG, "--workdir", str(workdir), *args(), env=device_env(4), check=True)
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses


def assert_same_losses(workdir: Path, reference: dict[int, float]) -> None:
  losses = train_losses(workdir)
  assert sorted(losses) == sorted(reference)
  for step, loss in reference.items():
    assert losses[step] == pytest.approx(loss, rel=1e-5), step


@pytest.mark.slow
def test_signals_to_some_processes_stop_all_of_them_at_one_step_and_the_run_resumes_exactly(tmp_path, reference):
  workdir = tmp_path / "run"
  launch = lambda plan: run_launcher(2, 2, *CONFIG, "--workdir", str(workdir), *args(), env=faults(plan),  # noqa: E731
                                     timeout=240)
  # SIGTERM to process 1 alone, during step 3: the processes agree one step later and both save step 4.
  result = launch("p1:train/step@3=SIGTERM")
  assert result.returncode == 0, result.stdout[-4000:]
  assert finished_steps(workdir) == [4] and not partial_saves(workdir)
  data = json.loads((workdir / "checkpoints" / "4" / "data" / "metadata").read_text())
  assert data["process_count"] == 2 and data["iterator"]["next_index"] == 4
  assert "SIGTERM received: saved step 4" in result.stdout
  # SIGTERM to both, at different steps (6 and 7): the first one decides.
  result = launch("p0:train/step@6=SIGTERM;p1:train/step@7=SIGTERM")
  assert result.returncode == 0, result.stdout[-4000:]
  assert finished_steps(workdir) == [4, 7] and not partial_saves(workdir)
  # SIGINT to process 0: every process saves step 10 and exits 130, and so does the job.
  result = launch("p0:train/step@9=SIGINT")
  assert result.returncode == 130, result.stdout[-4000:]
  assert "every process was interrupted (SIGINT), saved the same step" in result.stdout
  assert finished_steps(workdir) == [4, 7, 10] and not partial_saves(workdir)
  # The checkpoint written by 2 processes restores onto 1 process, and the run ends as if never stopped.
  run_cli(*CONFIG, "--workdir", str(workdir), *args(), env=device_env(4), check=True)
  assert finished_steps(workdir)[-1] == STEPS
  assert_same_losses(workdir, reference)


@pytest.mark.slow
def test_sigterm_then_sigkill_at_seeded_instants_of_a_training_run_resumes_it_exactly(tmp_path, reference):
  # One process: SIGTERM during step 2 saves step 2 and exits 0. Then five kills (SIGKILL), each at an instant
  # drawn (seed 16) from its own stretch of the run, after the checkpoint the previous kill left: mid-step (a
  # step dispatched, not computed), mid-save (an asynchronous save's files half written) and mid-evaluation.
  # 12 steps, a checkpoint every 2, an evaluation every 3; every save asynchronous.
  rng = random.Random(16)
  workdir = tmp_path / "run"
  run_args = args(checkpoint_every=2, eval_every=3, eval_batches=8)
  run = lambda plan: run_cli(*CONFIG, "--workdir", str(workdir), *run_args,  # noqa: E731
                             env={**device_env(4), **faults(plan)})
  result = run("train/step@2=SIGTERM")
  assert result.returncode == 0 and finished_steps(workdir) == [2], result.stderr[-3000:]
  assert "SIGTERM received: saved step 2" in result.stderr
  instants = []
  for kind, low, high in (("train/step", 3, 4), ("checkpoint/save", 4, 6), ("train/eval", 0, 0),
                          ("train/step", 7, 10), ("checkpoint/save", 9, 12)):
    resume = checkpoint_lib.latest_step(str(workdir))
    if kind == "train/eval":
      index = 1  # this process's first evaluation: the first multiple of 3 after `resume`
    else:
      every = 2 if kind == "checkpoint/save" else 1
      candidates = [step for step in range(resume + 1, STEPS + 1) if step % every == 0]
      index = rng.choice([step for step in candidates if low <= step <= high] or candidates[:1])
    result = run(f"{kind}@{index}=SIGKILL")
    assert result.returncode == -9, (kind, index, result.stderr[-3000:])  # the kill landed
    if kind == "checkpoint/save":  # mid-save: the step is a temporary folder, never read; the one before is
      assert str(index) in [name.split(".")[0] for name in partial_saves(workdir)], partial_saves(workdir)
      assert checkpoint_lib.latest_step(str(workdir)) == index - 2
    instants.append((resume, kind, index))
  steps = [index for _, kind, index in instants if kind != "train/eval"]
  assert max(steps) - min(steps) >= 6, instants  # spread over the run
  run_cli(*CONFIG, "--workdir", str(workdir), *run_args, env=device_env(4), check=True)
  assert finished_steps(workdir)[-1] == STEPS and not partial_saves(workdir)
  assert_same_losses(workdir, reference)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_naming_the_disk_and_step_and_it_resumes_exactly_once_freed(small_disk_of, reference):
  small_disk = small_disk_of("6m")
  workdir = small_disk / "run"
  filler = small_disk / "filler"
  filler.write_bytes(bytes(4_600_000))  # leaves room for the run's files and two or three checkpoints
  every_2 = args(checkpoint_every=2)
  result = run_cli(*CONFIG, "--workdir", str(workdir), *every_2, env=device_env(4))
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  found = re.search(r"The disk holding (\S+) is full.*? step (\d+)", errors[0])
  assert found and found.group(1).startswith(str(workdir)), errors[0]
  failed_step = int(found.group(2))
  saved = finished_steps(workdir)
  assert saved and max(saved) < failed_step and not partial_saves(workdir)
  # metrics.jsonl is whole: every line parses, and every step up to the last checkpoint is there.
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {row["step"] for row in rows} >= set(range(1, max(saved) + 1))
  # Space freed: the same command resumes from the last checkpoint and ends as if never stopped.
  filler.unlink()
  run_cli(*CONFIG, "--workdir", str(workdir), *every_2, env=device_env(4), check=True)
  assert finished_steps(workdir)[-1] == STEPS
  assert_same_losses(workdir, reference)
