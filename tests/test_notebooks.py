"""The tutorial notebooks in notebooks/: stored without outputs, and executed end to end on the quick preset.

Each notebook checks its own claims in assert cells, so a notebook that runs but shows the wrong thing fails
here. The kernel is this interpreter (a kernelspec written for the test), so the notebooks import the same
gradleak and torch as the rest of the suite, whatever kernels the machine has installed.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
#: notebook -> the least number of figures (PNG outputs) it must draw
NOTEBOOKS = {"label_reco_demo": 2, "label_rec_exp": 1, "draw_pic_demo": 1, "reconstruct_demo": 1}
KERNEL_NAME = "gradleak-tests"
#: per cell, seconds; the quick preset runs each notebook in well under a minute on a 2-core machine
CELL_TIMEOUT = 600


def _load(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory) -> Path:
    """A data folder with a kernelspec that starts ipykernel with this very interpreter (a default "python3"
    spec may belong to another Python on a developer's machine); put first on JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "gradleak tests", "language": "python"}))
    return root


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_stored_without_outputs(name):
    nb = _load(name)
    nbformat.validate(nb)
    for cell in _code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip the outputs before committing"
    first = _code_cells(nb)[0].source
    assert 'os.environ.get("GRADLEAK_QUICK") == "1"' in first, f"{name}: the first code cell must read the preset"


def test_notebooks_readme_lists_every_notebook():
    text = (NOTEBOOK_DIR / "README.md").read_text()
    for name in NOTEBOOKS:
        assert f"{name}.ipynb" in text


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_runs_on_quick_preset(name, jupyter_path, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLEAK_QUICK", "1")
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(jupyter_path),
                                                                     os.environ.get("JUPYTER_PATH")])))
    # the kernel imports this checkout's gradleak even when it is not installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("MPLBACKEND", raising=False)   # a non-interactive backend would swallow the figures
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    nb = _load(name)
    # the client owns its kernel (started in workdir) and shuts it down at the end
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    client.execute()   # raises CellExecutionError, with the cell and its traceback, when a cell (or assert) fails
    elapsed = time.perf_counter() - start
    print(f"{name}: {elapsed:.1f} s")

    cells = _code_cells(nb)
    first_output = "".join(out.get("text", "") for out in cells[0].outputs if out.output_type == "stream")
    assert "preset: quick" in first_output
    figures = sum("image/png" in out.get("data", {}) for cell in cells for out in cell.outputs)
    assert figures >= NOTEBOOKS[name], f"{name} drew {figures} figures, expected at least {NOTEBOOKS[name]}"
    errors = [out for cell in cells for out in cell.outputs if out.output_type == "error"]
    assert not errors
    assert not any(workdir.iterdir()), f"{name} left files in its working directory: {list(workdir.iterdir())}"
