"""Orbax checkpoints: one composite checkpoint per saved step.

Each step directory holds three items:
  * `state`    - the TrainState (params, optimizer state, step, rng), saved
                 by every process through Orbax's multi-host path;
  * `data`     - the data iterator's state (JSON), so a resume continues the
                 exact data order;
  * `metadata` - the resolved config, the model config and the tokenizer
                 description (JSON), used to check that a checkpoint fits the
                 run that wants to restore it.
Saves are asynchronous; `keep` latest steps and the `keep_best` by
`eval/loss` are preserved.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from lm.core import faults, files
from lm.core.errors import CheckpointError
from lm.train.state import TrainState


class _ReadOnlyRestoreNotice(logging.Filter):
  """Drops Orbax's warning that a manager opened read-only is read-only (every restore here opens one)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_ReadOnlyRestoreNotice())

ITEMS = ("state", "data", "metadata")


def absolute(path: str) -> str:
  """Orbax's storage layer wants absolute paths; URLs such as gs://... are absolute already."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(absolute(workdir), "checkpoints")


def has_checkpoint(directory: str) -> bool:
  """True if `directory` (a workdir or its checkpoints folder) holds a finished checkpoint."""
  return latest_step(directory) is not None


def latest_step(directory: str) -> int | None:
  """The newest finished step in a workdir or checkpoints folder (None if none).

  Looks without creating anything, so probing a workdir never changes it.
  """
  for candidate in (checkpoint_dir(directory), absolute(directory)):
    path = epath.Path(candidate)
    if path.is_dir():
      steps = ocp.utils.checkpoint_steps(path)
      if steps:
        return max(steps)
  return None


def resolve_checkpoint_root(directory: str) -> str:
  """Accepts a workdir or its `checkpoints/` folder; returns the folder holding step dirs."""
  for candidate in (checkpoint_dir(directory), absolute(directory)):
    if epath.Path(candidate).is_dir() and ocp.utils.checkpoint_steps(epath.Path(candidate)):
      return candidate
  raise CheckpointError(
      f"No checkpoint found in {directory!r} (looked for numbered step folders in it and in its "
      "checkpoints/ subfolder). Point the option at a workdir of a finished run.")


SELECTION = "selection"  # the figure best checkpoints are ranked by (lower is better; Task.selection)


def _selection(metrics: dict[str, float]) -> float:
  # Checkpoints written before heads chose their own figure recorded eval/loss.
  return metrics.get(SELECTION, metrics.get("eval/loss"))


def best_step(directory: str) -> int | None:
  """The step of the best checkpoint (lowest selection figure) in a workdir; None if none has one."""
  root = resolve_checkpoint_root(directory)
  manager = ocp.CheckpointManager(root, item_names=ITEMS, options=ocp.CheckpointManagerOptions(
      create=False, read_only=True, save_interval_steps=0, best_fn=_selection, best_mode="min"))
  try:
    return manager.best_step()
  finally:
    manager.close()


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with this project's items."""

  def __init__(self, directory: str, *, keep: int = 3, keep_best: int = 1, asynchronous: bool = True):
    policies = [ocp.checkpoint_managers.LatestN(n=max(keep, 1))]
    if keep_best:
      policies.append(
          ocp.checkpoint_managers.BestN(
              get_metric_fn=_selection,
              reverse=True,  # BestN keeps the tail of the sorted list: descending puts the lowest loss there.
              n=keep_best,
              keep_checkpoints_without_metrics=False,
          ))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        # Without best_fn Orbax keeps a step's metrics in memory only; with it they are written beside
        # the step, so best_step() finds the best checkpoint after a restart too.
        best_fn=_selection,
        best_mode="min",
        enable_async_checkpointing=asynchronous,
        create=True,
    )
    self.directory = directory = absolute(directory)
    self._manager = ocp.CheckpointManager(directory, item_names=ITEMS, options=options)
    self._writing: int | None = None  # the step being saved (in the background when asynchronous)
    self._failed = False
    self._failed_step: int | None = None  # the step whose save failed for a full disk

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: TrainState, data_state: dict[str, Any], metadata: dict[str, Any],
           selection: float | None = None) -> bool:
    """Saves `step`; `selection` (lower is better, e.g. eval/loss) ranks it for keep_best.

    Asynchronous by default: the files are written in the background while
    training goes on. The previous save is finished first (as Orbax would), so
    a failure is reported with the step it belongs to; a full disk raises
    CheckpointError naming the disk, the step and the intact checkpoint.
    """
    self.wait()
    metrics = {SELECTION: float(selection)} if selection is not None else None
    self._writing = step
    try:
      saved = self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=ocp.args.JsonSave(data_state),
              metadata=ocp.args.JsonSave(metadata),
          ),
          metrics=metrics,
          force=True,
      )
    except Exception as error:  # pylint: disable=broad-except  (Orbax/TensorStore wrap OSError in their own types)
      self._fail(error)
      raise
    faults.point("checkpoint/save", step)  # the step's files are being written, not yet committed
    return saved

  def wait(self) -> None:
    """Waits for the save in flight; CheckpointError if it failed for a full disk."""
    if self._failed:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      self._fail(error)
      raise
    self._writing = None

  def _fail(self, error: BaseException) -> None:
    """Turns a full disk into CheckpointError (the partial step removed); other errors pass unchanged."""
    self._failed = True
    if not files.disk_full(error):
      return
    self._failed_step = self._writing
    raise disk_full_error(self.directory, self._writing)

  def close(self) -> None:
    try:
      self._manager.close()
    except Exception:  # pylint: disable=broad-except
      if not self._failed:
        raise  # after a failed save the manager's own cleanup may fail the same way; the first error was raised
    finally:
      if self._failed_step is not None:
        remove_partial_step(self.directory, self._failed_step)


def remove_partial_step(directory: str, step: int | None) -> None:
  """Removes the temporary folder(s) of a save of `step` that did not finish."""
  for partial in epath.Path(directory).glob(f"{step}.orbax-checkpoint-tmp*"):
    shutil.rmtree(partial, ignore_errors=True)


def disk_full_error(directory: str, step: int | None, cause: str = "is full (No space left on device)"
                    ) -> CheckpointError:
  """The error of a save of `step` into `directory` that failed for its disk, after removing the step's partial
  (temporary) folder: names the disk, the step and the checkpoint the same command resumes from.

  Orbax creates a step's item folders on its event loop's worker threads and closes that loop without waiting
  for them, so a folder of the step may still appear after the error: the partial step is removed now (to free
  the space), again by Checkpointer.close(), and once more at exit, when Python has joined those threads.
  """
  remove_partial_step(directory, step)
  atexit.register(remove_partial_step, directory, step)
  previous = [s for s in ocp.utils.checkpoint_steps(epath.Path(directory)) if s != step]
  kept = (f"The checkpoint of step {max(previous)} is intact: free space on that disk (or point --workdir at a "
          "larger one) and rerun the same command to resume from it." if previous else
          "No earlier checkpoint exists: free space on that disk (or point --workdir at a larger one) and rerun "
          "the same command.")
  return CheckpointError(f"The disk holding {directory} {cause}: the checkpoint of step {step} was not written. "
                         f"{kept}")


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (restore straight into the mesh)."""
  return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      abstract, shardings)


def read_metadata(directory: str, step: int | None = None) -> dict[str, Any]:
  """The metadata item of a checkpoint (latest step by default), without touching the state."""
  root = resolve_checkpoint_root(directory)
  step = step if step is not None else latest_step(root)
  path = epath.Path(root) / str(step) / "metadata"
  try:
    return ocp.CheckpointManager(root, item_names=ITEMS, options=ocp.CheckpointManagerOptions(
        create=False, read_only=True, save_interval_steps=0)).restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))[
            "metadata"]
  except Exception as error:  # Orbax raises several types for unreadable items.
    raise CheckpointError(f"Cannot read checkpoint metadata at {path}: {error}. The checkpoint may be "
                          "incomplete or from another program; use a different workdir.") from error


def restore(directory: str, abstract_state: TrainState, *, step: int | None = None,
            with_data: bool = True) -> tuple[TrainState, dict[str, Any] | None, dict[str, Any], int]:
  """Restores (state, data_state, metadata, step) with the shardings carried by `abstract_state`.

  `abstract_state` leaves are ShapeDtypeStructs with `.sharding` set, so the
  checkpoint lands directly in the target mesh's layout, whatever mesh wrote it.
  """
  root = resolve_checkpoint_root(directory)
  manager = ocp.CheckpointManager(root, item_names=ITEMS, options=ocp.CheckpointManagerOptions(
      create=False, read_only=True, save_interval_steps=0))
  step = step if step is not None else manager.latest_step()
  items = {"state": ocp.args.StandardRestore(abstract_state), "metadata": ocp.args.JsonRestore()}
  if with_data:
    items["data"] = ocp.args.JsonRestore()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
    raise CheckpointError(
        f"Checkpoint step {step} in {root} does not fit this run's train state: {error}. "
        "It was probably written for a different model or optimizer; use a new --workdir, or start "
        "from its weights with --config.init_from.") from error
  finally:
    manager.close()
  return restored["state"], restored.get("data") if with_data else None, restored["metadata"], step


def restore_params(directory: str, abstract_params: Any, *, step: int | None = None,
                   item_name: str = "state") -> tuple[Any, int]:
  """Restores only the parameters of a checkpoint (init-from), into `abstract_params`' shardings.

  The optimizer state of the source run is not read, so its optimizer may
  differ from this run's. `item_name="current"` reads an online run's promoted model.
  """
  root = resolve_checkpoint_root(directory)
  step = step if step is not None else latest_step(root)
  path = epath.Path(root) / str(step) / item_name
  # A train state keeps its parameters under "params"; an online run's "current" item is the parameters.
  item = {"params": abstract_params} if item_name == "state" else abstract_params
  restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
  except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
    raise CheckpointError(
        f"The parameters in {path} do not fit this model: {error}. init_from needs a checkpoint of a "
        "model with the same shapes (layers, heads, width, vocabulary).") from error
  return (restored["params"] if item_name == "state" else restored), step
