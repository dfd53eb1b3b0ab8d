"""Running a grid: the cells the run folder lacks, in parallel through joblib.

:func:`run_grid` checks the grid and the ``--out`` folder, drops stale cells, computes the
missing ones longest first over ``jobs`` joblib workers (any joblib backend: processes,
dask, ray), then writes the table, JSON and figure (:mod:`ddref.table.report`).  A killed
run loses at most the cells in progress.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ddref.table.cells import run_cell, stored_result
from ddref.table.grids import _catalogue, check_grid
from ddref.table.report import write_outputs


def worker_count(jobs, n_cells):
    """joblib workers for ``n_cells`` cells: ``jobs`` (−1: every CPU), never more than the
    cells or the CPUs (an idle worker costs a process and its memory)."""
    cpus = os.cpu_count() or 1
    wanted = cpus if jobs == -1 else jobs
    return max(1, min(wanted, n_cells, cpus))


def check_out(out):
    """``out`` must be a folder (or creatable as one) that takes files, before any cell runs."""
    from ddref.saved import SavedFileError, check_folder_writable

    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise SavedFileError(f"--out {out}: {parent} is a file, not a folder; choose another --out.")
    check_folder_writable(out / "cells", "--out folder",
                          fix="make it writable or choose another --out")


def select(cells, only):
    """The cells whose name matches one of the comma-separated glob patterns ``only``."""
    if not only:
        return cells
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"--only {only!r} matches no cell; cell names look like {cells[0].name!r}.")
    return chosen


def run_grid(grid, out, jobs=1, only=None, progress=True, log=print):
    """Compute the cells of ``grid`` that ``out`` lacks (in parallel over ``jobs`` joblib
    workers), then write the table, JSON and figure from every stored cell.  Returns the
    names of the cells computed now."""
    from joblib import Parallel, delayed

    check_grid(grid)
    out = Path(out)
    check_out(out)
    cells = select(grid.cells(), only)
    missing = [c for c in cells if stored_result(grid, c, out) is None]
    jobs = worker_count(jobs, len(missing))
    log(f"{len(cells) - len(missing)} of {len(cells)} cells already in {out}/cells; "
        f"computing {len(missing)} with {jobs} job(s)")
    for cell in missing:   # stale or half-made: start the cell afresh
        stale = out / "cells" / cell.name
        if (stale / "result.json").exists():
            shutil.rmtree(stale)
    missing.sort(key=expected_cost, reverse=True)   # longest first: the last worker idles least
    computed = []
    if missing:
        results = Parallel(n_jobs=jobs, return_as="generator_unordered")(
            delayed(run_cell)(grid, cell, str(out), progress and jobs == 1) for cell in missing)
        for name in tqdm(results, total=len(missing), desc="cells", disable=not progress):
            computed.append(name)
            cell_done(name)
    write_outputs(grid, out)
    log(f"wrote {out}/table.md, table.json and table.png")
    return computed


def expected_cost(cell):
    """A rough order of a cell's cost: distillation dominates, then the image size."""
    pixels = int(np.prod(_catalogue()[cell.setting.dataset]["image_shape"]))
    return (cell.method == "distilled") * cell.setting.iterations * pixels + pixels


def cell_done(name):
    """Called in the main process as each cell finishes (a hook for progress and tests)."""
