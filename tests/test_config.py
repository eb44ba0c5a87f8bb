"""Config schema and validation: every experiment loads, bad values are named."""

from __future__ import annotations

import pytest

from lm import config as config_lib
from tests.helpers import ROOT


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.py")), ids=lambda p: p.name)
def test_every_experiment_loads_validates_and_documents_itself(path):
  config = config_lib.load_config(str(path))
  config_lib.validate(config)
  source = path.read_text()
  assert source.lstrip().startswith('"""') and "Command:" in source and "Expected result" in source


@pytest.mark.parametrize("overrides,match", [
    ({"optim.lr": -1.0}, "optim.lr"),
    ({"optim.min_lr": 1.0}, "min_lr"),
    ({"model.width": 30}, "divisible by config.model.num_heads"),
    ({"model.variant": "bert"}, "variant"),
    ({"data.tokenizer": "words"}, "tokenizer"),
    ({"batch_size": 12, "grad_accum_steps": 5}, "grad_accum_steps"),
    ({"warm_start": "a", "init_from": "b"}, "at most one"),
    ({"data.source": ""}, "data.source"),
    ({"sample.top_p": 0.0}, "top_p"),
    ({"model.max_len": 8}, "max_len"),
])
def test_bad_values_name_the_field(overrides, match):
  config = config_lib.load_config(str(ROOT / "experiments" / "shakespeare_char.py"), overrides)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config)


def test_unknown_keys_list_the_keys_that_exist():
  base = config_lib.base_config()
  with pytest.raises(config_lib.ConfigError, match="Keys at that level: .*lr"):
    config_lib.apply_overrides(base, {"optim.lrr": 1})
  with pytest.raises(config_lib.ConfigError, match="nope"):
    config_lib.apply_overrides(base, {"nope.lr": 1})


def test_missing_config_file():
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    config_lib.load_config("experiments/missing.py")
