"""Helpers shared by the tests: paths, a tiny config, running the CLI, workdir snapshots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TFDS_DIR = SHARED / "tfds"

# The tests read TFDS's tiny_shakespeare from ../shared/tfds, as CI does.
if TFDS_DIR.is_dir():
  os.environ.setdefault("TFDS_DATA_DIR", str(TFDS_DIR))


def tiny_overrides(**extra) -> dict:
  """A model and run small enough for a test to train in seconds on CPU."""
  overrides = {
      "steps": 20,
      "batch_size": 8,
      "seq_len": 32,
      "log_every": 5,
      "eval_every": 10,
      "eval_batches": 4,
      "checkpoint_every": 10,
      "model.num_layers": 2,
      "model.num_heads": 2,
      "model.width": 32,
      "optim.warmup_steps": 5,
      "async_checkpointing": False,
  }
  overrides.update(extra)
  return overrides


def cli_args(**extra) -> list[str]:
  return [f"--config.{key}={value}" for key, value in tiny_overrides(**extra).items()]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
  """Runs `python -m lm.main ARGS` in a fresh process (how users run it)."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  result = subprocess.run([sys.executable, "-m", "lm.main", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f"lm.main failed ({result.returncode}):\n{result.stderr[-4000:]}")
  return result


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
  """Every file under `directory` with its size and mtime (to check nothing changed)."""
  if not directory.exists():
    return {}
  return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(directory.rglob("*")) if p.is_file()}
