"""The table's outputs from the stored cells: ``table.json``, ``table.md`` and ``table.png``.

:func:`collect` flattens every stored row with what made it (seed, cell, command);
:func:`markdown` lays them out as methods × init modes per setting, marking with † a
baseline the distilled set does not beat; :func:`figure` draws the same as bars.  A grid with
the field protocol gets its rows (kind "field") after the paper's, † against the distilled
set under the same protocol, and a second row of panels in the figure.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

import ddref
from ddref.saved import write_atomically
from ddref.table.cells import stored_result, write_json_atomic
from ddref.table.grids import LABELS, METHODS, POOL_METHODS, TRAINING_METHODS, _n_images


def collect(grid, out):
    """Every stored row of the grid's cells, flattened, with what made it."""
    rows = []
    for cell in grid.cells():
        result = stored_result(grid, cell, out)
        if result is None:
            continue
        for method, row in result["rows"].items():
            kind, method = row_kind(method)
            tag = {"tag": cell.setting.tag} if cell.setting.tag else {}
            rows.append({"dataset": cell.setting.dataset, "model": cell.setting.model, **tag,
                         "init": cell.init, "method": method, "kind": kind,
                         **row, "seed": grid.seed, "cell": cell.name,
                         "n_images": _n_images(cell.setting) if method != "full_data" else None,
                         "seconds": result["seconds"],
                         "command": f"ddref table --grid {grid.name} --only {cell.name}"})
    return rows


def row_kind(name):
    """(kind, method) of a cell's row name: ``knn_M`` → nearest_neighbour, ``field_M`` → field
    (the field's protocol), else training (the paper's protocol)."""
    for prefix, kind in (("knn_", "nearest_neighbour"), ("field_", "field")):
        if name.startswith(prefix):
            return kind, name.removeprefix(prefix)
    return "training", name


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
        if (r["dataset"], r["model"], r.get("tag", ""), r["init"], r["method"], r["kind"]) == (
                setting.dataset, setting.model, setting.tag, init, method, kind):
            return r
    return None


def row_groups(grid):
    """(kind, methods, label suffix) of the table's rows, in order: the paper's protocol, 1-NN,
    then the field's protocol when the grid has it."""
    paper = [m for m in METHODS if m not in POOL_METHODS]      # pools have no paper's protocol
    groups = [("training", paper, ""), ("nearest_neighbour", TRAINING_METHODS, " (1-NN)")]
    if "field" in grid.protocols:
        groups.append(("field", TRAINING_METHODS, " (field protocol)"))
    return [(kind, [m for m in methods if m in grid.methods], suffix)
            for kind, methods, suffix in groups]


def _reference(kind):
    """The distilled row a row of ``kind`` is compared with: the same protocol's (1-NN rows
    with the distilled set trained on by the paper's protocol, as before)."""
    return "field" if kind == "field" else "training"


def _fmt(row):
    if row is None:
        return "—"
    text = f"{100 * row['mean']:.1f}"
    return text + (f" ± {100 * row['std']:.1f}" if row["n"] > 1 else "")


def markdown(grid, rows, missing=()):
    """The table in markdown: for each data set and model, methods × init modes; the field
    protocol's rows after the paper's, each † against the distilled set of its own protocol."""
    field = "field" in grid.protocols
    lines = [f"# Results (`ddref table --grid {grid.name}`)", "",
             f"Test accuracy in %, mean ± std over n networks/draws (n in `table.json`); ddref "
             f"{ddref.__version__}, {grid.dtype}, seed {grid.seed}.  Baselines use the distilled "
             f"set's steps, epochs, labels and networks; † marks a baseline at equal image count "
             f"that the distilled set (trained on) does not beat.", ""]
    if field:
        lines += [f"Rows marked (field protocol): {grid.field_nets} fresh random networks per row "
                  f"trained on the set as an unordered pool ({grid.field_epochs} epochs of SGD "
                  f"with momentum, `ddref.protocol`), network k from the same initialisation in "
                  f"every row; † there compares with the distilled set under the same protocol.", ""]
    notes = []
    for i, s in enumerate(grid.settings):
        n = _n_images(s)
        lines += [f"## {s.dataset} / {s.model}: {s.steps} steps × {s.epochs} epochs, {n} images, "
                  f"{s.iterations} iterations", "",
                  "| method | " + " | ".join(f"{i} init" for i in grid.inits) + " |",
                  "|---|" + "---|" * len(grid.inits)]
        for kind, methods, suffix in row_groups(grid):
            for method in methods:
                label = LABELS[method] + suffix
                cells = []
                for init in grid.inits:
                    row = _find(rows, s, init, method, kind)
                    distilled = _find(rows, s, init, "distilled", _reference(kind))
                    beaten = (row is None or distilled is None
                              or method in ("distilled", "full_data")
                              or distilled["mean"] > row["mean"])
                    cells.append(_fmt(row) + ("" if beaten else " †"))
                    if not beaten:
                        notes.append((i, init, _reference(kind), f"{label} {_fmt(row)}", _fmt(distilled)))
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += _timing_lines(grid, rows, s)
    if notes:
        lines += ["† Where the distilled set does not beat a baseline:", ""]
        in_grid_order = sorted(dict.fromkeys((n[0], n[1], n[2], n[4]) for n in notes),
                               key=lambda k: (k[0], grid.inits.index(k[1]), k[2] == "field"))
        for (i, init, reference, distilled) in in_grid_order:
            s = grid.settings[i]
            beating = "; ".join(n[3] for n in notes if n[:3] == (i, init, reference))
            where = f"{s.dataset}/{s.model}" + (f" ({_n_images(s)} images)" if s.tag else "")
            protocol = ", field protocol" if reference == "field" else ""
            lines.append(f"- {where}, {init} init{protocol} (distilled {distilled}): {beating}")
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


def _timing_lines(grid, rows, setting):
    """How long each learned set took: seconds per outer iteration and in all, per cell."""
    timed = [r for r in rows if "seconds_per_iteration" in r and r["kind"] != "training"
             and r["cell"].startswith(setting.label + "-")]
    if not timed:
        return []
    parts = [f"{LABELS[r['method']]} ({r['init']}): {r['seconds_per_iteration']:.3g} s × "
             f"{r['iterations']} iterations, {r['seconds']:.0f} s for the cell"
             for r in sorted(timed, key=lambda r: (TRAINING_METHODS.index(r["method"]), r["init"]))]
    return ["Time to the final set — " + "; ".join(parts) + ".", ""]


def figure(grid, rows, path):
    """Bars per method (training data, then 1-NN), one colour per init mode, ± std; a dashed
    line in each init's colour at the distilled set's accuracy.  With the field protocol, a
    second row of panels: every method trained on as a pool, the dashed line the distilled
    set's under that protocol."""
    import matplotlib.pyplot as plt

    groups = row_groups(grid)
    panels = [[(m, kind) for kind, methods, _ in groups[:2] for m in methods]]
    if "field" in grid.protocols:
        panels.append([(m, "field") for m in groups[2][1]])
    fig, axes = plt.subplots(len(panels), len(grid.settings),
                             figsize=(6.5 * len(grid.settings), 4.2 * len(panels)),
                             squeeze=False, layout="constrained")
    for r, entries in enumerate(panels):
        for ax, s in zip(axes[r], grid.settings):
            _panel(ax, grid, rows, s, entries, field=r == 1)
    fig.suptitle(f"ddref table --grid {grid.name}: test accuracy, mean ± std "
                 f"(dashed: the distilled set, trained on)", fontsize=10)
    from ddref.plot import save_figure

    try:
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path


def _panel(ax, grid, rows, s, entries, field=False):
    """One setting's bars: ``entries`` (method, kind), one colour per init mode."""
    width = 0.8 / len(grid.inits)
    reference = "field" if field else "training"
    for k, init in enumerate(grid.inits):
        found = [_find(rows, s, init, m, kind) for m, kind in entries]
        x = np.arange(len(entries)) + (k - (len(grid.inits) - 1) / 2) * width
        means = [100 * r["mean"] if r else np.nan for r in found]
        stds = [100 * r["std"] if r else 0 for r in found]
        bars = ax.bar(x, means, width, yerr=stds, capsize=2, label=f"{init} init", alpha=0.9)
        distilled = _find(rows, s, init, "distilled", reference)
        if distilled:   # a bar above its init's line is a baseline the distilled set does not beat
            ax.axhline(100 * distilled["mean"], color=bars.patches[0].get_facecolor(), lw=0.9,
                       ls="--", alpha=0.8)
    if not field:
        split = sum(kind == "training" for _, kind in entries) - 0.5
        ax.axvline(split, color="gray", lw=0.8, ls=":")
        ax.text(split - 0.2, 108, "trained on ←", ha="right", va="top", fontsize=8, color="gray")
        ax.text(split + 0.2, 108, "→ 1-NN examples", ha="left", va="top", fontsize=8, color="gray")
    ax.set_xticks(np.arange(len(entries)))
    ax.set_xticklabels([LABELS[m] + ("\n(1-NN)" if kind == "nearest_neighbour" else "")
                        for m, kind in entries], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 110)
    ax.set_yticks(range(0, 101, 20))
    protocol = (f"field protocol ({grid.field_nets} nets × {grid.field_epochs} epochs on the pool)"
                if field else f"{s.steps} steps × {s.epochs} epochs")
    ax.set_title(f"{s.dataset} / {s.model}: {_n_images(s)} images, {protocol}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
