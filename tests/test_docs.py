"""Every `python -m lm.main` command in README.md and docs/ parses and validates as written.

Each command's flags go through the CLI's own flag definitions (a fresh absl
FlagValues per command, so `--config.KEY=VALUE` is converted exactly as on
the command line), then `validate(config, mode)`: a renamed key, a value of
the wrong type, a mode that does not exist or a combination a task refuses
fails here. The runs themselves are the other tests' (integration, heads,
online, interop); this is the dry run of what a reader copies.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from lm import main as main_lib
from lm.config import validate
from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:^|\s|`)python -m lm\.main\b")


def _commands(path: Path) -> list[tuple[int, str]]:
  """(line number, command) of every `python -m lm.main` invocation, continuation lines joined."""
  lines = path.read_text().splitlines()
  found, index = [], 0
  while index < len(lines):
    line = lines[index]
    if COMMAND.search(line):
      start, text = index + 1, line
      while text.rstrip().endswith("\\") and index + 1 < len(lines):
        index += 1
        text = text.rstrip()[:-1] + " " + lines[index].strip()
      command = text[COMMAND.search(text).start():].strip().lstrip("`")
      found.append((start, command.split("`")[0].split(" #")[0].strip()))
    index += 1
  return found


# A synopsis, not a command: `--config experiments/NAME.py ... [--config.KEY=VALUE ...] [--mode A|B]`.
SYNOPSIS = ("NAME.py", "KEY=VALUE", "|")


def _cases():
  for page in PAGES:
    for line, command in _commands(page):
      if not any(mark in command for mark in SYNOPSIS):
        yield pytest.param(command, id=f"{page.relative_to(ROOT)}:{line}")


def test_the_pages_show_commands():
  assert len(list(_cases())) >= 20
  assert (ROOT / "README.md").stat().st_size <= 12 * 1024, "README.md is the front door: keep it <= 12 KB"


@pytest.mark.parametrize("command", list(_cases()))
def test_command_parses_and_validates(command):
  argv = shlex.split(command)
  argv = argv[argv.index("lm.main"):]  # ["lm.main", flags...]
  argv = [arg.strip("[]") for arg in argv]  # optional parts are written [--flag=VALUE]: check them too
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  flags.DEFINE_enum("mode", "train", list(main_lib.MODES), "", flag_values=values)
  path, _ = main_lib._config_file_and_overrides(argv)  # pylint: disable=protected-access
  assert path and (ROOT / path.split(":", 1)[0]).is_file(), f"no experiment file in: {command}"
  values(argv)
  config = values.config
  assert values.workdir or values.mode == "bench", f"--workdir is missing: {command}"
  validate(config, values.mode)
