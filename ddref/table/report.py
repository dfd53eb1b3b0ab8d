"""The table's outputs from the stored cells: ``table.json``, ``table.md`` and ``table.png``.

:func:`collect` flattens every stored row with what made it (seed, cell, command);
:func:`markdown` lays them out as methods × init modes per setting, marking with † a
baseline the distilled set does not beat; :func:`figure` draws the same as bars.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

import ddref
from ddref.saved import write_atomically
from ddref.table.cells import stored_result, write_json_atomic
from ddref.table.grids import LABELS, METHODS, TRAINING_METHODS, _n_images


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
