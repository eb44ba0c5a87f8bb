"""Shared fixtures. Importing `tests.helpers` also points TFDS at ../shared/tfds."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid

import pytest

from tests.helpers import ROOT, tiny_overrides


def pytest_configure(config):
  """Settings of the whole session: LLVM's -O0 for XLA, one persistent compilation cache, one data cache.

  Set on the controller before the xdist workers start, so the workers and
  every process they start (CLI runs, launched processes, notebook kernels)
  inherit it: a program compiled once (the same tiny model's train step in a
  run and in its resumed copy) is read back instead of compiled again. The
  cache is new for each session, so no test reads a program compiled by an
  earlier checkout, and JAX keys it by the program, its compile options, the
  XLA flags and jax's version. A cache the caller chose is left alone.
  """
  if hasattr(config, "workerinput"):
    return
  # The tests check what programs compute, not how fast: LLVM's optimization level 0 compiles XLA:CPU
  # programs about a quarter faster (HLO is optimized as always) and computes the same numbers.
  if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  # MFU's CPU peak without its calibrated matmul (0.2 s in every training process; lm.train.perf): the tests
  # that check the calibration turn it back on.
  os.environ.setdefault("LM_CPU_PEAK_CALIBRATE", "0")
  made = []
  if "LM_DATA_CACHE" not in os.environ:  # prepared corpora and token caches: new for each session too
    os.environ["LM_DATA_CACHE"] = tempfile.mkdtemp(prefix="lm-tests-data-cache-")
    made.append(os.environ["LM_DATA_CACHE"])
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lm-tests-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    made.append(os.environ["JAX_COMPILATION_CACHE_DIR"])
  config.stash[_CACHE] = made


def pytest_unconfigure(config):
  for folder in config.stash.get(_CACHE, []):
    shutil.rmtree(folder, ignore_errors=True)


_CACHE = pytest.StashKey[list]()


# `make test` runs pytest -n 2 --dist loadfile: the tests of one file run on one worker, so a module-scoped
# fixture (trained runs several tests read) is built once, not once per worker. The files that take minutes are
# handed out first, so the two workers end together rather than one waiting on a long file handed out last.
_LONG_FILES_FIRST = (
    "tests/test_notebooks.py", "tests/train/test_heads.py", "tests/integration/test_multihost.py",
    "tests/train/test_sharding.py", "tests/train/test_classifier.py", "tests/online/test_loop.py",
    "tests/interop/test_hf_cli.py", "tests/train/test_grad_accum.py", "tests/integration/test_cli.py",
    "tests/serve/test_server.py", "tests/serve/test_serve_cli.py", "tests/train/test_preference.py",
    "tests/integration/test_preference_cli.py",
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {path: index for index, path in enumerate(_LONG_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


@pytest.fixture
def tiny_config():
  """Factory: the baseline config shrunk to a seconds-long run, with extra overrides."""
  from lm.config import load_config  # pylint: disable=g-import-not-at-top

  def make(**extra):
    return load_config(str(ROOT / "experiments" / "shakespeare_char.py"), tiny_overrides(**extra))

  return make


@pytest.fixture
def small_disk_of(tmp_path):
  """Factory: a real file system of `size` (tmpfs, e.g. "6m"), mounted for the test, unmounted after it;
  skipped where this user may not mount (the tests run as root on the project's machines and in CI)."""
  mounted = []

  def mount(size: str):
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                            capture_output=True)
    if result.returncode != 0:
      pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    mounted.append(mount_point)
    return mount_point

  yield mount
  for mount_point in mounted:
    subprocess.run(["umount", "-l", str(mount_point)], check=False)
