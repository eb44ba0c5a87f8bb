"""The architecture's rules, checked: layers without upward imports or cycles, and one place that names tasks.

The layers are `.importlinter`'s contract (docs/architecture.md); `lint-imports`
counts every import, those inside functions too. Each rule is also shown to
fail on code that breaks it, so a contract that checks nothing cannot pass.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lm.config import base_config
from lm.experiment import registry
from tests.helpers import ROOT, SHARED

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
  """`lint-imports` on the `lm` package under `root` with the project's contract (no cache: it sees edits)."""
  env = dict(os.environ, PYTHONPATH=str(root), COLUMNS="250")  # one line per contract in the report
  return subprocess.run([str(LINT_IMPORTS), str(ROOT / ".importlinter"), "--no-cache"], cwd=root, env=env,
                        capture_output=True, text=True, timeout=120)


def test_the_layers_contract_holds():
  result = lint_imports(ROOT)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    # An engine module reaching up into a task (inside a function, where cycles used to hide).
    ("lm/train/loop.py", "def _upward():\n  from lm.tasks import lm as _lm  # noqa\n", "Layers"),
    # Two L1 siblings that must stay independent.
    ("lm/data/pipeline.py", "from lm.stats import bootstrap as _bootstrap  # noqa\n", "Layers"),
    # A cycle inside one package.
    ("lm/data/stream_base.py", "def _cycle():\n  from lm.data import stream as _stream  # noqa\n", "cycles"),
])
def test_the_contract_catches_an_import_that_breaks_it(tmp_path, module, line, broken):
  shutil.copytree(ROOT / "lm", tmp_path / "lm", ignore=shutil.ignore_patterns("__pycache__"))
  with open(tmp_path / module, "a") as f:
    f.write("\n\n" + line)
  result = lint_imports(tmp_path)
  assert result.returncode != 0
  assert any(broken in line and line.rstrip().endswith("BROKEN") for line in result.stdout.splitlines()), (
      result.stdout[-3000:])


def test_no_import_cycle_counting_every_import():
  """The project's own counter (../shared/tools/import_cycles.py), which counts imports inside functions too."""
  tool = SHARED / "tools" / "import_cycles.py"
  if not tool.exists():
    pytest.skip("../shared/tools/import_cycles.py is not beside the checkout")
  result = subprocess.run([sys.executable, str(tool), "lm"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout
  assert result.stdout.strip().splitlines()[-1].startswith("0 import cycles")


def _task_names_compared(source: str) -> list[tuple[int, set[str]]]:
  """Lines comparing something with a task's name (== "vae", in ("lm", "gan"), ...)."""
  names = set(registry.TASKS)

  def literals(node) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      return {node.value} & names
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
      return set().union(*(literals(element) for element in node.elts))
    return set()

  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Compare):
      compared = set().union(literals(node.left), *(literals(other) for other in node.comparators))
      if compared:
        found.append((node.lineno, compared))
  return found


def test_task_names_are_compared_only_in_the_registry():
  offenders = {}
  for path in sorted((ROOT / "lm").rglob("*.py")):
    if path == ROOT / "lm" / "experiment" / "registry.py":
      continue
    found = _task_names_compared(path.read_text())
    if found:
      offenders[str(path.relative_to(ROOT))] = found
  assert offenders == {}, f"compare tasks by capability (lm.tasks.base.Task), not by name: {offenders}"
  # The scan itself finds such a comparison.
  assert _task_names_compared('if config.head == "vae" or kind in ("gan", "x"):\n  pass\n') == [
      (1, {"vae"}), (1, {"gan"})]


def test_every_registered_task_is_complete():
  config = base_config()
  for name, cls in registry.TASKS.items():
    assert cls.name == name
    for method in ("build_model", "init_params", "updates", "make_eval_step", "summarize", "sample"):
      assert getattr(cls, method) is not getattr(registry.Task, method), (name, method)
    if cls.CONFIG is not None:  # a task's own group is in the composed config
      assert all(key.split(".")[0] in config for key in cls.CONFIG.fields)


def test_configs_do_not_share_their_placeholders():
  """Two configs from base_config() are independent, placeholders (None until set) included."""
  first, second = base_config(), base_config()
  first.model.vocab_size = 512
  first.vae.encoder_layers = 2
  assert second.model.vocab_size is None and second.vae.encoder_layers is None
  assert base_config().model.vocab_size is None
