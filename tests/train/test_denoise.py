"""The denoising LM (head="denoise"): the language model's loss on corrupted inputs, and nothing else changed."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lm.config import ConfigError, load_config, validate
from lm.data import pipeline
from lm.experiment import build_experiment, open_train_split, token_windows
from tests.helpers import ROOT, SHARED, tiny_overrides

SENTENCES = {
    "data.source": str(SHARED / "data" / "sst2"), "data.text_field": "sentence", "data.format": "sentences",
    "data.train_split": "dev", "data.eval_split": "dev", "data.tokenizer": "char", "seq_len": 32,
}


def _config(**extra):
  return load_config(str(ROOT / "experiments" / "shakespeare_char.py"), tiny_overrides(**{**SENTENCES, **extra}))


def _first_step(tmp_path, **extra):
  """(train metrics, params) after one step of the run's own jitted train step, and the batch it took."""
  config = _config(**extra)
  experiment, _ = build_experiment(config, str(tmp_path / config.head), "train")
  examples = token_windows(experiment, open_train_split(config), 1, train=True)
  dataset = pipeline.train_dataset(examples, seed=config.seed, global_batch_size=config.batch_size,
                                   rows=experiment.process_rows)
  batch = pipeline.to_global_batch(dataset[0], experiment.steps.batch_shardings, config.batch_size)
  with experiment.steps.context():
    state, metrics = experiment.steps.train_step(experiment.init_state(), batch)
  return {key: float(value) for key, value in metrics.items()}, jax.device_get(state.params)


def test_without_corruption_it_is_the_language_model(tmp_path):
  lm_metrics, lm_params = _first_step(tmp_path, head="lm")
  metrics, params = _first_step(tmp_path, head="denoise", **{"denoise.rate": 0.0})
  assert metrics == pytest.approx(lm_metrics, rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, lm_params)


def test_corruption_changes_the_loss_not_the_evaluation(tmp_path):
  clean, _ = _first_step(tmp_path, head="denoise", **{"denoise.rate": 0.0})
  noisy, _ = _first_step(tmp_path, head="denoise", **{"denoise.rate": 0.5})
  assert noisy["train/loss"] != pytest.approx(clean["train/loss"], rel=1e-4)
  config = _config(head="denoise", **{"denoise.rate": 0.5})
  experiment, _ = build_experiment(config, str(tmp_path / "eval"), "train")
  lm_experiment, _ = build_experiment(_config(head="lm"), str(tmp_path / "lm_eval"), "train")
  params = experiment.init_state().params
  examples = token_windows(experiment, open_train_split(config), config.seq_len)
  # The same parameters score the same on clean inputs under either task: evaluation is the LM's.
  assert experiment.evaluate(params, examples, 2) == pytest.approx(lm_experiment.evaluate(params, examples, 2))


@pytest.mark.parametrize("extra, match", [
    ({"denoise.rate": 1.0}, "config.denoise.rate=1.0 must be in"),
    ({"data.format": "windows"}, "data.format=sentences"),
])
def test_bad_settings_name_the_field(extra, match):
  with pytest.raises(ConfigError, match=match):
    validate(_config(head="denoise", **extra))
