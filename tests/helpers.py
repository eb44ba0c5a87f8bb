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


def device_env(devices: int) -> dict:
  """Environment for a subprocess with `devices` simulated CPU devices."""
  flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
           if not flag.startswith("--xla_force_host_platform_device_count")]  # the session's (conftest.py)
  return {"XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]), "JAX_PLATFORMS": "cpu"}


def run_launcher(num_processes: int, devices_per_process: int, *lm_args: str, timeout: float = 300,
                 env: dict | None = None) -> subprocess.CompletedProcess:
  """Runs `python -m lm.launch_local ... -- LM_ARGS` (output and errors together in stdout)."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  return subprocess.run([sys.executable, "-m", "lm.launch_local", f"--num_processes={num_processes}",
                         f"--devices_per_process={devices_per_process}", "--", *lm_args],
                        cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=timeout)


def train_losses(workdir: Path) -> dict[int, float]:
  """step -> train/loss from a workdir's metrics.jsonl; a resumed run's rows replace earlier ones."""
  import json  # pylint: disable=g-import-not-at-top
  losses = {}
  with open(Path(workdir) / "metrics.jsonl") as f:
    for line in f:
      row = json.loads(line)
      if "train/loss" in row:
        losses[row["step"]] = row["train/loss"]
  return losses


def metric_rows(workdir: Path) -> dict[int, dict]:
  """step -> every figure metrics.jsonl logged for it (a resumed run's rows update earlier ones)."""
  import json  # pylint: disable=g-import-not-at-top
  rows: dict[int, dict] = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    rows.setdefault(row["step"], {}).update(row)
  return rows


# -- SFT and DPO records (lm.data.pairs), written by the tests that need them -----------------------------------
TOY_LETTERS = "abcdefghijklmnoprstuvwy "  # neither "z" nor "q": a toy preference is in the last character alone


def toy_preferences(count: int, seed: int) -> list[dict]:
  """Preference records whose chosen response is a body + "z" and whose rejected one is the same body + "q".

  The prompts all have 6 characters: DPO's sampled KL decodes its prompts in batches of one length, each length
  a program to compile (seconds on CPU)."""
  import random  # pylint: disable=g-import-not-at-top
  rng = random.Random(seed)
  text = lambda low, high: "".join(rng.choice(TOY_LETTERS) for _ in range(rng.randint(low, high)))  # noqa: E731
  records = []
  for _ in range(count):
    prompt, body = text(6, 6), text(2, 6)
    records.append({"prompt": prompt, "chosen": body + "z", "rejected": body + "q"})
  return records


def toy_responses(count: int, seed: int) -> list[dict]:
  """Prompt-response records of different lengths (the response is the prompt reversed, then a period)."""
  import random  # pylint: disable=g-import-not-at-top
  rng = random.Random(seed)
  records = []
  for _ in range(count):
    prompt = "".join(rng.choice(TOY_LETTERS) for _ in range(rng.randint(2, 12)))
    records.append({"prompt": prompt, "response": prompt[::-1].strip() + "."})
  return records


def write_records(folder: Path, **splits: list[dict]) -> Path:
  """`folder`/SPLIT.jsonl for each split (train=..., validation=...): one JSON object a line."""
  import json  # pylint: disable=g-import-not-at-top
  folder.mkdir(parents=True, exist_ok=True)
  for split, records in splits.items():
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
  return folder


def needs_cpp_compiler() -> None:
  """Skips a test that runs lm's CPU kernels (lm/kernels) where no C++ compiler can build them; fails instead under
  LM_REQUIRE_COMPILER (.ci/run sets it and installs g++)."""
  import pytest  # pylint: disable=g-import-not-at-top

  from lm import kernels  # pylint: disable=g-import-not-at-top
  if kernels.compiler() is None:
    message = "needs a C++ compiler to build lm's CPU kernels: apt-get install g++ (.ci/run does)"
    if os.environ.get("LM_REQUIRE_COMPILER"):
      pytest.fail(message)
    pytest.skip(message)
