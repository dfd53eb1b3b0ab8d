"""`ddref table`: one run folder per cell, a killed run resumed, joblib in parallel."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddref import table
from ddref.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = table.GRIDS["small"]
N_CELLS = len(SMALL.cells())

# run `ddref table --grid small --jobs 2`, and kill the whole process group (main process and
# joblib workers, SIGKILL: no clean-up of any kind) as soon as the first cell is reported done
KILLED_AFTER_FIRST_CELL = """
import os, signal, sys
from ddref import cli
from ddref.table import run
run.cell_done = lambda name: os.killpg(os.getpgid(0), signal.SIGKILL)
sys.exit(cli.main(["table", "--grid", "small", "--jobs", "2", "--out", sys.argv[1], "--no-progress"]))
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _results(out):
    return {p.parent.name: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in (out / "cells").glob("*/result.json")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A small grid killed midway, then rerun: (folder, results after the kill, rerun stdout)."""
    out = tmp_path_factory.mktemp("table")
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_FIRST_CELL, str(out)], env=_env(),
                            start_new_session=True, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    after_kill = _results(out)
    rerun = subprocess.run([sys.executable, "-m", "ddref", "table", "--grid", "small", "--jobs", "2",
                            "--out", str(out), "--no-progress"], env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    return out, after_kill, rerun.stdout


def test_a_killed_run_keeps_its_finished_cells_and_writes_no_table(finished):
    out, after_kill, _ = finished
    assert 1 <= len(after_kill) < N_CELLS
    for name in after_kill:   # every stored result is whole
        assert json.loads(after_kill[name][0])["settings"]["cell"] == name


def test_the_rerun_computes_only_the_missing_cells(finished):
    out, after_kill, stdout = finished
    assert f"{len(after_kill)} of {N_CELLS} cells already in" in stdout
    assert f"computing {N_CELLS - len(after_kill)} with 2 job(s)" in stdout
    now = _results(out)
    assert set(now) == {c.name for c in SMALL.cells()}
    for name, (content, mtime) in after_kill.items():   # untouched: same bytes, same write
        assert now[name] == (content, mtime)


def test_the_table_has_every_cell_with_its_provenance(finished):
    out, _, _ = finished
    result = json.loads((out / "table.json").read_text())
    assert result["missing_cells"] == []
    rows = result["rows"]
    # 6 training rows and 5 nearest-neighbour rows per init mode
    assert len(rows) == 2 * (len(SMALL.methods) + len(SMALL.methods) - 1)   # full data has no 1-NN row
    for row in rows:
        assert {"mean", "std", "n", "seed", "command"} <= set(row)
        assert 0.0 <= row["mean"] <= 1.0 and row["n"] >= 1
        assert row["command"] == f"ddref table --grid small --only {row['cell']}"
    md = (out / "table.md").read_text()
    assert "| k-means (1-NN) |" in md and "| full training data |" in md
    assert (out / "table.png").stat().st_size > 10_000


def test_a_deleted_cell_is_recomputed_alone_and_reproduced(finished, tmp_path):
    out, _, _ = finished
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    name = "digits-mlp-random-kmeans"
    before = (copy / "cells" / name / "result.json").read_text()
    subprocess.run(["rm", "-r", str(copy / "cells" / name)], check=True)
    assert table.run_grid(SMALL, copy, jobs=1, progress=False, log=lambda s: None) == [name]
    again = json.loads((copy / "cells" / name / "result.json").read_text())
    assert again["rows"] == json.loads(before)["rows"]          # seeded: the same numbers


def test_a_cell_with_other_settings_is_recomputed(finished, tmp_path):
    out, _, _ = finished
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    path = copy / "cells" / "digits-mlp-fixed-average" / "result.json"
    stale = json.loads(path.read_text())
    stale["settings"]["n_draws"] = 99
    path.write_text(json.dumps(stale))
    computed = table.run_grid(SMALL, copy, jobs=1, only="*-fixed-average", progress=False,
                              log=lambda s: None)
    assert computed == ["digits-mlp-fixed-average"]


def test_the_markdown_marks_baselines_the_distilled_set_does_not_beat():
    def row(method, mean, kind="training"):
        return {"dataset": "digits", "model": "mlp", "init": "fixed", "method": method,
                "kind": kind, "mean": mean, "std": 0.0, "n": 1}

    rows = [row("distilled", 0.80), row("random_real", 0.60), row("kmeans", 0.85),
            row("kmeans", 0.90, "nearest_neighbour"), row("full_data", 0.95)]
    grid = table.Grid("t", SMALL.settings, inits=("fixed",))
    md = table.markdown(grid, rows)
    assert "| random real | 60.0 |" in md and "| full training data | 95.0 |" in md
    assert "| k-means | 85.0 † |" in md and "| k-means (1-NN) | 90.0 † |" in md
    assert re.search(r"fixed init \(distilled 80.0\): k-means 85.0; k-means \(1-NN\) 90.0", md)


def test_bad_options_are_one_clear_line(capsys, tmp_path):
    assert main(["table", "--grid", "huge", "--out", str(tmp_path)]) == 2
    assert "--grid 'huge' is not a grid; choose one of readme, small, fashion" in capsys.readouterr().err
    assert main(["table", "--grid", "small", "--only", "cifar*", "--out", str(tmp_path)]) == 2
    assert "--only 'cifar*' matches no cell" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lenet takes 28×28 or 32×32 images"):
        table.check_grid(table.Grid("bad", (table.Setting("digits", "lenet"),)))
    with pytest.raises(ValueError, match="need tune_draws ≤ n_draws"):
        table.check_grid(table.Grid("bad", SMALL.settings, n_draws=1, tune_draws=2))


def test_a_killed_distilled_cell_resumes_from_its_checkpoint_exactly(finished, tmp_path, monkeypatch):
    from ddref.distill import Distiller

    out, _, _ = finished
    cell = next(c for c in SMALL.cells() if c.name == "digits-mlp-fixed-distilled")
    folder = tmp_path / "cells" / cell.name
    config = table.distill_config(SMALL, cell.setting, cell.init)
    Distiller(config, progress=False).run(iterations=config.iterations // 2,
                                          checkpoint_path=folder / "checkpoint.npz")
    started_at, run = [], Distiller.run
    monkeypatch.setattr(Distiller, "run", lambda self, **kw: started_at.append(self.iteration)
                        or run(self, **kw))
    assert table.run_grid(SMALL, tmp_path, jobs=1, only=cell.name, progress=False,
                          log=lambda s: None) == [cell.name]
    assert started_at == [config.iterations // 2]
    def untimed(path):       # seconds per iteration are measured, not reproduced
        rows = json.loads(path.read_text())["rows"]
        return {k: {f: v for f, v in row.items() if f != "seconds_per_iteration"} for k, row in rows.items()}

    assert untimed(folder / "result.json") == untimed(out / "cells" / cell.name / "result.json")


# ---------------------------------------------------------------------------- the README's block


def _block(text):
    start, end = text.index(table.README_START), text.index(table.README_END)
    return text[start: end + len(table.README_END)]


def test_the_readme_results_are_the_committed_tables_not_typed():
    """README.md's results block is exactly what `python -m ddref.table --readme` makes from
    the committed grids' table.json: a hand edit of either fails here."""
    tables = table.committed_tables(ROOT / "results")
    assert [t["grid"] for _, t in tables] == ["readme", "fashion", "methods"]
    expected = table.headline_section(tables, ROOT)
    assert _block((ROOT / "README.md").read_text()) == expected


@pytest.fixture
def small_results(tmp_path):
    """A results folder with a one-row table.md and its table.json."""
    results = tmp_path / "results"
    results.mkdir()
    grid = table.Grid("readme", SMALL.settings, inits=("fixed",), notes=("fewer iterations.",))
    rows = [{"dataset": "digits", "model": "mlp", "init": "fixed", "method": "distilled",
             "kind": "training", "mean": 0.9, "std": 0.0, "n": 1, "n_images": 20}]
    (results / "table.md").write_text(table.markdown(grid, rows))
    (results / "table.json").write_text(json.dumps({"command": "ddref table --grid readme",
                                                    "grid": "readme", "rows": rows}))
    return results


def test_the_readme_block_is_rewritten_between_its_markers_only(tmp_path, small_results):
    before, after = "# title\n\n## Results\n\n", "\n\n## Next\n\ntext\n"
    readme = tmp_path / "README.md"
    readme.write_text(before + f"{table.README_START}\nold, typed by hand\n{table.README_END}" + after)
    assert main_readme(readme, small_results) == 0
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after) and "typed by hand" not in text
    block = _block(text)
    assert "| digits / mlp, 20 | **90.0** | — |" in block       # the paper's protocol, fixed θ0
    assert "[`--grid readme`](results/table.md)" in block and "\n# Results" not in block
    assert main_readme(readme, small_results) == 0 and readme.read_text() == text   # idempotent


def test_a_readme_without_its_markers_is_one_clear_line(tmp_path, small_results, capsys):
    readme = tmp_path / "README.md"
    for text in ("## Results\n\nno markers\n",
                 f"{table.README_END}\n{table.README_START}\n",
                 f"{table.README_START}\n{table.README_START}\n{table.README_END}\n"):
        readme.write_text(text)
        assert main_readme(readme, small_results) == 2
        assert "must hold one <!-- results:start --> line followed by one <!-- results:end -->" \
            in capsys.readouterr().err
        assert readme.read_text() == text
    assert main_readme(readme, tmp_path / "nowhere") == 2
    assert "nowhere/table.md does not exist; run `ddref table --grid readme` first" in \
        capsys.readouterr().err


def main_readme(readme, results):
    return table.main(["--readme", "--readme-path", str(readme), "--results", str(results)])


# ---------------------------------------------------------------------------- damaged files, bad --out, --jobs

CELL = SMALL.cells()[0].name


@pytest.mark.parametrize("content, why", [
    ("{not json", "not readable JSON"),
    ("[1, 2]", "no settings object"),
    ('{"settings": {}, "rows": {"distilled": {"mean": "high"}}, "seconds": 1}', "row 'distilled' lacks"),
    ('{"settings": {}, "rows": {}, "seconds": 1}', "no rows"),
    ('{"settings": {}, "rows": {"x": {"mean": 1, "std": 0, "n": 1}}}', "no seconds"),
])
def test_a_damaged_cell_file_is_one_sentence_naming_it(tmp_path, capsys, content, why):
    path = tmp_path / "cells" / CELL / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert main(["table", "--grid", "small", "--out", str(tmp_path), "--only", CELL,
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path} is damaged ({why}" in err
    assert "delete the folder" in err


def test_a_bad_out_is_one_sentence(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "below"):
        assert main(["table", "--grid", "small", "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a file, not a folder" in err


def test_jobs_never_exceed_the_cells_or_the_cpus(tmp_path, monkeypatch):
    import joblib

    cpus = os.cpu_count()
    assert table.worker_count(6, 2) == min(2, cpus)
    assert table.worker_count(-1, 1000) == cpus
    assert table.worker_count(10 ** 6, 10 ** 6) == cpus
    asked = []

    class Stop(Exception):
        pass

    def spy(n_jobs, **options):
        asked.append(n_jobs)
        raise Stop

    monkeypatch.setattr(joblib, "Parallel", spy)
    with pytest.raises(Stop):
        table.run_grid(SMALL, tmp_path, jobs=6, only=f"{CELL},{SMALL.cells()[1].name}",
                       progress=False, log=lambda *a: None)
    assert asked == [min(2, cpus)]


# ---------------------------------------------------------------------------- both protocols

FIELD = table.Grid("field", SMALL.settings, inits=("fixed",),
                   methods=("distilled", "random_real", "average"), n_draws=2, tune_draws=2,
                   n_candidates=3, protocols=("paper", "field"), field_nets=3, field_epochs=5)


@pytest.fixture(scope="module")
def field_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("field")
    table.run_grid(FIELD, out, jobs=1, progress=False, log=lambda s: None)
    return out, json.loads((out / "table.json").read_text())


def test_field_rows_are_the_protocol_on_the_set_as_a_pool(field_table):
    """The distilled row is ddref.protocol.evaluate on the stored set (steps flattened, labels
    tiled); the class average's (one set) too: the wiring, not a copy of the protocol."""
    from ddref import data, nn, protocol
    from ddref.baselines import average_steps
    from ddref.saved import DistilledSet

    out, result = field_table
    dataset = data.load("digits")
    model = nn.build_model("mlp", dataset.image_shape, dataset.num_classes)
    recipe = protocol.Recipe(epochs=5, n_nets=3)
    distilled = DistilledSet.load(out / "cells" / "digits-mlp-fixed-distilled" / "distilled.npz")
    s, n = distilled.images.shape[:2]
    labels = np.tile(distilled.labels, s)
    average = average_steps(dataset, s, distilled.labels)
    for name, images in (("distilled", distilled.images), ("average", average)):
        direct = protocol.evaluate(model, dataset, images.reshape(s * n, *images.shape[2:]), labels,
                                   recipe, seed=FIELD.seed)
        row = json.loads((out / "cells" / f"digits-mlp-fixed-{name}" / "result.json").read_text())
        assert row["rows"][f"field_{name}"]["values"] == list(direct.accuracy.values)
        assert row["rows"][f"field_{name}"]["mean"] == direct.accuracy.mean
    kinds = {(r["method"], r["kind"]) for r in result["rows"]}
    assert {("distilled", "field"), ("random_real", "field"), ("average", "field")} <= kinds
    md = (out / "table.md").read_text()
    assert md.index("| class average (1-NN) |") < md.index("| distilled (field protocol) |")
    assert "| random real (field protocol) |" in md and "3 fresh random networks" in md


def test_with_several_draws_network_k_trains_on_draw_k_mod_draws():
    from ddref import data, nn, protocol
    from ddref.table.cells import field_row

    dataset = data.load("digits")
    model = nn.build_model("mlp", dataset.image_shape, dataset.num_classes)
    rng = np.random.default_rng(3)
    draws = [rng.normal(size=(2, 10, *dataset.image_shape)).astype("float32") for _ in range(2)]
    labels = np.arange(10)
    row = field_row(FIELD, model, dataset, draws, labels)
    assert row["n"] == 3 and row["draws"] == 2 and row["n_images"] == 20
    for k in range(3):   # network k of the protocol, trained alone on draw k mod 2
        x = draws[k % 2]
        alone = protocol.evaluate(model, dataset, x.reshape(20, *x.shape[2:]), np.tile(labels, 2),
                                  protocol.Recipe(epochs=5, n_nets=k + 1), seed=FIELD.seed,
                                  stacked=False)
        assert row["values"][k] == alone.accuracy.values[k]


def test_the_old_grids_cell_settings_are_unchanged():
    """The readme grid's stored cells (results/cells, committed) still match: the field
    protocol's options, tune_images and a setting's tag stay out of a grid that does not use them."""
    stored = sorted((ROOT / "results" / "cells").glob("*/result.json"))
    assert len(stored) == len(table.GRIDS["readme"].cells())
    grid = table.GRIDS["readme"]
    for cell in grid.cells():
        path = ROOT / "results" / "cells" / cell.name / "result.json"
        assert json.loads(path.read_text())["settings"] == table.cell_settings(grid, cell)
    small = table.cell_settings(SMALL, SMALL.cells()[0])
    assert not {"protocols", "field_nets", "field_epochs", "tune_images"} & set(small)
    assert "tag" not in small["setting"]
    field = table.cell_settings(FIELD, FIELD.cells()[0])
    assert field["protocols"] == ["paper", "field"] and field["field_epochs"] == 5


def test_two_shapes_of_one_data_set_and_model_do_not_collide():
    import dataclasses

    one, ten = (dataclasses.replace(SMALL.settings[0], steps=s, tag=f"{s}x") for s in (2, 1))
    grid = table.Grid("two", (one, ten), inits=("fixed",), methods=("distilled", "average"),
                      protocols=("paper", "field"))
    names = [c.name for c in grid.cells()]
    assert len(set(names)) == 4 and "digits-mlp-2x-fixed-distilled" in names
    rows = [{"dataset": "digits", "model": "mlp", "tag": s.tag, "init": "fixed", "method": m,
             "kind": k, "mean": v, "std": 0.0, "n": 1}
            for s, m, k, v in ((one, "distilled", "training", 0.9), (ten, "distilled", "training", 0.5),
                               (one, "average", "training", 0.7), (ten, "average", "training", 0.6),
                               (one, "distilled", "field", 0.4), (one, "average", "field", 0.45))]
    md = table.markdown(grid, rows)
    first, second = md.split("## digits / mlp: 1 steps")
    assert "| distilled | 90.0 |" in first and "| class average | 70.0 |" in first
    assert "| distilled | 50.0 |" in second and "| class average | 60.0 † |" in second
    assert "| class average (field protocol) | 45.0 † |" in first   # † against field distilled
    assert "- digits/mlp (20 images), fixed init, field protocol (distilled 40.0): class average " \
           "(field protocol) 45.0" in md
    with pytest.raises(ValueError, match="two settings are both 'digits-mlp'"):
        table.check_grid(table.Grid("bad", (SMALL.settings[0], SMALL.settings[0])))
    with pytest.raises(ValueError, match="protocols"):
        table.check_grid(dataclasses.replace(grid, protocols=("field",)))


# ---------------------------------------------------------------------------- the methods that came after

POOLS = table.Grid("pools", (table.Setting("digits", "mlp", steps=1, epochs=1, iterations=3,
                                           distill={"batch_size": 64},
                                           pool_options={"iterations": 3, "batch_size": 16}),),
                   methods=("distilled", "dc", "dm", "kip"), n_draws=2, tune_draws=2,
                   n_candidates=3, protocols=("paper", "field"), field_nets=2, field_epochs=3)


def test_dc_dm_and_kip_cells_are_their_sets_under_the_field_protocol(tmp_path):
    """A pool method's cell runs `--method M` with the setting's images per class and judges the
    saved set by ddref.protocol alone (no paper's-protocol row), in the random column only."""
    from ddref import data, nn, protocol
    from ddref.saved import DistilledSet

    assert [c.name for c in POOLS.cells()] == [
        "digits-mlp-fixed-distilled", "digits-mlp-random-distilled", "digits-mlp-random-dc",
        "digits-mlp-random-dm", "digits-mlp-random-kip"]
    table.run_grid(POOLS, tmp_path, jobs=1, progress=False, log=lambda s: None)
    dataset = data.load("digits")
    model = nn.build_model("mlp", dataset.image_shape, dataset.num_classes)
    for method in ("dc", "dm", "kip"):
        folder = tmp_path / "cells" / f"digits-mlp-random-{method}"
        rows = json.loads((folder / "result.json").read_text())["rows"]
        assert set(rows) == {f"field_{method}", f"knn_{method}"}
        saved = DistilledSet.load(folder / "distilled.npz")
        assert saved.config["method"] == method and saved.images.shape == (1, 10, 1, 8, 8)
        direct = protocol.evaluate(model, dataset, saved.images[0], saved.labels,
                                   protocol.Recipe(epochs=3, n_nets=2), seed=POOLS.seed)
        assert rows[f"field_{method}"]["values"] == list(direct.accuracy.values)
        assert rows[f"field_{method}"]["iterations"] == 3
    md = (tmp_path / "table.md").read_text()
    assert "| DC, gradient matching (field protocol) | — |" in md
    assert "| DC, gradient matching |" not in md           # no paper's-protocol row for a pool
    assert "Time to the final set" in md and "s × 3 iterations" in md
