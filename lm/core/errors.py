"""The errors lm raises for input a user can fix.

Every one says what is wrong and how to fix it, and is raised where the input
enters (config, data file, checkpoint, CLI flag, mesh, Hugging Face folder)
before anything is written. `lm.main` prints any `UserError` as one
`error: ...` line and exits with code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
  """Base of the errors a user can fix; the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
  """A config value is missing or invalid; the message says which and how to fix it."""


class DataError(UserError, ValueError):
  """Bad data input: the message names the problem and the fix."""


class TokenizerError(UserError, ValueError):
  """Missing, corrupt or mismatched tokenizer: the message names the file and the fix."""


class CheckpointError(UserError, ValueError):
  """A checkpoint is missing, unreadable or does not fit this run."""


class MeshError(UserError, ValueError):
  """The configured mesh does not fit the devices."""


class NonFiniteError(UserError, RuntimeError):
  """The loss or gradient norm became NaN/Inf; the last good checkpoint is intact."""


class DistributedError(UserError, RuntimeError):
  """Multi-process start-up failed or the processes disagree; the message says how to fix it."""


class HFError(UserError, ValueError):
  """A Hugging Face directory that lm cannot read (or write): the message names the file, the problem, the fix."""


class WorkdirLockedError(UserError, RuntimeError):
  """Another live run holds the workdir's lock (lm.core.workdir_lock): the message names it and the fix."""


class DiskFullError(UserError, OSError):
  """The disk of a run's files is full: the message names the folder and the step, and the fix."""
