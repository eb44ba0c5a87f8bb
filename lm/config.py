"""The run config, as experiments and notebooks use it: `base_config`, `load_config`, `validate`.

    from lm.config import base_config            # experiments/NAME.py's get_config() starts from it
    config = load_config("experiments/shakespeare_char.py", {"steps": 300})   # a notebook
    validate(config, "train")                    # ConfigError naming the field and the fix

Each field is declared once, by the package that reads it; `lm.experiment.config`
composes them (its docstring lists which package declares which group).
"""

from lm.core.errors import ConfigError
from lm.experiment.config import (apply_overrides, base_config, config_from_saved, load_config, to_json_dict,
                                  unknown_key_message, validate)

__all__ = ["ConfigError", "apply_overrides", "base_config", "config_from_saved", "load_config", "to_json_dict",
           "unknown_key_message", "validate"]
