"""The command line, end to end on tiny settings."""

import json

import pytest

from ddref.cli import main

TINY = ["--steps", "2", "--epochs", "1", "--iterations", "4", "--eval-every", "2",
        "--batch-size", "64", "--baseline-draws", "1", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["distill", *TINY, "--out", str(out)]) == 0
    return out


def test_distill_writes_the_run_folder(run_dir, capsys):
    for name in ("distilled.npz", "distilled.png", "curves.png", "metrics.json", "checkpoint.npz"):
        assert (run_dir / name).stat().st_size > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_images"] == 20 and metrics["iterations"] == 4
    assert 0.0 <= metrics["distilled_accuracy"]["mean"] <= 1.0
    assert metrics["history"]["eval_iterations"] == [0, 2, 4]


def test_evaluate_reproduces_the_reported_accuracy(run_dir, capsys):
    assert main(["evaluate", str(run_dir)]) == 0
    assert "reproduced" in capsys.readouterr().out


def test_show_redraws_the_figures(run_dir):
    (run_dir / "distilled.png").unlink()
    assert main(["show", str(run_dir)]) == 0
    assert (run_dir / "distilled.png").exists()


def test_resume_continues_to_more_iterations(run_dir, capsys):
    assert main(["distill", "--resume", "--out", str(run_dir), "--iterations", "6",
                 "--baseline-draws", "1", "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert json.loads((run_dir / "metrics.json").read_text())["iterations"] == 6


def test_resume_without_a_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["distill", "--resume", "--out", str(tmp_path / "empty")])


def test_unknown_dataset_is_one_clear_line(capsys, tmp_path):
    assert main(["distill", "--dataset", "imagenet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddref: error: unknown data set 'imagenet'") and "Traceback" not in err


def test_lenet_on_8x8_digits_is_one_clear_line(capsys, tmp_path):
    assert main(["distill", "--model", "lenet", "--out", str(tmp_path)]) == 2
    assert "lenet takes 28×28 or 32×32 images" in capsys.readouterr().err


def test_missing_download_is_one_clear_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DDREF_DATA", str(tmp_path))
    assert main(["train", "--dataset", "mnist"]) == 2
    err = capsys.readouterr().err
    assert "ddref: error:" in err and str(tmp_path) in err


def test_train_prints_test_accuracy(capsys):
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_datasets_lists_all(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "mnist5k", "mnist", "usps", "svhn", "cifar10"):
        assert name in out


def test_threads_option_limits_blas(capsys):
    assert main(["--threads", "1", "train", "--epochs", "1", "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out
