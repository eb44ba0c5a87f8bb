r"""Command-line entry point: `python -m lm.main` or the `lm` console script.

  python -m lm.main --config experiments/shakespeare_char.py --workdir runs/x \
      [--config.KEY=VALUE ...] [--mode train|prepare|online|eval|sample|bench|crossval|ab|export]

Everything here is flag parsing, error reporting and the table of modes; the
work is done by importable functions, one module per mode (lm.app.*).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from lm import distributed
from lm import xla_flags
from lm.core.configs import load_config_file, unknown_key_message
from lm.core.errors import ConfigError, UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/NAME.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tokenizer, config.")
# The modes: each is the module lm.app.<mode>, whose run(config, workdir, report) the CLI calls.
MODES = ("train", "prepare", "online", "eval", "sample", "serve", "bench", "crossval", "ab", "export")
_MODE = flags.DEFINE_enum("mode", "train", list(MODES), "What to do.")
flags.mark_flags_as_required(["config"])

# Errors a user can fix; anything else is a bug and keeps its traceback.
EXIT_USER_ERROR = 2


def mode_runner(mode: str) -> Callable[..., int]:
  """`lm.app.<mode>.run(config, workdir, report)`, imported when it runs: JAX starts only after the XLA flags."""
  return importlib.import_module(f"lm.app.{mode}").run


def run_mode(config, workdir: str | None, mode: str) -> int:
  """Runs one mode; returns the process exit code."""
  if mode != "bench" and not workdir:
    raise ConfigError(f"--mode {mode} needs --workdir (the run directory).")
  # XLA reads its flags once, when JAX starts its backends: the presets go first.
  try:
    logging.info("%s", xla_flags.apply(config.xla.preset, config.xla.flags).summary())
  except ConfigError:
    if config.xla.preset != "auto" or config.xla.flags or not xla_flags.backends_started():
      raise  # asked for explicitly: an error rather than flags silently not applied
    logging.warning("JAX already started (e.g. earlier in this notebook): XLA flag preset auto not applied. "
                    "Call lm.xla_flags.apply() before the first JAX computation to use it.")
  cluster = distributed.initialize(config.distributed)  # before anything touches a device
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    logging.set_verbosity(logging.ERROR)  # logs, metrics and progress come from process 0
  elif cluster.how != "single":
    logging.info("Process 0 of %d (%s start-up); %d devices in all.", jax.process_count(), cluster.how,
                 jax.device_count())
  report = print if jax.process_index() == 0 else (lambda *args, **kwargs: None)
  return mode_runner(mode)(config, workdir, report)


class _QuietLibraries:
  """Drops INFO lines of the libraries that narrate every checkpoint (warnings and errors pass), and their
  error reports of a full disk: lm reports that itself, as one `error:` line naming the disk and the step."""

  PATHS = (f"{os.sep}orbax{os.sep}",)
  ASYNC_PATHS = (f"{os.sep}asyncio{os.sep}",)  # Orbax's writer tasks whose failure nobody awaited any more
  # Orbax warns on every checkpoint saved between evaluations (they have no selection figure to rank by).
  ROUTINE_WARNINGS = ("Requested `tracked_metric`",)

  def filter(self, record) -> bool:
    from_library = any(path in record.pathname for path in self.PATHS)
    if from_library and str(record.msg).startswith(self.ROUTINE_WARNINGS):
      return False
    if (from_library or any(path in record.pathname for path in self.ASYNC_PATHS)) and _reports_full_disk(record):
      return False
    return record.levelno >= logging.converter.STANDARD_WARNING or not from_library


def _reports_full_disk(record) -> bool:
  from lm.core import files  # pylint: disable=g-import-not-at-top
  error = record.exc_info[1] if record.exc_info else None
  try:
    message = record.getMessage()
  except Exception:  # pylint: disable=broad-except
    message = str(record.msg)
  return files.disk_full(error) or files.disk_full(RuntimeError(message))


def _quiet_closed_loop_callbacks() -> None:
  """After a checkpoint write fails (a full disk), Orbax closes its event loop while TensorStore still
  completes the other writes; each completion's `call_soon_threadsafe` then raises "Event loop is closed",
  which TensorStore reports as an unraisable exception. Those say nothing (lm reports the failure as one
  `error:` line); every other unraisable exception reaches the previous hook."""
  previous = sys.unraisablehook

  def hook(unraisable):
    frames, traceback = [], unraisable.exc_traceback
    while traceback is not None:
      frames.append(traceback.tb_frame.f_code.co_name)
      traceback = traceback.tb_next
    if (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed" and
        "call_soon_threadsafe" in frames):
      return
    previous(unraisable)

  sys.unraisablehook = hook


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _quiet_closed_loop_callbacks()
  try:
    code = run_mode(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  sys.exit(code)


def _config_file_and_overrides(argv: list[str]) -> tuple[str | None, list[str]]:
  """The --config file and the dotted keys of its --config.KEY=VALUE overrides."""
  path, keys = None, []
  for index, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and index + 1 < len(argv):
      path = argv[index + 1]
    elif arg.startswith("--config."):
      keys.append(arg[len("--config."):].split("=", 1)[0])
  return path, keys


def _explain_override_error(argv: list[str], error: BaseException) -> str:
  """Names the --config.KEY override that does not exist, with the keys that do."""
  path, keys = _config_file_and_overrides(argv)
  if path:
    try:
      config = load_config_file(path)
      for key in keys:
        node = config
        parts = key.split(".")
        for depth, part in enumerate(parts):
          if not hasattr(node, "keys") or part not in node:
            return unknown_key_message("--config." + key, node) + (
                "" if depth else " (top level)")
          node = node[part]
    except ConfigError as config_error:
      return str(config_error)
  return f"Could not apply the --config overrides: {error}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors instead of tracebacks for bad flags."""
  path, _ = _config_file_and_overrides(argv)
  if path is not None and not os.path.isfile(path.split(":", 1)[0]):
    print(f"error: config file {path!r} does not exist. Pass one of experiments/*.py with --config.",
          file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  try:
    parsed = flags.FLAGS(argv)
    if flags.FLAGS["config"].present:
      flags.FLAGS.config.keys()  # a config file that fails to import reports its error lazily; surface it now
    return parsed
  except flags.Error as error:
    message = str(error)
  except OSError as error:  # the config file failed to load (syntax error, missing get_config)
    message = f"could not load the config file: {error}"
  except (AttributeError, KeyError, TypeError, ValueError) as error:  # raised by --config.KEY overrides
    message = _explain_override_error(argv, error)
  print(f"error: {message}\nRun `python -m lm.main --helpfull` for the flags.", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def run() -> None:
  """Console-script entry point (`lm ...`)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
