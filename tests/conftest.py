"""Shared fixtures. Importing `tests.helpers` also points TFDS at ../shared/tfds."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.helpers import ROOT, tiny_overrides


def pytest_configure(config):
  """XLA settings of the whole session: LLVM's -O0, and one persistent compilation cache.

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
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  cache = tempfile.mkdtemp(prefix="lm-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  config.stash[_CACHE] = cache


def pytest_unconfigure(config):
  cache = config.stash.get(_CACHE, None)
  if cache:
    shutil.rmtree(cache, ignore_errors=True)


_CACHE = pytest.StashKey[str]()


@pytest.fixture
def tiny_config():
  """Factory: the baseline config shrunk to a seconds-long run, with extra overrides."""
  from lm.config import load_config  # pylint: disable=g-import-not-at-top

  def make(**extra):
    return load_config(str(ROOT / "experiments" / "shakespeare_char.py"), tiny_overrides(**extra))

  return make
