"""Every chapter notebook runs from top to bottom.

Each ``notebooks/*.ipynb`` is executed with nbclient in a fresh ``python3`` kernel (the
kernel spec ipykernel provides in the virtual environment), with ``DDREF_FAST=1`` so the
notebooks pick their small settings and ``MPLBACKEND=Agg`` so no window opens.  The
notebook is executed from a temporary copy, with a temporary working directory, so the
committed file (and its saved full-mode outputs) is never touched and nothing a
notebook writes lands in the repository.  A cell that raises fails the test with that
cell's source and traceback.
"""

import pathlib
import re
import shutil

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("DDREF_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    copy = tmp_path / path.name
    shutil.copyfile(path, copy)
    notebook = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    failure = None
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        failure = f"{path.name}: a cell raised an error\n{_plain(error)}"
    except nbclient.exceptions.CellTimeoutError as error:
        failure = f"{path.name}: a cell ran longer than {CELL_TIMEOUT_S} s\n{_plain(error)}"
    if failure:
        pytest.fail(failure, pytrace=False)


def _plain(error) -> str:
    """The error's text without the terminal colour codes IPython puts in tracebacks."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(error))


# a code line (not a comment) that draws: pyplot, ddref.plot, a figure or axes object
DRAWS = re.compile(r"^(?!\s*#).*(\bplt\.|\bplot\.\w+\(|\bfig\b|\bax\.|\baxes\b|\.imshow\()", re.M)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_saved_outputs_show_the_figures(path):
    """A chapter is read on GitHub as it was saved: every cell whose code draws must carry its
    picture (an image/png output), i.e. the notebook was saved executed with the inline
    backend (not MPLBACKEND=Agg, which draws nothing into the notebook)."""
    notebook = nbformat.read(path, as_version=4)
    missing = [f"cell {i}: {cell.source.splitlines()[0][:70]!r}"
               for i, cell in enumerate(notebook.cells)
               if cell.cell_type == "code" and DRAWS.search(cell.source)
               and not any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))]
    assert not missing, (f"{path.name} is saved without the figures of " + "; ".join(missing)
                         + ": execute it with the inline backend and save it again")
