"""Files on disk: a saved set that would train meaninglessly is refused with one sentence, and
the run folder is checked before anything is computed, so a finished run is never lost."""

import json

import numpy as np
import pytest

from ddref import data, saved
from ddref.cli import main
from ddref.distill import DistillConfig, Distiller, held_out_accuracy
from ddref.saved import DistilledSet, SavedFileError, check_run_folder, claim_run_folder


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", dtype="float64")


@pytest.fixture(scope="module")
def good_set(digits):
    config = DistillConfig(steps=2, epochs=1, iterations=2, dtype="float64", eval_every=0,
                           eval_inits=2, batch_size=64)
    return Distiller(config, dataset=digits, progress=False).run().distilled_set()


def tampered(good_set, tmp_path, **changes):
    """``good_set`` saved with some of its fields replaced, and the path it was saved to."""
    fields = {k: getattr(good_set, k) for k in ("images", "labels", "lrs", "mean", "std",
                                                "config", "theta0", "classes")}
    fields.update(changes)
    path = tmp_path / "distilled.npz"
    DistilledSet(**fields).save(path)
    return path


def test_a_good_set_round_trips(good_set, tmp_path, digits):
    loaded = DistilledSet.load(tampered(good_set, tmp_path), num_classes=10)
    np.testing.assert_array_equal(loaded.images, good_set.images)
    assert loaded.classes == tuple(digits.classes)
    assert held_out_accuracy(loaded, dataset=digits).n == 1


@pytest.mark.parametrize("change,words", [
    (lambda s: {"labels": np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 12])}, r"labels run 0\.\.12, outside 0\.\.9"),
    (lambda s: {"labels": -s.labels}, "labels run"),
    (lambda s: {"labels": s.labels.astype(float)}, "labels of shape"),
    (lambda s: {"lrs": -s.lrs}, "learning rates include"),
    (lambda s: {"lrs": s.lrs * np.nan}, "learning rates contain NaN"),
    (lambda s: {"images": s.images.astype(str)}, "not floating-point"),
    (lambda s: {"images": s.images * np.inf}, "images contain NaN or inf"),
    (lambda s: {"images": s.images[0]}, "images .* and lrs"),
    (lambda s: {"std": s.std * 0}, "normalisation"),
    (lambda s: {"theta0": {**s.theta0, "w0": s.theta0["w0"] * np.nan}}, "θ0 entry 'w0'"),
])
def test_a_damaged_set_is_refused_on_load(good_set, tmp_path, change, words):
    path = tampered(good_set, tmp_path, **change(good_set))
    with pytest.raises(SavedFileError, match=words):
        DistilledSet.load(path, num_classes=10)


@pytest.mark.parametrize("theta0,words", [
    (lambda t: {k: v for k, v in t.items() if k != "b1"}, "missing b1"),
    (lambda t: {**t, "w0": t["w0"][:10]}, r"mis-shaped w0 \(10, 128\)"),
    (lambda t: {**t, "extra": t["b0"]}, "unknown extra"),
])
def test_a_theta0_that_does_not_fit_the_model_is_refused(good_set, tmp_path, digits, theta0, words):
    path = tampered(good_set, tmp_path, theta0=theta0(good_set.theta0))
    with pytest.raises(SavedFileError, match=words):
        held_out_accuracy(DistilledSet.load(path), dataset=digits)


def test_an_unusable_config_is_refused(good_set, tmp_path, digits):
    path = tampered(good_set, tmp_path, config={**good_set.config, "steps": "two"})
    with pytest.raises(SavedFileError, match="config cannot be used"):
        held_out_accuracy(DistilledSet.load(path), dataset=digits)


# ---------------------------------------------------------------------------- the run folder


def test_a_new_or_empty_folder_is_fine(tmp_path):
    assert check_run_folder(tmp_path / "new") == []
    assert not (tmp_path / "new").exists()            # checking creates nothing
    claim_run_folder(tmp_path / "new")
    assert (tmp_path / "new").is_dir()


@pytest.mark.parametrize("present,state", [("metrics.json", "a finished run"),
                                           ("checkpoint.npz", "an unfinished run")])
def test_a_run_is_kept_unless_forced(tmp_path, present, state):
    (tmp_path / present).write_text("{}")
    with pytest.raises(SavedFileError, match=f"already holds {state}.*--resume.*--force"):
        check_run_folder(tmp_path)
    assert check_run_folder(tmp_path, force=True) == [present]


def test_force_deletes_the_old_run_files_first(tmp_path):
    for name in ("metrics.json", "distilled.npz", "checkpoint.npz", "notes.txt"):
        (tmp_path / name).write_text("old")
    claim_run_folder(tmp_path, check_run_folder(tmp_path, force=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("out,words", [
    ("file", "is a file, not a folder"),
    ("file/below", "is a file, not a folder"),
    ("photos", "not a ddref run"),
])
def test_bad_out_is_refused_before_anything_runs(tmp_path, out, words):
    (tmp_path / "file").write_text("x")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_text("x")
    with pytest.raises(SavedFileError, match=words):
        check_run_folder(tmp_path / out)


def test_an_unwritable_out_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(saved.run_folder.os, "access", lambda path, mode: False)
    with pytest.raises(SavedFileError, match="cannot be written"):
        check_run_folder(tmp_path / "run")


def test_resume_needs_a_checkpoint_and_excludes_force(tmp_path):
    with pytest.raises(SavedFileError, match="no checkpoint"):
        check_run_folder(tmp_path, resume=True)
    with pytest.raises(SavedFileError, match="give only one"):
        check_run_folder(tmp_path, resume=True, force=True)


# ---------------------------------------------------------------------------- through the command line

TINY = ["--steps", "2", "--epochs", "1", "--iterations", "2", "--eval-every", "1",
        "--batch-size", "64", "--baseline-draws", "1", "--no-progress"]


def test_a_finished_run_survives_a_second_distill(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *TINY, "--out", str(out)]) == 0
    before = (out / "distilled.npz").read_bytes()
    assert main(["distill", *TINY, "--seed", "7", "--out", str(out)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "distilled.npz").read_bytes() == before
    assert main(["distill", *TINY, "--seed", "7", "--out", str(out), "--force"]) == 0
    assert (out / "distilled.npz").read_bytes() != before


def test_a_bad_out_costs_no_computation(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Distiller, "__init__", lambda *a, **k: pytest.fail("computed anyway"))
    (tmp_path / "file").write_text("x")
    assert main(["distill", *TINY, "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("content,words", [
    ("{not json", "not a readable metrics file"),
    (json.dumps({"distilled_accuracy": {"mean": 0.5}}), "lacks random_real_accuracy, history"),
    (json.dumps([1, 2]), "lacks distilled_accuracy"),
])
def test_a_damaged_metrics_file_is_one_sentence(tmp_path, capsys, content, words):
    out = tmp_path / "run"
    assert main(["distill", *TINY, "--out", str(out)]) == 0
    (out / "metrics.json").write_text(content)
    for command in ("evaluate", "show"):
        assert main([command, str(out)]) == 2
        err = capsys.readouterr().err
        assert words in err and "metrics.json" in err and "Traceback" not in err


def test_huge_learning_rates_are_an_error_not_a_chance_accuracy(good_set, tmp_path, digits):
    from ddref.evaluate import TrainingDiverged

    path = tampered(good_set, tmp_path, lrs=good_set.lrs * 1e200)
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged, match="diverged"):
        held_out_accuracy(DistilledSet.load(path), dataset=digits)


# ---------------------------------------------------------------------------- one run per folder


def _hold_lock_in_another_process(out):
    """A child process that takes the run folder's lock and sleeps; returns it once it holds it."""
    import os
    import subprocess
    import sys

    code = ("import sys, time; from ddref.saved import lock_run_folder; "
            "lock = lock_run_folder(sys.argv[1]); print('locked', flush=True); time.sleep(120)")
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE,
                             text=True, env=env)
    assert child.stdout.readline().strip() == "locked"
    return child


TINY_RUN = ["distill", "--steps", "1", "--epochs", "1", "--iterations", "2", "--eval-every", "0",
            "--baseline-draws", "1", "--no-progress"]


def test_a_second_run_or_resume_on_a_locked_folder_is_one_sentence(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY_RUN, "--out", str(out)]) == 0
    assert not (out / saved.LOCK_FILE).exists()            # released at the end of the run
    child = _hold_lock_in_another_process(out)
    try:
        capsys.readouterr()
        for extra in (["--resume", "--iterations", "3"], ["--force"]):
            assert main([*TINY_RUN, *extra, "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"is in use by another ddref run (process {child.pid})" in err
        assert json.loads((out / "metrics.json").read_text())["iterations"] == 2   # untouched
    finally:
        child.kill()
        child.wait()
    # the kernel dropped the killed process's lock: the folder is usable at once
    assert main([*TINY_RUN, "--resume", "--iterations", "3", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 3


def test_a_new_locked_folder_refuses_and_a_failed_start_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new"
    child = _hold_lock_in_another_process(out)
    try:
        assert main([*TINY_RUN, "--out", str(out)]) == 2
        assert "in use by another ddref run" in capsys.readouterr().err
    finally:
        child.kill()
        child.wait()
    gone = tmp_path / "never"
    assert main([*TINY_RUN, "--resume", "--out", str(gone)]) == 2   # no checkpoint there
    assert not gone.exists()
