"""Starting a run's state, and loading a trained run: the three start modes and the latest checkpoint.

`initial_state` is resume, warm-start, init-from (a checkpoint or a Hugging
Face folder) or a fresh initialization, in that order of precedence (GUIDE.md;
`lm.train.config`). `load_trained` is what every mode that reads a trained run
starts with (eval, sample, export, the runs of an A/B test): the run built
from its config, with the parameters of its latest checkpoint (an online
run's promoted model).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from lm import interop
from lm.core.errors import CheckpointError, ConfigError
from lm.experiment.registry import saved_task, task_class
from lm.experiment.build import Experiment, build_experiment, hf_source_task
from lm.models import quantize as quantize_lib
from lm.online.store import is_online_checkpoint
from lm.train import checkpoint as checkpoint_lib
from lm.train.state import TrainState


def initial_state(experiment: Experiment) -> tuple[TrainState, dict[str, Any] | None, str]:
  """(state, the data iterator's saved state or None, how it started): resume, warm-start, init-from or fresh."""
  config, task = experiment.config, experiment.task
  if config.resume and checkpoint_lib.has_checkpoint(experiment.workdir):
    if is_online_checkpoint(experiment.workdir):
      raise CheckpointError(
          f"{experiment.workdir} holds checkpoints of an online run (--mode online). Continue it with --mode "
          f"online, or start a new --workdir from its weights with --config.init_from={experiment.workdir}.")
    state, data_state, _, step = checkpoint_lib.restore(experiment.workdir, experiment.abstract_state)
    return state, data_state, f"resumed from step {step}"
  if config.warm_start:
    state, _, _, step = checkpoint_lib.restore(config.warm_start, experiment.abstract_state, with_data=False)
    return state, None, f"warm-started from {config.warm_start} step {step}"
  if task.requires_init_from and not config.init_from:
    raise ConfigError(task.requires_init_from)
  state = experiment.init_state()
  hf_dir = interop.hf_directory(config.init_from)
  if hf_dir is not None:  # a Hugging Face language model (lm.interop), e.g. GPT-2 or Llama
    target, merge = task.init_from_target(experiment.abstract_state.params, hf_source_task(task))
    state = state.replace(params=merge(state.params, interop.load_sharded_params(hf_dir, experiment.model_config,
                                                                                  target)))
    return _with_frozen_weights(experiment, state, f"initialized weights from {config.init_from}")
  how = "initialized from scratch"
  if config.init_from:
    source_task = saved_task(checkpoint_lib.read_metadata(config.init_from))
    target, merge = task.init_from_target(experiment.abstract_state.params, source_task)
    source = task_class(source_task)
    if source.lm_part and source_task != task.name:  # e.g. a DPO run: its policy is the language model
      target, merge = source.lm_part_target(target, merge)
    restored, step = checkpoint_lib.restore_params(config.init_from, target)
    state = state.replace(params=merge(state.params, restored))
    how = f"initialized weights from {config.init_from} step {step} (a head={source_task!r} run)"
  return _with_frozen_weights(experiment, state, how)


def _with_frozen_weights(experiment: Experiment, state: TrainState, how: str) -> tuple[TrainState, None, str]:
  """The parts of the params the task fills from other runs or `hf:DIR` folders (`Task.frozen_weights`: a DPO
  reference, a distillation's teacher)."""
  task = experiment.task
  for part, directory in task.frozen_weights().items():
    hf_dir = interop.hf_directory(directory)
    if hf_dir is not None:  # a Hugging Face language model, e.g. a distillation's teacher
      restored = interop.load_sharded_params(hf_dir, task.frozen_model_config(part),
                                             experiment.abstract_state.params[part])
      how += f"; {part} from {directory}"
    else:
      restored, step = checkpoint_lib.restore_params(directory, experiment.abstract_state.params[part])
      how += f"; {part} from {directory} step {step}"
    state = state.replace(params=dict(state.params, **{part: restored}))
  return state, None, how


def load_trained(config: ml_collections.ConfigDict, workdir: str, mode: str) -> tuple[Experiment, Any, int]:
  """Experiment + params of the latest checkpoint in `workdir` (an online run's current model), and its step.

  A workdir with no checkpoint whose config has `init_from=hf:DIR` (for a task
  whose model an imported one is) uses the imported weights as they are (step 0).
  """
  hf_dir = interop.hf_directory(config.init_from)
  if (not checkpoint_lib.has_checkpoint(workdir) and hf_dir is not None and task_class(config.head).exports_hf
      and mode != "export"):
    experiment, _ = build_experiment(config, workdir, mode)
    logging.info("%s has no checkpoint: --mode %s uses the weights of %s as imported.", workdir, mode,
                 config.init_from)
    params = interop.load_sharded_params(hf_dir, experiment.model_config, experiment.abstract_state.params)
    if mode == "eval":
      os.makedirs(workdir, exist_ok=True)  # eval appends its figures to WORKDIR/metrics.jsonl
    return experiment, params, 0
  if not checkpoint_lib.has_checkpoint(workdir):
    raise CheckpointError(
        f"--mode {mode} needs a checkpoint, and {workdir!r} has none. Train first "
        f"(--mode train --workdir {workdir}) or point --workdir at a trained run.")
  experiment, _ = build_experiment(config, workdir, mode)
  if is_online_checkpoint(workdir):
    # An online run serves its promoted ("current") model, not the latest candidate.
    params, step = checkpoint_lib.restore_params(workdir, experiment.abstract_state.params, item_name="current")
    return experiment, params, step
  state, _, _, step = checkpoint_lib.restore(workdir, experiment.abstract_state, with_data=False)
  return experiment, state.params, step


def quantize_trained(experiment: Experiment, params: Any, scheme: str, field: str
                     ) -> tuple[Experiment, Any, dict[str, Any]]:
  """A loaded run's params with int8 matmul weights (`lm.models.quantize`), and the run to evaluate them with.

  Returns (experiment whose steps take the quantized layout, the quantized
  params placed like the float ones, `quantize.summary`: the scheme and the
  bytes); with scheme "none" the run and params as they are and {}. The task's
  own functions (evaluation, sampling) run unchanged: each projection reads its
  kernel as int8 values and scales. `field` is the config field errors name.
  """
  if scheme == "none":
    return experiment, params, {}
  quantized = quantize_lib.quantize_params(params, scheme, field=field)
  shardings = quantize_lib.quantized_shardings(experiment.steps.state_shardings.params, field)
  quantized = jax.device_put(quantized, shardings)
  steps = experiment.steps.for_params(shardings, experiment.task.make_eval_step())
  summary = quantize_lib.summary(quantized, scheme)
  logging.info("%s: %s matmul weights, %s parameter bytes (float32: %s, bfloat16: %s).", field, scheme,
               f"{summary['param_bytes']:,}", f"{summary['param_bytes_float32']:,}",
               f"{summary['param_bytes_bfloat16']:,}")
  return dataclasses.replace(experiment, steps=steps), quantized, summary
