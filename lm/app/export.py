"""`--mode export`: a trained language model's latest checkpoint as a Hugging Face GPT-2 / Llama folder."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from lm import interop
from lm.core.errors import CheckpointError, ConfigError
from lm.experiment import load_trained
from lm.experiment.registry import saved_task, task_class
from lm.train import checkpoint as checkpoint_lib


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Writes the latest checkpoint of a head="lm" run as a Hugging Face directory (`config.export.dir`).

  The model must have GPT-2's layout (learned positions, LayerNorm, GELU) or
  Llama's (RoPE, RMSNorm, SwiGLU, no biases); lm.interop.export names the field
  that is neither. Beside config.json and the .safetensors weights (shards of
  `config.export.max_shard_size` bytes when > 0): the run's tokenizer as
  tokenizer.json (Hugging Face) or tokenizer.model (SentencePiece) when it is
  one, and always lm's own tokenizer folder `lm_tokenizer/` (char and byte
  tokenizers have no Hugging Face form; `init_from=hf:DIR` reads it back).
  With `config.export.quantize=int8` the projections' weights are written as
  int8 with per-channel float32 scales (lm.interop.hf.export); lm reads the
  folder back; transformers has no such method (docs/quantization.md).

  Returns:
    {"step", "dir", "model_type", "parameters", "files"}.
  """
  out_dir = config.export.dir
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise interop.HFError(f"config.export.dir={out_dir!r} is not empty. Fix: export into a new or empty folder "
                          "(nothing is overwritten).")
  if not checkpoint_lib.has_checkpoint(workdir):
    raise CheckpointError(
        f"--mode export writes a checkpoint, and {workdir!r} has none. Train first (--mode train --workdir "
        f"{workdir}) or point --workdir at a trained run.")
  written_by = saved_task(checkpoint_lib.read_metadata(workdir))
  if not (task_class(config.head).exports_hf and task_class(written_by).exports_hf):
    raise ConfigError(
        f"--mode export writes language models; {workdir} holds a head={written_by!r} run (config.head="
        f"{config.head!r}). Export a head='lm' run, with --config.head=lm.")
  experiment, params, step = load_trained(config, workdir, "export")
  params = experiment.task.lm_params(params)  # a DPO run's policy
  model_config = experiment.model_config
  model_type = interop.export_layout(model_config)  # refuses a model of neither layout before gathering weights
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    params = multihost_utils.process_allgather(params, tiled=True)
  written: list[str] = []
  if jax.process_index() == 0:
    written = interop.export(params, model_config, out_dir, config.export.max_shard_size,
                             eos_token_id=experiment.tokenizer.eos_id, quantize=config.export.quantize)
    written += interop.write_tokenizer(experiment.tokenizer, out_dir)
  weights = {}
  if config.export.quantize != "none":
    weights = {"quantize": config.export.quantize,
               "weight_file_bytes": sum(os.path.getsize(os.path.join(out_dir, name)) for name in written
                                        if name.endswith(".safetensors")) if written else 0}
  return {"step": step, "dir": out_dir, "model_type": model_type,
          "parameters": int(sum(leaf.size for leaf in jax.tree.leaves(params))), **weights, "files": written}


def run(config: ml_collections.ConfigDict, workdir: str, report: Any = print) -> int:
  """The CLI's --mode export: prints what was written as one JSON line."""
  report(json.dumps(export_checkpoint(config, workdir)))
  return 0
