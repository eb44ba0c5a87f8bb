r"""Command-line entry point: `python -m lm.main` or the `lm` console script.

  python -m lm.main --config experiments/shakespeare_char.py --workdir runs/x \
      [--config.KEY=VALUE ...] [--mode train|online|eval|sample|bench|crossval|ab|export]

Everything here is flag parsing and error reporting; the work is done by
importable functions (lm.train.loop.train, lm.run_modes.*, lm.train.bench).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lm import config as config_lib
from lm import distributed
from lm import xla_flags
from lm.core.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/NAME.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tokenizer, config.")
_MODE = flags.DEFINE_enum("mode", "train", list(config_lib.MODES), "What to do.")
flags.mark_flags_as_required(["config"])

# Errors a user can fix; anything else is a bug and keeps its traceback.
EXIT_USER_ERROR = 2


def run_mode(config, workdir: str | None, mode: str) -> int:
  """Runs one mode; returns the process exit code."""
  if mode != "bench" and not workdir:
    raise config_lib.ConfigError(f"--mode {mode} needs --workdir (the run directory).")
  # XLA reads its flags once, when JAX starts its backends: the presets go first.
  try:
    logging.info("%s", xla_flags.apply(config.xla.preset, config.xla.flags).summary())
  except config_lib.ConfigError:
    if config.xla.preset != "auto" or config.xla.flags or not xla_flags.backends_started():
      raise  # asked for explicitly: an error rather than flags silently not applied
    logging.warning("JAX already started (e.g. earlier in this notebook): XLA flag preset auto not applied. "
                    "Call lm.xla_flags.apply() before the first JAX computation to use it.")
  cluster = distributed.initialize(config.distributed)  # before anything touches a device
  import jax  # pylint: disable=g-import-not-at-top
  from lm import run_modes  # pylint: disable=g-import-not-at-top
  from lm.train import bench, loop
  if jax.process_index() != 0:
    logging.set_verbosity(logging.ERROR)  # logs, metrics and progress come from process 0
  elif cluster.how != "single":
    logging.info("Process 0 of %d (%s start-up); %d devices in all.", jax.process_count(), cluster.how,
                 jax.device_count())
  report = print if jax.process_index() == 0 else (lambda *args, **kwargs: None)
  if mode == "train":
    result = loop.train(config, workdir)
    summary = {"step": result.step, "train/loss": result.train_loss, "eval/loss": result.eval_loss}
    report(json.dumps(summary))
    if result.interrupted:
      logging.warning("Stopped by %s at step %d; the checkpoint is saved. Rerun the same command to resume.",
                      result.interrupted, result.step)
      return 0 if result.interrupted == "SIGTERM" else 128 + 2
    return 0
  if mode == "online":
    from lm.online import loop as online_loop  # pylint: disable=g-import-not-at-top
    outcome = online_loop.run_online(config, workdir)
    report(json.dumps({"chunks": outcome.chunks_done, "step": outcome.step, **{
        key: outcome.continual.get(key) for key in ("avg_loss", "forgetting", "bwt", "fwt")}}))
    return 0 if outcome.interrupted in (None, "SIGTERM") else 128 + 2
  if mode == "eval":
    report(json.dumps(run_modes.evaluate_checkpoint(config, workdir)))
    return 0
  if mode == "crossval":
    from lm.train import crossval  # pylint: disable=g-import-not-at-top
    outcome = crossval.crossval(config, workdir)
    report(json.dumps(crossval.summary_line(outcome), ensure_ascii=False))
    return 0 if outcome.get("interrupted") in (None, "SIGTERM") else 128 + 2
  if mode == "ab":
    outcome = run_modes.ab_test(config, workdir)
    keys = ("accuracy", "macro_f1", "mcnemar") if outcome["head"] == "classifier" else (
        "a", "b", "difference", "lower", "upper", "p_value")
    report(json.dumps({key: outcome[key] for key in keys}))
    return 0
  if mode == "export":
    report(json.dumps(run_modes.export_checkpoint(config, workdir)))
    return 0
  if mode == "sample":
    for index, text in enumerate(run_modes.sample_checkpoint(config, workdir)):
      # Samples of a prompts file or a beam search say which prompt (and score) each one is.
      about = []
      if config.sample.prompts_file and hasattr(text, "prompt_index"):
        about.append(f"prompt {text.prompt_index}, {text.where}")
      if getattr(text, "score", None) is not None:
        about.append(f"score {text.score:.4f}")
      report(f"--- sample {index}{' (' + '; '.join(about) + ')' if about else ''} ---\n{text}")
    return 0
  figures = bench.benchmark(config, workdir or "")
  report(json.dumps(figures))
  return 0


class _QuietLibraries:
  """Drops INFO lines of the libraries that narrate every checkpoint (warnings and errors pass)."""

  PATHS = (f"{os.sep}orbax{os.sep}",)
  # Orbax warns on every checkpoint saved between evaluations (they have no selection figure to rank by).
  ROUTINE_WARNINGS = ("Requested `tracked_metric`",)

  def filter(self, record) -> bool:
    from_library = any(path in record.pathname for path in self.PATHS)
    if from_library and str(record.msg).startswith(self.ROUTINE_WARNINGS):
      return False
    return record.levelno >= logging.converter.STANDARD_WARNING or not from_library


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
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
      config = config_lib.load_config(path)
      for key in keys:
        node = config
        parts = key.split(".")
        for depth, part in enumerate(parts):
          if not hasattr(node, "keys") or part not in node:
            return config_lib.unknown_key_message("--config." + key, node) + (
                "" if depth else " (top level)")
          node = node[part]
    except config_lib.ConfigError as config_error:
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
