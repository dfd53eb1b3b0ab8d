"""One cell of the table — one (data set, model, init mode, method) — and its result file.

:func:`run_cell` computes a cell on its own and writes ``OUT/cells/NAME/result.json``
atomically; :func:`stored_result` reads it back, or None when it is missing or was made
with other settings (:func:`cell_settings`), and a damaged file is one sentence
(:func:`check_result`).  A distilled cell checkpoints its distillation in its folder and
resumes it.

With the field protocol in the grid (``grid.protocols``), every training method's cell adds
a row ``field_<method>``: :func:`ddref.protocol.evaluate` on the cell's set as an unordered
pool — a distilled set (S, n, C, H, W) reshaped to (S·n, C, H, W), its labels tiled S times;
a baseline's draws paired with the networks, network k on draw k mod #draws
(:func:`field_row`).  Every method's network k starts from the same θ0 (the grid's seed, k).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import ddref
import numpy as np

from ddref import baselines, data, nn, protocol
from ddref.evaluate import Accuracy, accuracies_on, accuracy_on, held_out_inits, train_full
from ddref.saved import write_atomically
from ddref.table.grids import POOL_METHODS, distill_config


def evaluation_inits(config, dataset, model, n):
    """The networks every method of a column is trained from: the distillation's θ0 (fixed
    init), or the ``n`` held-out initialisations its evaluation uses (random init)."""
    from ddref.distill import Distiller

    if config.init == "fixed":
        return [Distiller(config, dataset, progress=False).theta0]
    return held_out_inits(model, n, config.seed, config.dtype)


# options added after cells were stored under results/: left out of a cell's settings while
# they keep their default, so that those cells stay valid (the field protocol's K and epochs
# matter only with the field protocol)
ADDED_GRID_OPTIONS = {"protocols": ("paper",), "field_nets": None, "field_epochs": None,
                      "tune_images": 0}
ADDED_SETTING_OPTIONS = {"tag": "", "pool_options": {}}


def cell_settings(grid, cell):
    """Everything a cell's numbers depend on; a stored result with other settings is stale.
    A grid without the field protocol, the default ``tune_images`` and settings without a
    tag gives exactly the settings it gave before those options existed."""
    field = "field" in grid.protocols

    def kept(name, value, added):
        if name not in added:
            return True
        if added[name] is None:          # the field protocol's own options
            return field
        return value != added[name]

    grid_fields = {k: v for k, v in dataclasses.asdict(grid).items()
                   if k not in ("name", "settings", "inits", "methods", "notes")
                   and kept(k, v, ADDED_GRID_OPTIONS)}
    setting = {k: v for k, v in dataclasses.asdict(cell.setting).items()
               if kept(k, v, ADDED_SETTING_OPTIONS)}
    settings = {"cell": cell.name, "setting": setting, "init": cell.init,
                "method": cell.method, **grid_fields, "version": ddref.__version__}
    return json.loads(json.dumps(settings))   # as stored: tuples are JSON lists


def field_recipe(grid):
    """The field protocol's recipe for ``grid``: its K networks and epochs, DC's other values."""
    return protocol.Recipe(epochs=grid.field_epochs, n_nets=grid.field_nets, dtype=grid.dtype)


def as_pool(images, labels):
    """A set of S steps (S, n, C, H, W) with the labels (n,) of one step, as the unordered pool
    (S·n, C, H, W) with its labels tiled S times."""
    images = np.asarray(images)
    return images.reshape(-1, *images.shape[2:]), np.tile(np.asarray(labels), images.shape[0])


def field_row(grid, model, dataset, sets, labels):
    """The field protocol on ``sets`` (one set, or one per draw): network k (θ0 and shuffles
    from :func:`ddref.protocol.network_rng` (grid seed, k)) trained on draw k mod #draws as a
    pool, each tested on the whole test split.  One set is exactly
    :func:`ddref.protocol.evaluate`; several draws train each network by its plain loop."""
    recipe = field_recipe(grid)
    if len(sets) == 1:
        result = protocol.evaluate(model, dataset, *as_pool(sets[0], labels), recipe, seed=grid.seed)
        scores = list(result.accuracy.values)
    else:
        nets = []
        for k in range(recipe.n_nets):
            images, targets = protocol.training_targets(model, *as_pool(sets[k % len(sets)], labels),
                                                        dtype=recipe.dtype)
            nets.append(protocol.train_network(model, images, targets, recipe,
                                               protocol.network_rng(grid.seed, k)))
        scores = accuracies_on(model.apply, nets, dataset.x_test, dataset.y_test)
    return _row(Accuracy.of(scores), values=[float(v) for v in scores], draws=len(sets),
                n_images=int(np.prod(np.shape(sets[0])[:2])), recipe=recipe.to_dict())


def run_cell(grid, cell, out, progress=False):
    """Compute one cell and write ``OUT/cells/NAME/result.json`` atomically; returns its name.
    ``progress``: show the distillation's progress bar (sensible with one job only)."""
    folder = Path(out) / "cells" / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    config = distill_config(grid, cell.setting, cell.init)
    dataset = data.load(config.dataset, dtype=config.dtype)
    model = nn.build_model(config.model, dataset.image_shape, dataset.num_classes)
    start = time.perf_counter()
    compute = {"distilled": _distilled_rows, "full_data": _full_data_rows,
               **{m: _pool_rows for m in POOL_METHODS}}.get(cell.method, _baseline_rows)
    rows = compute(grid, cell, config, dataset, model, folder, progress)
    result = {"settings": cell_settings(grid, cell), "rows": rows,
              "seconds": round(time.perf_counter() - start, 2)}
    write_json_atomic(folder / "result.json", result)
    return cell.name


def _row(accuracy: Accuracy, **extra):
    return {"mean": accuracy.mean, "std": accuracy.std, "n": accuracy.n, **extra}


def _distilled_rows(grid, cell, config, dataset, model, folder, progress):
    distiller = _resumed(folder / "checkpoint.npz", config, dataset, progress)
    distilled = distiller.distilled_set()
    distilled.save(folder / "distilled.npz")
    nn_accuracy = baselines.nearest_neighbour_accuracy(distilled.images, distilled.labels,
                                                       dataset.x_test, dataset.y_test)
    rows = {"distilled": _row(distiller.accuracy(n_inits=grid.n_draws), **_timing(distiller)),
            "knn_distilled": _row(Accuracy.of([nn_accuracy]))}
    if "field" in grid.protocols:
        rows["field_distilled"] = {**field_row(grid, model, dataset, [distilled.images],
                                               distilled.labels), **_timing(distiller)}
    return rows


def _timing(distiller):
    """Outer iterations and seconds per iteration of a finished distillation."""
    return {"iterations": distiller.iteration,
            "seconds_per_iteration": distiller.history.seconds / max(distiller.iteration, 1)}


def _pool_rows(grid, cell, config, dataset, model, folder, progress):
    """A set learned by dc, dm or kip (``--method``) with the images per class of the setting's
    distilled set (steps × images per class), the papers' defaults, the setting's
    ``pool_options`` (shared ones, then the method's own under its name); judged by the field
    protocol and as 1-NN examples."""
    from ddref.distill import DistillConfig

    s = cell.setting
    options = {k: v for k, v in s.pool_options.items() if k not in POOL_METHODS}
    options.update(s.pool_options.get(cell.method, {}))      # this method's own, e.g. {"dm": {"lr": …}}
    pool_config = DistillConfig.for_method(
        cell.method, dataset=s.dataset, model=s.model, images_per_class=s.steps * s.images_per_class,
        seed=grid.seed, dtype=grid.dtype, eval_every=0, eval_inits=grid.field_nets,
        field_epochs=grid.field_epochs, **options)
    distiller = _resumed(folder / "checkpoint.npz", pool_config, dataset, progress)
    distilled = distiller.distilled_set()
    distilled.save(folder / "distilled.npz")
    nn_accuracy = baselines.nearest_neighbour_accuracy(distilled.images, distilled.labels,
                                                       dataset.x_test, dataset.y_test)
    return {f"field_{cell.method}": {**field_row(grid, model, dataset, [distilled.images],
                                                 distilled.labels), **_timing(distiller)},
            f"knn_{cell.method}": _row(Accuracy.of([nn_accuracy]))}


def _resumed(checkpoint, config, dataset, progress):
    """The distillation of ``config`` run to its end, continuing a killed cell's checkpoint."""
    from ddref.distill import Distiller

    distiller = None
    if checkpoint.exists():
        distiller = Distiller.from_checkpoint(checkpoint, dataset, progress=progress)
        if distiller.config.to_dict() != config.to_dict():
            distiller = None
    return (distiller or Distiller(config, dataset, progress=progress)).run(checkpoint_path=checkpoint)


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
        momentum=config.momentum, tune_split=tune_split(grid, dataset))
    rows = {cell.method: _row(result.training, lr=result.lr),
            f"knn_{cell.method}": _row(result.nearest_neighbour)}
    if "field" in grid.protocols:
        rows[f"field_{cell.method}"] = field_row(grid, model, dataset, result.sets, labels)
    return rows


def tune_split(grid, dataset):
    """The training images the baselines tune their lr on: all of the training split, or
    ``grid.tune_images`` of it drawn at random (seeded by the grid's seed); never a test image."""
    n = len(dataset.x_train)
    if not grid.tune_images or grid.tune_images >= n:
        return None
    rng = np.random.default_rng(np.random.SeedSequence([grid.seed, 0x7E5E]))
    chosen = np.sort(rng.choice(n, grid.tune_images, replace=False))
    return dataset.x_train[chosen], dataset.y_train[chosen]


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
