"""What each `--mode` does, as functions a notebook can call.

  train  -> lm.train.loop.train
  eval   -> evaluate_checkpoint: loss, perplexity, bits per char/byte of the latest checkpoint
  sample -> sample_checkpoint: text from the latest checkpoint
  bench  -> lm.train.bench.benchmark: step time, tokens/s, MFU, compile time, memory
"""

from __future__ import annotations

from typing import Any

import ml_collections

from lm.online.store import is_online_checkpoint
from lm.train import checkpoint as checkpoint_lib
from lm.train.experiment import Experiment, build_experiment, open_eval_split, token_windows
from lm.train.loop import evaluate_params
from lm.train.metrics import MetricWriter


def load_trained(config: ml_collections.ConfigDict, workdir: str, mode: str) -> tuple[Experiment, Any, int]:
  """Experiment + params of the latest checkpoint in `workdir` (an online run's current model)."""
  if not checkpoint_lib.has_checkpoint(workdir):
    raise checkpoint_lib.CheckpointError(
        f"--mode {mode} needs a checkpoint, and {workdir!r} has none. Train first "
        f"(--mode train --workdir {workdir}) or point --workdir at a trained run.")
  experiment, _ = build_experiment(config, workdir, mode)
  if is_online_checkpoint(workdir):
    # An online run serves its promoted ("current") model, not the latest candidate.
    params, step = checkpoint_lib.restore_params(workdir, experiment.abstract_state.params, item_name="current")
    return experiment, params, step
  state, _, _, step = checkpoint_lib.restore(workdir, experiment.abstract_state, with_data=False)
  return experiment, state.params, step


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, split: str | None = None) -> dict[str, float]:
  """Evaluates the latest checkpoint on `split` (default config.data.eval_split); records to metrics.jsonl."""
  experiment, params, step = load_trained(config, workdir, "eval")
  split = split or config.data.eval_split
  windows = token_windows(experiment, open_eval_split(config, split), config.seq_len)
  metrics = evaluate_params(experiment, params, windows, config.eval_batches)
  metrics = {key.replace("eval/", f"eval_{_split_key(split)}/"): value for key, value in metrics.items()}
  metrics.update(experiment.head.final_report(experiment, params))
  MetricWriter(workdir, tensorboard=False).write(step, metrics)
  return {"step": step, "split": split, **metrics}


def _split_key(split: str) -> str:
  return "".join(ch if ch.isalnum() else "_" for ch in split).strip("_")


def sample_checkpoint(config: ml_collections.ConfigDict, workdir: str, prompt: str | None = None) -> list[str]:
  """Text from the latest checkpoint, as config.sample says (kind, prompt, temperature, ...).

  continue: `config.sample.num_samples` continuations of the prompt. With a
  VAE (head="vae"): prior (sentences decoded from z ~ N(0, I)), reconstruct
  (the prompt through the encoder and back), interpolate (prompt -> prompt_b
  in `interpolation_steps` points of latent space).
  """
  experiment, params, _ = load_trained(config, workdir, "sample")
  with experiment.steps.context():
    return experiment.head.sample(params, config.sample, prompt)
