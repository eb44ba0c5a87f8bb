"""The run config, assembled from the parts every package contributes (`lm.config` is its public face).

Every experiment in `experiments/` starts from `base_config()` and changes
what it needs, so all configs share one schema: a key that is not in the
schema is a typo and is rejected (ConfigDicts are locked), and `validate`
checks values before a run touches its workdir. Each field is declared once,
with its default and a comment, by the package that reads it (`PARTS`):

  lm.train           seed, steps, batch_size, seq_len, ..., start modes; optim.*, mesh.*, bench.*, xla_cpu_options.*, cpu_malloc
  lm.models          model.*
  lm.data            data.*, clean.*, eval.* (but eval.quantize)
  lm.models.quantize eval.quantize (the scheme's choices live in lm.models)
  lm.experiment.registry  head; each task's group: vae.*, gan.*, classifier.*
  lm.online          online.*
  lm.inference       sample.*
  lm.serve           serve.*
  lm.stats.ab        ab.*
  lm.interop         export.*
  lm.distributed     distributed.*
  lm.xla_flags       xla.*
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from lm import distributed, xla_flags
from lm.core import configs
from lm.core.configs import apply_overrides  # noqa: F401  (part of this module's API)
from lm.core.errors import ConfigError  # noqa: F401  (part of this API)
from lm.data import config as data_config
from lm.experiment.registry import CONFIG as TASK_REGISTRY_CONFIG
from lm.experiment.registry import TASK_CONFIGS
from lm.inference import config as inference_config
from lm.interop import config as interop_config
from lm.models import config as model_config
from lm.models import quantize as quantize_config
from lm.online import config as online_config
from lm.serve import config as serve_config
from lm.stats import ab as ab_stats
from lm.train import config as train_config

# In validation order: each part checks its own fields, the registry last checks what the config asks of
# its task (which needs every group's values valid first).
PARTS: tuple[configs.ConfigPart, ...] = (
    train_config.CONFIG,
    model_config.CONFIG,
    data_config.CONFIG,
    quantize_config.CONFIG,
    *TASK_CONFIGS,
    online_config.CONFIG,
    inference_config.CONFIG,
    serve_config.CONFIG,
    ab_stats.CONFIG,
    interop_config.CONFIG,
    distributed.CONFIG,
    xla_flags.CONFIG,
    TASK_REGISTRY_CONFIG,
)


def base_config() -> ml_collections.ConfigDict:
  """Every field `lm` reads, with its default (module doc). Experiments override some of them."""
  return configs.compose(PARTS)


def validate(config: ml_collections.ConfigDict, mode: str = "train") -> None:
  """Checks values before anything runs; raises ConfigError naming the field and the fix.

  Every part checks its own fields; the task `config.head` names checks what
  the config asks of it (its data format, the mode, the sampling options).
  """
  configs.validate_parts(PARTS, config, mode)


def load_config(path: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Loads `experiments/NAME.py`'s get_config() and applies dotted overrides.

  For notebooks: `load_config("experiments/shakespeare_char.py", {"steps": 300})`.
  `PATH:ARG` calls get_config(ARG), as `--config PATH:ARG` does on the command
  line (e.g. experiments/sentence_vae.py:lm for that experiment's plain LM).
  """
  return apply_overrides(configs.load_config_file(path), overrides or {})


def config_from_saved(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The config a run recorded (its config.json / checkpoint metadata), on today's schema.

  Keys the schema no longer has are dropped; keys it gained keep their
  defaults; JSON lists become the tuples the schema holds.
  """
  return configs.merge_saved(base_config(), saved)


to_json_dict = configs.to_json_dict
unknown_key_message = configs.unknown_key_message
