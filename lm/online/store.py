"""Checkpoints of the online loop: one Orbax composite checkpoint per save.

Items of a step directory (`WORKDIR/checkpoints/STEP/`):
  * `state`    - the training lineage's TrainState (the latest candidate);
  * `current`  - the parameters of the promoted ("current", served) model;
  * `online`   - JSON: the stream cursor (consumed chunk ids, the chunk in
                 progress and the step within it), the continual-learning
                 matrix, gate decisions and cleaning counts;
  * `arrays`   - the replay buffer, the dedup index and each domain's held-out
                 tokens, packed into one `.npz` blob (Orbax refuses empty arrays);
  * `metadata` - the resolved config, model and tokenizer (as `--mode train`);
  * `anchor`   - only mid-chunk with a regularizer on (l2_init, ewc, distill):
                 the parameters before the chunk, which the regularizers pull
                 toward, so a resumed chunk keeps the anchor it started with;
  * `fisher`   - only mid-chunk with EWC on: the chunk's diagonal Fisher
                 (float32, like the parameters), computed at the chunk's start.
Checkpoints at chunk ends (and older ones) have neither; restore reads them
only where the step has them.
Everything a restart needs is in one step directory, committed atomically
(Orbax writes to a temporary folder and renames it), so a kill at any moment
leaves the previous checkpoint complete, and the cursor never disagrees with
the weights. A save is waited for before the loop goes on: an error (a full disk) surfaces at once,
with the previous checkpoint intact.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lm.core import faults, files
from lm.train import checkpoint as checkpoint_lib
from lm.train.state import TrainState

ITEMS = ("state", "current", "online", "arrays", "metadata", "anchor", "fisher")
OPTIONAL_ITEMS = ("anchor", "fisher")  # in a step only while a regularized chunk is in progress
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


def latest_online_json(directory: str) -> dict[str, Any] | None:
  """The `online` item (the run's bookkeeping, JSON) of a workdir's latest checkpoint, read without restoring
  it; None if it cannot be read (`OnlineCheckpointer.restore_latest` then decides which step to use)."""
  step = checkpoint_lib.latest_step(directory)
  if step is None:
    return None
  path = epath.Path(checkpoint_lib.resolve_checkpoint_root(directory)) / str(step) / "online" / "metadata"
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


class Restored(NamedTuple):
  """What `OnlineCheckpointer.restore_latest` returns; anchor / fisher are None where the step has none."""
  state: TrainState
  current: Any
  online: dict[str, Any]
  arrays: dict[str, np.ndarray]
  step: int
  anchor: Any = None
  fisher: Any = None


def float32_like(abstract: Any) -> Any:
  """ShapeDtypeStructs of `abstract`'s shapes and shardings in float32 (the Fisher's restore target)."""
  return jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, np.float32, sharding=getattr(leaf, "sharding", None)), abstract)


class OnlineCheckpointer:
  """Saves and restores the online loop's checkpoints; keeps the `keep` latest."""

  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = checkpoint_lib.absolute(directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max(keep, 1)),
        enable_async_checkpointing=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

  def save(self, step: int, state: TrainState, current: Any, online: dict[str, Any], arrays: dict[str, np.ndarray],
           metadata: dict[str, Any], *, anchor: Any = None, fisher: Any = None) -> None:
    """Writes checkpoint `step`; raises CheckpointError (previous checkpoints intact) if it cannot.

    anchor / fisher (params-like pytrees): the chunk in progress's regularizer
    anchor and EWC Fisher; None leaves the item out of the step.
    """
    items = dict(
        state=ocp.args.StandardSave(state),
        current=ocp.args.StandardSave(current),
        online=ocp.args.JsonSave(online),
        arrays=ocp.args.StandardSave({"npz": pack_arrays(arrays)}),
        metadata=ocp.args.JsonSave(metadata),
    )
    for name, value in (("anchor", anchor), ("fisher", fisher)):
      if value is not None:
        items[name] = ocp.args.StandardSave(value)
    try:
      # Written in the background and waited for at once: the same files as a synchronous save, and a
      # moment (checkpoint/save, lm.core.faults) when they are half written, for the fault tests.
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
      faults.point("checkpoint/save", step)
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except  (Orbax/TensorStore wrap OSError in their own types)
      if not (isinstance(error, OSError) or files.disk_full(error)):
        raise
      cause = "is full (No space left on device)" if files.disk_full(error) else f"failed ({error})"
      raise checkpoint_lib.disk_full_error(self.directory, step, cause) from None

  def restore_latest(self, abstract_state: TrainState, abstract_current: Any) -> Restored | None:
    """The newest readable checkpoint (a `Restored`), or None if there is none.

    A checkpoint that cannot be read (corrupt, truncated, written by another
    program) is skipped with a warning naming it, and the one before it is used.
    The optional `anchor` (restored like `current`: the parameters' dtypes and
    shardings) and `fisher` (float32, the same shardings) are read only where
    the step has them, and are None otherwise.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    failures = []
    optional = {"anchor": abstract_current, "fisher": float32_like(abstract_current)}
    for step in steps:
      try:
        items = dict(
            state=ocp.args.StandardRestore(abstract_state),
            current=ocp.args.StandardRestore(abstract_current),
            online=ocp.args.JsonRestore(),
            arrays=ocp.args.StandardRestore(),
        )
        # Orbax raises for a requested item the step lacks (saved at a chunk's end, or before the items existed).
        for name in self.items_of(step) & set(OPTIONAL_ITEMS):
          items[name] = ocp.args.StandardRestore(optional[name])
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
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
      return Restored(restored["state"], restored["current"], restored["online"], arrays, step,
                      restored.get("anchor"), restored.get("fisher"))
    if failures:
      raise checkpoint_lib.CheckpointError(
          f"No checkpoint in {self.directory} can be read ({'; '.join(failures)}). Move the folder aside and "
          "start again from config.online.init_from.")
    return None

  def items_of(self, step: int) -> set[str]:
    """The names of the items checkpoint `step` holds."""
    path = epath.Path(self.directory) / str(step)
    return {item.name for item in path.iterdir() if item.is_dir()} if path.exists() else set()

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
