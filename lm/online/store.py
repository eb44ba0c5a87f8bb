"""Checkpoints of the online loop: one Orbax composite checkpoint per save.

Items of a step directory (`WORKDIR/checkpoints/STEP/`):
  * `state`    - the training lineage's TrainState (the latest candidate);
  * `current`  - the parameters of the promoted ("current", served) model;
  * `online`   - JSON: the stream cursor (consumed chunk ids, the chunk in
                 progress and the step within it), the continual-learning
                 matrix, gate decisions and cleaning counts;
  * `arrays`   - the replay buffer, the dedup index and each domain's held-out
                 tokens, packed into one `.npz` blob (Orbax refuses empty arrays);
  * `metadata` - the resolved config, model and tokenizer (as `--mode train`).
Everything a restart needs is in one step directory, committed atomically
(Orbax writes to a temporary folder and renames it), so a kill at any moment
leaves the previous checkpoint complete, and the cursor never disagrees with
the weights. Saves are synchronous: an error (a full disk) surfaces at once,
with the previous checkpoint intact.
"""

from __future__ import annotations

import io
import logging
import shutil
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lm.train import checkpoint as checkpoint_lib
from lm.train.state import TrainState

ITEMS = ("state", "current", "online", "arrays", "metadata")
UNREADABLE_DIR = "unreadable_checkpoints"  # beside checkpoints/ in the workdir


def pack_arrays(arrays: dict[str, np.ndarray]) -> np.ndarray:
  """A flat dict of numpy arrays -> one uint8 array (an `.npz` file's bytes)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return np.frombuffer(buffer.getvalue(), np.uint8).copy()


def unpack_arrays(blob: Any) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(np.asarray(blob, np.uint8).tobytes())) as archive:
    return {name: archive[name] for name in archive.files}


def is_online_checkpoint(directory: str) -> bool:
  """True if the latest checkpoint in a workdir was written by the online loop (has a `current` item)."""
  step = checkpoint_lib.latest_step(directory)
  if step is None:
    return False
  root = checkpoint_lib.resolve_checkpoint_root(directory)
  return (epath.Path(root) / str(step) / "current").exists()


class OnlineCheckpointer:
  """Saves and restores the online loop's checkpoints; keeps the `keep` latest."""

  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = checkpoint_lib.absolute(directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max(keep, 1)),
        enable_async_checkpointing=False, create=True)
    self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

  def save(self, step: int, state: TrainState, current: Any, online: dict[str, Any], arrays: dict[str, np.ndarray],
           metadata: dict[str, Any]) -> None:
    """Writes checkpoint `step`; raises CheckpointError (previous checkpoints intact) if it cannot."""
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          current=ocp.args.StandardSave(current),
          online=ocp.args.JsonSave(online),
          arrays=ocp.args.StandardSave({"npz": pack_arrays(arrays)}),
          metadata=ocp.args.JsonSave(metadata),
      ), force=True)
      self._manager.wait_until_finished()
    except OSError as error:
      self._discard_partial(step)
      previous = [s for s in self._manager.all_steps() if s != step]
      kept = f"checkpoint step {max(previous)} is intact and will be resumed from" if previous else "no earlier checkpoint exists"
      raise checkpoint_lib.CheckpointError(
          f"Could not write the checkpoint of step {step} in {self.directory}: {error}. The {kept}. Free disk "
          "space (or point --workdir at a larger disk) and rerun the same command.") from error

  def _discard_partial(self, step: int) -> None:
    for path in epath.Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
      shutil.rmtree(path, ignore_errors=True)

  def restore_latest(self, abstract_state: TrainState, abstract_current: Any):
    """(state, current, online, arrays, step) of the newest readable checkpoint, or None if there is none.

    A checkpoint that cannot be read (corrupt, truncated, written by another
    program) is skipped with a warning naming it, and the one before it is used.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            current=ocp.args.StandardRestore(abstract_current),
            online=ocp.args.JsonRestore(),
            arrays=ocp.args.StandardRestore(),
        ))
        arrays = unpack_arrays(restored["arrays"]["npz"])
      except Exception as error:  # pylint: disable=broad-except  # Orbax/TensorStore raise many types for bad files
        failures.append(f"step {step}: {type(error).__name__}: {str(error)[:300]}")
        logging.warning("Checkpoint step %d in %s cannot be read (%s); falling back to the previous one.", step,
                        self.directory, str(error)[:300])
        continue
      if failures:
        moved = self._set_aside(steps[:steps.index(step)])
        logging.warning("Resuming from checkpoint step %d; the unreadable ones (%s) were moved to %s.", step,
                        "; ".join(failures), moved)
      return restored["state"], restored["current"], restored["online"], arrays, step
    if failures:
      raise checkpoint_lib.CheckpointError(
          f"No checkpoint in {self.directory} can be read ({'; '.join(failures)}). Move the folder aside and "
          "start again from config.online.init_from.")
    return None

  def _set_aside(self, steps: list[int]) -> str:
    """Moves unreadable step folders out of the way (kept for inspection; the run re-creates those steps)."""
    target = epath.Path(self.directory).parent / UNREADABLE_DIR
    target.mkdir(parents=True, exist_ok=True)
    for step in steps:
      destination = target / str(step)
      suffix = 1
      while destination.exists():
        destination, suffix = target / f"{step}.{suffix}", suffix + 1
      shutil.move(str(epath.Path(self.directory) / str(step)), str(destination))
    self._manager.reload()
    return str(target)

  def close(self) -> None:
    self._manager.close()
