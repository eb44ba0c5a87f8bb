"""The `export` part of the run config: `--mode export` writes a run's weights as a Hugging Face folder."""

from __future__ import annotations

import ml_collections

from lm.core.configs import ConfigPart, require
from lm.models.quantize import check_choice

FIELDS = {
    "export.dir": "",  # where to write config.json + model.safetensors (must not exist or be empty)
    "export.max_shard_size": 0,  # bytes per .safetensors shard (0: one file)
    "export.quantize": "none",  # int8: matmul weights written as int8 + per-channel float32 scales (lm reads them)
}


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  require(mode != "export" or bool(config.export.dir), "--mode export writes a Hugging Face folder: set "
          "--config.export.dir=OUT (a new or empty folder).")
  require(config.export.max_shard_size >= 0, "config.export.max_shard_size must be >= 0 bytes (0: one file).")
  check_choice("export.quantize", config.export.quantize)


CONFIG = ConfigPart("lm.interop", FIELDS, validate)
