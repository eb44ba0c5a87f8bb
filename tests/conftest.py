"""Shared fixtures. Importing `tests.helpers` also points TFDS at ../shared/tfds."""

from __future__ import annotations

import pytest

from tests.helpers import ROOT, tiny_overrides


@pytest.fixture
def tiny_config():
  """Factory: the baseline config shrunk to a seconds-long run, with extra overrides."""
  from lm.config import load_config  # pylint: disable=g-import-not-at-top

  def make(**extra):
    return load_config(str(ROOT / "experiments" / "shakespeare_char.py"), tiny_overrides(**extra))

  return make
