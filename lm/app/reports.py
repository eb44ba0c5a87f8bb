"""What a task's report after training is handed: functions over this run, and other finished runs.

`report_context(experiment, params)` is the `lm.tasks.base.ReportContext` of
a built run: its best checkpoint, its splits, its eval step, and `load_run`,
which loads another run from its workdir on today's config schema and this
run's mesh (the GAN's MLE baseline and judge).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from lm.core.errors import ConfigError
from lm.experiment import Experiment, load_trained, open_eval_split
from lm.experiment.config import config_from_saved
from lm.tasks.base import ReportContext, RunView
from lm.train import checkpoint as checkpoint_lib


def run_view(experiment: Experiment, params: Any) -> RunView:
  return RunView(experiment.task, params, experiment.steps.context, experiment.workdir)


def load_run(workdir: str, like: ml_collections.ConfigDict) -> RunView:
  """Another run's latest checkpoint, built from its recorded config on the mesh of the config `like`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{workdir} has no config.json: point the option at the workdir of a finished run "
                      "(e.g. config.gan.baseline / config.gan.judge at a head='lm' run on sentences).")
  with open(path) as f:
    saved = json.load(f)["config"]
  # On today's schema: keys added since that run keep their defaults, JSON lists become the tuples it holds.
  config = config_from_saved(saved)
  config.mesh = ml_collections.ConfigDict(like.mesh.to_dict())
  config.distributed = ml_collections.ConfigDict(like.distributed.to_dict())
  config.lock()
  experiment, params, _ = load_trained(config, workdir, "eval")
  return run_view(experiment, params)


def report_context(experiment: Experiment, params: Any) -> ReportContext:
  """The context of `experiment`'s report, with `params` as its final weights."""

  def best() -> tuple[Any, int | None]:
    step = checkpoint_lib.best_step(experiment.workdir) if checkpoint_lib.has_checkpoint(experiment.workdir) else None
    if step is None:
      return params, None
    restored, _ = checkpoint_lib.restore_params(experiment.workdir, experiment.abstract_state.params, step=step)
    return restored, step

  return ReportContext(
      workdir=experiment.workdir,
      run=run_view(experiment, params),
      best=best,
      open_split=lambda split: open_eval_split(experiment.config, split),
      evaluate_rows=experiment.evaluate_rows,
      load_run=lambda workdir: load_run(workdir, experiment.config),
  )
