"""The results table (chapter 8): data set × model × init mode × method, one run folder per cell.

    ddref table --grid readme --jobs 2          # the README's results
    ddref table --grid small --out /tmp/small   # a tiny grid, in seconds
    ddref table --grid fashion --jobs 2         # Fashion-MNIST, both protocols (≈ 45 min)

Every cell — one (data set, model, init mode, method) — is computed by :func:`run_cell` on
its own and writes ``OUT/cells/NAME/result.json`` atomically when it is done; a rerun
computes only the cells without one (or whose settings changed), so a killed run loses at
most the cells in progress.  A distilled cell also checkpoints its distillation in its folder
and resumes it.  The methods:

* ``distilled``   — Algorithm 1 (:class:`ddref.distill.Distiller`), then the distilled set
  trained on (from the run's θ0, or held-out initialisations) and used as 1-NN examples;
* ``random_real``, ``optimised_real``, ``kmeans``, ``average`` — :mod:`ddref.baselines`,
  both ways, with exactly the distilled set's steps, epochs, labels and networks;
* ``full_data``   — Adam on the whole training split (:func:`ddref.evaluate.train_full`).

A grid with ``protocols=("paper", "field")`` also judges every training method's set by the
field's protocol (:mod:`ddref.protocol`: fresh networks trained on it as an unordered pool):
a row ``field_<method>`` in the cell, kind "field" in ``table.json``, "(field protocol)" in the
table.  Two settings of one data set and model are told apart by ``Setting.tag``.

Independent cells run in parallel through joblib (``--jobs N``, processes by default).  Any
joblib backend spreads them over a cluster with no change to ddref, e.g. with dask::

    from dask.distributed import Client
    import joblib
    from ddref import table
    client = Client("scheduler-address:8786")
    with joblib.parallel_config(backend="dask"):
        table.run_grid(table.GRIDS["readme"], "results", jobs=-1)

or with ray: ``from ray.util.joblib import register_ray; register_ray()`` and
``joblib.parallel_config(backend="ray")``.  The workers need ddref installed and the data
sets available; the run folder must be on storage that every worker can write.

Outputs: ``OUT/table.md``, ``OUT/table.json`` (every number with mean, std, n, seed and the
command that made it) and ``OUT/table.png``.  The README's results section is made from the
committed ``results/table.md``, never typed: ``python -m ddref.table --readme`` rewrites the text
between ``<!-- results:start -->`` and ``<!-- results:end -->`` (tests/test_table.py fails when
the two differ).

The package in layers, each module importing only those above it in this list:

    grids   Setting, Grid, Cell, GRIDS, METHODS, check_grid, distill_config
    cells   run_cell, its result.json (write_json_atomic, stored_result, check_result)
    report  collect, markdown, figure, write_outputs
    run     run_grid over joblib workers (cell_done: the hook as each cell finishes)
    readme  the README's results block and ``python -m ddref.table --readme``
"""

from __future__ import annotations

from ddref.table.grids import (  # noqa: F401
    GRIDS, LABELS, METHODS, TRAINING_METHODS, Cell, Grid, Setting, check_grid, distill_config,
)
from ddref.table.cells import (  # noqa: F401
    cell_settings, check_result, evaluation_inits, run_cell, stored_result, write_json_atomic,
)
from ddref.table.report import collect, figure, grid_command, markdown, write_outputs  # noqa: F401
from ddref.table.run import check_out, expected_cost, run_grid, select, worker_count  # noqa: F401
from ddref.table.readme import (  # noqa: F401
    README_END, README_START, committed_tables, headline_section, main, replace_readme_section,
    update_readme,
)

__all__ = ["GRIDS", "Grid", "Setting", "Cell", "METHODS", "run_grid", "run_cell", "write_outputs",
           "markdown", "collect", "headline_section", "update_readme"]
