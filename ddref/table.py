"""The results table (chapter 8): data set × model × init mode × method, one run folder per cell.

    ddref table --grid readme --jobs 2          # the README's results
    ddref table --grid small --out /tmp/small   # a tiny grid, in seconds

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
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import ddref
from ddref import baselines, data, nn
from ddref.evaluate import Accuracy, accuracy_on, held_out_inits, train_full
from ddref.saved import write_atomically

TRAINING_METHODS = ("distilled", "random_real", "optimised_real", "kmeans", "average")
METHODS = TRAINING_METHODS + ("full_data",)
LABELS = {"distilled": "distilled", "random_real": "random real", "optimised_real": "optimised real",
          "kmeans": "k-means", "average": "class average", "full_data": "full training data"}


# ---------------------------------------------------------------------------- the grids


@dataclass(frozen=True)
class Setting:
    """One data set and model: the distilled set's shape and how it is distilled."""

    dataset: str
    model: str
    steps: int = 10
    epochs: int = 3
    images_per_class: int = 1
    iterations: int = 1000
    distill: dict = field(default_factory=dict)   # further DistillConfig fields
    full_epochs: int = 15                          # full_data: epochs of Adam on the training split


@dataclass(frozen=True)
class Grid:
    """Settings × init modes × methods, and how many draws/networks each number averages."""

    name: str
    settings: tuple
    inits: tuple = ("fixed", "random")
    methods: tuple = METHODS
    n_draws: int = 10          # baseline draws; random init: held-out networks (draw i ↔ net i)
    tune_draws: int = 3        # draws the baselines' lr is tuned on (training split)
    n_candidates: int = 20     # optimised real: random draws ranked on the training split
    score_nets: int = 3        # optimised real, random init: networks that rank them
    kmeans_draws: int = 3      # k-means seeds (recycled over the networks)
    full_data_nets: int = 3    # full_data, random init: networks trained on all the data
    seed: int = 0
    dtype: str = "float32"
    notes: tuple = ()          # how this grid departs from the paper's settings (in the table)

    def cells(self):
        return [Cell(s, init, method) for s in self.settings for init in self.inits
                for method in self.methods]


@dataclass(frozen=True)
class Cell:
    setting: Setting
    init: str
    method: str

    @property
    def name(self):
        return f"{self.setting.dataset}-{self.setting.model}-{self.init}-{self.method}"


# The settings, in one place.  'readme': the README's results (benchmarks/reproduce.sh's
# distillation settings, 10 steps × 3 epochs, one image per class per step); 'small': seconds.
GRIDS = {
    "readme": Grid("readme", settings=(
        Setting("digits", "mlp", steps=10, epochs=3, iterations=2000,
                distill={"decay_every": 800}, full_epochs=30),
        Setting("mnist5k", "lenet", steps=10, epochs=3, iterations=600,
                distill={"batch_size": 1024, "decay_every": 240}, full_epochs=15),
    ), notes=(
        "mnist5k / lenet: 600 outer iterations (Adam's lr halved every 240) instead of the "
        "1,000 (every 400) of benchmarks/reproduce.sh, to fit one evening on 2 shared cores.",
        "mnist5k is 4,000 training / 1,000 test images of MNIST; the paper uses all 60,000 / "
        "10,000, so its numbers are a guide here, not a target.",
        "k-means: 3 seeds, recycled over the 10 networks; optimised real: the best 10 of 20 "
        "random draws, ranked on the training split by 1 network (fixed init) or 3 (random); "
        "full training data: 3 networks under random init.",
    )),
    "small": Grid("small", settings=(
        Setting("digits", "mlp", steps=2, epochs=1, iterations=200,
                distill={"batch_size": 128}, full_epochs=2),
    ), n_draws=2, tune_draws=2, n_candidates=3, score_nets=2, kmeans_draws=1, full_data_nets=2),
}


def check_grid(grid):
    """Raise ValueError with one sentence for a grid that cannot run."""
    from ddref.distill import INIT_MODES

    for init in grid.inits:
        if init not in INIT_MODES:
            raise ValueError(f"grid {grid.name!r}: init mode {init!r} is not one of {INIT_MODES}.")
    for method in grid.methods:
        if method not in METHODS:
            raise ValueError(f"grid {grid.name!r}: method {method!r} is not one of {METHODS}.")
    for name in ("n_draws", "tune_draws", "n_candidates", "score_nets", "kmeans_draws", "full_data_nets"):
        if getattr(grid, name) < 1:
            raise ValueError(f"grid {grid.name!r}: {name} must be at least 1.")
    if grid.tune_draws > grid.n_draws or grid.n_draws > grid.n_candidates:
        raise ValueError(f"grid {grid.name!r}: need tune_draws ≤ n_draws ≤ n_candidates.")
    catalogue = {row["name"]: row for row in data.list_datasets()}
    for setting in grid.settings:
        distill_config(grid, setting, grid.inits[0]).validate()
        if setting.dataset not in catalogue:
            raise ValueError(f"grid {grid.name!r}: unknown data set {setting.dataset!r}; "
                             f"`ddref datasets` lists them.")
        entry = catalogue[setting.dataset]
        if not entry["available"]:
            raise data.DataError(f"grid {grid.name!r} needs {setting.dataset}, which is not "
                                 f"available: {entry['how']}.")
        nn.build_model(setting.model, entry["image_shape"], entry["num_classes"])  # fits the images?
    return grid


# ---------------------------------------------------------------------------- one cell


def distill_config(grid, setting, init):
    from ddref.distill import DistillConfig

    return DistillConfig.from_dict({
        "dataset": setting.dataset, "model": setting.model, "init": init, "steps": setting.steps,
        "epochs": setting.epochs, "images_per_class": setting.images_per_class,
        "iterations": setting.iterations, "seed": grid.seed, "dtype": grid.dtype,
        "eval_every": 0, "eval_inits": grid.n_draws, **setting.distill})


def evaluation_inits(config, dataset, model, n):
    """The networks every method of a column is trained from: the distillation's θ0 (fixed
    init), or the ``n`` held-out initialisations its evaluation uses (random init)."""
    from ddref.distill import Distiller

    if config.init == "fixed":
        return [Distiller(config, dataset, progress=False).theta0]
    return held_out_inits(model, n, config.seed, config.dtype)


def cell_settings(grid, cell):
    """Everything a cell's numbers depend on; a stored result with other settings is stale."""
    grid_fields = {k: v for k, v in dataclasses.asdict(grid).items()
                   if k not in ("name", "settings", "inits", "methods", "notes")}
    return {"cell": cell.name, "setting": dataclasses.asdict(cell.setting), "init": cell.init,
            "method": cell.method, **grid_fields, "version": ddref.__version__}


def run_cell(grid, cell, out, progress=False):
    """Compute one cell and write ``OUT/cells/NAME/result.json`` atomically; returns its name.
    ``progress``: show the distillation's progress bar (sensible with one job only)."""
    folder = Path(out) / "cells" / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    config = distill_config(grid, cell.setting, cell.init)
    dataset = data.load(config.dataset, dtype=config.dtype)
    model = nn.build_model(config.model, dataset.image_shape, dataset.num_classes)
    start = time.perf_counter()
    compute = _distilled_rows if cell.method == "distilled" else (
        _full_data_rows if cell.method == "full_data" else _baseline_rows)
    rows = compute(grid, cell, config, dataset, model, folder, progress)
    result = {"settings": cell_settings(grid, cell), "rows": rows,
              "seconds": round(time.perf_counter() - start, 2)}
    write_json_atomic(folder / "result.json", result)
    return cell.name


def _row(accuracy: Accuracy, **extra):
    return {"mean": accuracy.mean, "std": accuracy.std, "n": accuracy.n, **extra}


def _distilled_rows(grid, cell, config, dataset, model, folder, progress):
    from ddref.distill import Distiller

    checkpoint = folder / "checkpoint.npz"
    distiller = None
    if checkpoint.exists():   # a killed cell continues where its last checkpoint left it
        distiller = Distiller.from_checkpoint(checkpoint, dataset, progress=progress)
        if distiller.config.to_dict() != config.to_dict():
            distiller = None
    distiller = (distiller or Distiller(config, dataset, progress=progress)).run(checkpoint_path=checkpoint)
    distilled = distiller.distilled_set()
    distilled.save(folder / "distilled.npz")
    nn_accuracy = baselines.nearest_neighbour_accuracy(distilled.images, distilled.labels,
                                                       dataset.x_test, dataset.y_test)
    return {"distilled": _row(distiller.accuracy(n_inits=grid.n_draws)),
            "knn_distilled": _row(Accuracy.of([nn_accuracy]))}


def _baseline_rows(grid, cell, config, dataset, model, folder, progress):
    from ddref.distill import distilled_labels

    labels = distilled_labels(dataset.num_classes, config.images_per_class)
    inits = evaluation_inits(config, dataset, model, grid.n_draws)
    score_inits = inits if config.init == "fixed" else baselines.scoring_inits(
        model, grid.score_nets, config.seed, config.dtype)
    result = baselines.run_baseline(
        cell.method, model, dataset, config.steps, config.epochs, labels, inits,
        n_draws=grid.n_draws, seed=config.seed, tune_draws=grid.tune_draws,
        n_candidates=grid.n_candidates, score_inits=score_inits, kmeans_draws=grid.kmeans_draws,
        momentum=config.momentum)
    return {cell.method: _row(result.training, lr=result.lr),
            f"knn_{cell.method}": _row(result.nearest_neighbour)}


def _full_data_rows(grid, cell, config, dataset, model, folder, progress):
    inits = evaluation_inits(config, dataset, model, grid.full_data_nets)
    accs = [accuracy_on(model.apply, train_full(model, dataset, epochs=cell.setting.full_epochs,
                                                seed=config.seed, theta0=theta0, progress=False),
                        dataset.x_test, dataset.y_test) for theta0 in inits]
    return {"full_data": _row(Accuracy.of(accs))}


def write_json_atomic(path, value):
    """Write JSON so that a crash never leaves a half-written file where a result should be
    (a full or unwritable disk is one sentence naming the file, and no temporary file stays)."""
    write_atomically(path, lambda f: json.dump(value, f, indent=1), mode="w")


# ---------------------------------------------------------------------------- the grid


def stored_result(grid, cell, out):
    """The cell's stored result, or None when it is missing or was made with other settings;
    a damaged file is one sentence naming it and the fix (:func:`check_result`)."""
    path = Path(out) / "cells" / cell.name / "result.json"
    if not path.exists():
        return None
    result = check_result(path)
    return result if result["settings"] == cell_settings(grid, cell) else None


def check_result(path):
    """A cell's ``result.json`` as written by :func:`run_cell`: {"settings": {…}, "rows":
    {method: {"mean", "std", "n", …}}, "seconds": s}, else a :class:`SavedFileError`."""
    from ddref.saved import SavedFileError

    def damaged(why):
        return SavedFileError(f"{path} is damaged ({why}); delete the folder {path.parent} and "
                              f"run the same command again to recompute that cell.")

    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise damaged(f"not readable JSON: {error.__class__.__name__}") from None
    if not isinstance(result, dict) or not isinstance(result.get("settings"), dict):
        raise damaged("no settings object")
    if not isinstance(result.get("rows"), dict) or not result["rows"]:
        raise damaged("no rows")
    for method, row in result["rows"].items():
        numbers = isinstance(row, dict) and all(
            isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)
            for k in ("mean", "std", "n"))
        if not numbers:
            raise damaged(f"row {method!r} lacks a numeric mean, std and n")
    if not isinstance(result.get("seconds"), (int, float)):
        raise damaged("no seconds")
    return result


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


# ---------------------------------------------------------------------------- outputs


def collect(grid, out):
    """Every stored row of the grid's cells, flattened, with what made it."""
    rows = []
    for cell in grid.cells():
        result = stored_result(grid, cell, out)
        if result is None:
            continue
        for method, row in result["rows"].items():
            kind = "nearest_neighbour" if method.startswith("knn_") else "training"
            rows.append({"dataset": cell.setting.dataset, "model": cell.setting.model,
                         "init": cell.init, "method": method.removeprefix("knn_"), "kind": kind,
                         **row, "seed": grid.seed, "cell": cell.name,
                         "n_images": _n_images(cell.setting) if method != "full_data" else None,
                         "seconds": result["seconds"],
                         "command": f"ddref table --grid {grid.name} --only {cell.name}"})
    return rows


def _catalogue():
    return {row["name"]: row for row in data.list_datasets()}


def _n_images(setting):
    return setting.steps * setting.images_per_class * _catalogue()[setting.dataset]["num_classes"]


def write_outputs(grid, out):
    out = Path(out)
    rows = collect(grid, out)
    missing = [c.name for c in grid.cells() if stored_result(grid, c, out) is None]
    table = {"grid": grid.name, "command": grid_command(grid, out), "version": ddref.__version__,
             "settings": dataclasses.asdict(grid), "missing_cells": missing, "rows": rows}
    write_json_atomic(out / "table.json", table)
    write_atomically(out / "table.md", lambda f: f.write(markdown(grid, rows, missing)), mode="w")
    figure(grid, rows, out / "table.png")


def grid_command(grid, out):
    """The command that makes ``out``'s table (``--out`` only where it is not the default)."""
    default = Path("results" if grid.name == "readme" else f"results/{grid.name}")
    where = "" if Path(out).resolve() == default.resolve() else f" --out {out}"
    return f"ddref table --grid {grid.name}{where}"


def _find(rows, setting, init, method, kind):
    for r in rows:
        if (r["dataset"], r["model"], r["init"], r["method"], r["kind"]) == (
                setting.dataset, setting.model, init, method, kind):
            return r
    return None


def _fmt(row):
    if row is None:
        return "—"
    text = f"{100 * row['mean']:.1f}"
    return text + (f" ± {100 * row['std']:.1f}" if row["n"] > 1 else "")


def markdown(grid, rows, missing=()):
    """The table in markdown: for each data set and model, methods × init modes."""
    lines = [f"# Results (`ddref table --grid {grid.name}`)", "",
             f"Test accuracy in %, mean ± std over n networks/draws (n in `table.json`); ddref "
             f"{ddref.__version__}, {grid.dtype}, seed {grid.seed}.  Baselines use the distilled "
             f"set's steps, epochs, labels and networks; † marks a baseline at equal image count "
             f"that the distilled set (trained on) does not beat.", ""]
    notes = []
    for s in grid.settings:
        n = _n_images(s)
        lines += [f"## {s.dataset} / {s.model}: {s.steps} steps × {s.epochs} epochs, {n} images, "
                  f"{s.iterations} iterations", "",
                  "| method | " + " | ".join(f"{i} init" for i in grid.inits) + " |",
                  "|---|" + "---|" * len(grid.inits)]
        for kind, methods in (("training", METHODS), ("nearest_neighbour", TRAINING_METHODS)):
            for method in methods:
                if method not in grid.methods:
                    continue
                label = LABELS[method] + (" (1-NN)" if kind == "nearest_neighbour" else "")
                cells = []
                for init in grid.inits:
                    row = _find(rows, s, init, method, kind)
                    distilled = _find(rows, s, init, "distilled", "training")
                    beaten = (row is None or distilled is None
                              or method in ("distilled", "full_data")
                              or distilled["mean"] > row["mean"])
                    cells.append(_fmt(row) + ("" if beaten else " †"))
                    if not beaten:
                        notes.append((s.dataset, s.model, init, f"{label} {_fmt(row)}",
                                      _fmt(distilled)))
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if notes:
        lines += ["† Where the distilled set does not beat a baseline:", ""]
        settings = [(s.dataset, s.model) for s in grid.settings]
        in_grid_order = sorted(dict.fromkeys((n[0], n[1], n[2], n[4]) for n in notes),
                               key=lambda k: (settings.index(k[:2]), grid.inits.index(k[2])))
        for (dataset, model, init, distilled) in in_grid_order:
            beating = "; ".join(n[3] for n in notes if (n[0], n[1], n[2]) == (dataset, model, init))
            lines.append(f"- {dataset}/{model}, {init} init (distilled {distilled}): {beating}")
        lines.append("")
    if grid.notes:
        lines += ["Departures from the paper's settings:", ""]
        lines += [f"- {note}" for note in grid.notes]
        lines.append("")
    if missing:
        lines += [f"Cells not yet computed: {', '.join(missing)}.", ""]
    lines += ["Each cell: `ddref table --grid " + grid.name + " --only CELL` (see `command` in "
              "`table.json`).", ""]
    return "\n".join(lines)


def figure(grid, rows, path):
    """Bars per method (training data, then 1-NN), one colour per init mode, ± std; a dashed
    line in each init's colour at the distilled set's accuracy."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grid.settings), figsize=(6.5 * len(grid.settings), 4.2),
                             squeeze=False, layout="constrained")
    entries = [(m, "training") for m in METHODS if m in grid.methods] + \
              [(m, "nearest_neighbour") for m in TRAINING_METHODS if m in grid.methods]
    width = 0.8 / len(grid.inits)
    for ax, s in zip(axes[0], grid.settings):
        for k, init in enumerate(grid.inits):
            found = [_find(rows, s, init, m, kind) for m, kind in entries]
            x = np.arange(len(entries)) + (k - (len(grid.inits) - 1) / 2) * width
            means = [100 * r["mean"] if r else np.nan for r in found]
            stds = [100 * r["std"] if r else 0 for r in found]
            bars = ax.bar(x, means, width, yerr=stds, capsize=2, label=f"{init} init", alpha=0.9)
            distilled = _find(rows, s, init, "distilled", "training")
            if distilled:   # a bar above its init's line is a baseline the distilled set does not beat
                ax.axhline(100 * distilled["mean"], color=bars.patches[0].get_facecolor(), lw=0.9,
                           ls="--", alpha=0.8)
        split = sum(kind == "training" for _, kind in entries) - 0.5
        ax.axvline(split, color="gray", lw=0.8, ls=":")
        ax.text(split - 0.2, 108, "trained on ←", ha="right", va="top", fontsize=8, color="gray")
        ax.text(split + 0.2, 108, "→ 1-NN examples", ha="left", va="top", fontsize=8, color="gray")
        ax.set_xticks(np.arange(len(entries)))
        ax.set_xticklabels([LABELS[m] + ("\n(1-NN)" if kind != "training" else "")
                            for m, kind in entries], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 110)
        ax.set_yticks(range(0, 101, 20))
        ax.set_title(f"{s.dataset} / {s.model}: {_n_images(s)} images, {s.steps} steps × {s.epochs} epochs",
                     fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"ddref table --grid {grid.name}: test accuracy, mean ± std "
                 f"(dashed: the distilled set, trained on)", fontsize=10)
    from ddref.plot import save_figure

    try:
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------- the README's section

README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def readme_section(table_md, command, figure="results/table.png"):
    """The README's results block (markers included) made from ``results/table.md``: its title
    replaced by the command that made it, its headings one level under the README's
    ``## Results``, and the figure."""
    body = table_md.strip().splitlines()
    if not body or not body[0].startswith("# "):
        raise ValueError("the table's markdown must start with its '# Results' title; "
                         "regenerate it with `ddref table`.")
    lines = [README_START,
             "<!-- generated by `python -m ddref.table --readme` from results/table.md: "
             "edit neither by hand -->", "",
             f"Made by `{command}` (`results/table.md`, every number with its n, seed and "
             f"command in `results/table.json`):", ""]
    lines += ["#" + line if line.startswith("#") else line
              for line in "\n".join(body[1:]).strip().splitlines()]
    lines += ["", f"![{command}: test accuracy of every method]({figure})", "", README_END]
    return "\n".join(line.rstrip() for line in lines)


def replace_readme_section(readme_text, section):
    """``readme_text`` with the text between the markers (markers included) replaced."""
    start, end = readme_text.find(README_START), readme_text.find(README_END)
    if start < 0 or end < start or readme_text.count(README_START) != 1 \
            or readme_text.count(README_END) != 1:
        raise ValueError(f"README.md must hold one {README_START} line followed by one "
                         f"{README_END} line where the results go; add them.")
    return readme_text[:start] + section + readme_text[end + len(README_END):]


def update_readme(readme="README.md", results="results"):
    """Rewrite the README's results block from ``results/table.md`` and ``table.json``."""
    results, readme = Path(results), Path(readme)
    for path in (results / "table.md", results / "table.json", readme):
        if not path.is_file():
            raise ValueError(f"{path} does not exist; " + (
                "run `ddref table --grid readme` first." if path != readme
                else "pass --readme-path, or run from the repository's root."))
    command = json.loads((results / "table.json").read_text())["command"]
    section = readme_section((results / "table.md").read_text(), command,
                             figure=Path(os.path.relpath(results / "table.png", readme.parent)).as_posix())
    readme.write_text(replace_readme_section(readme.read_text(), section))
    return readme


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m ddref.table",
        description="Write the README's results block (between <!-- results:start --> and "
                    "<!-- results:end -->) from the committed results table.")
    parser.add_argument("--readme", action="store_true", required=True,
                        help="rewrite README.md's results block")
    parser.add_argument("--readme-path", default="README.md")
    parser.add_argument("--results", default="results", help="the folder with table.md and table.json")
    args = parser.parse_args(argv)
    try:
        print(f"wrote the results block of {update_readme(args.readme_path, args.results)}")
    except ValueError as error:
        print(f"python -m ddref.table: error: {error}", file=sys.stderr)
        return 2
    return 0


__all__ = ["GRIDS", "Grid", "Setting", "Cell", "METHODS", "run_grid", "run_cell", "write_outputs",
           "markdown", "collect", "readme_section", "update_readme"]


if __name__ == "__main__":
    raise SystemExit(main())
