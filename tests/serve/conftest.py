"""Fixtures of the server's tests: one tiny trained language model per test session (per pytest worker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm.config import load_config
from tests.helpers import ROOT, tiny_overrides

CONFIG = str(ROOT / "experiments" / "shakespeare_char.py")


def serve_overrides(**extra) -> dict:
  """The tiny model's config, served on an OS-chosen free port with slots for 32 sequences."""
  return tiny_overrides(**{"steps": 40, "eval_every": 40, "checkpoint_every": 20, "serve.port": 0,
                           "serve.max_batch": 32, "serve.watch_interval": 0.2, **extra})


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
  """A tiny character-level Shakespeare model trained for 40 steps (checkpoints at 20 and 40)."""
  from lm.app.train import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("served") / "shakespeare"
  train(load_config(CONFIG, serve_overrides()), str(workdir))
  return workdir
