"""Runs every notebook in notebooks/ top to bottom in a fresh kernel, as a reader would.

Each notebook reads LM_NOTEBOOK_STEPS (a short run here) and LM_NOTEBOOK_WORKDIR
(a temporary folder here, so the test never touches runs/). The kernel is the
`python3` kernelspec that `make install` puts into the venv.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbclient
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
NOTEBOOK_STEPS = 30
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # IPython colors its tracebacks


def test_notebooks_are_stored_without_outputs():
  assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"
  for path in NOTEBOOKS:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3", path.name
    stored = [index for index, cell in enumerate(notebook.cells)
              if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not stored, f"{path.name}: code cells {stored} hold outputs; clear them before committing."


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
  # The kernel is a child process: it inherits os.environ as it is when the client starts it.
  monkeypatch.setenv("LM_NOTEBOOK_STEPS", str(NOTEBOOK_STEPS))
  monkeypatch.setenv("LM_NOTEBOOK_WORKDIR", str(tmp_path / "workdir"))
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  try:
    client.execute()
  except CellExecutionError as error:
    # The message holds the failing cell's source and its traceback.
    pytest.fail(f"{path.name} failed:\n{ANSI_ESCAPE.sub('', str(error))}", pytrace=False)
