"""The command line, end to end on tiny settings."""

import json

import pytest

from ddref import cli
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
    assert metrics["distilled_accuracy"]["n"] == 1 and metrics["random_real_accuracy"]["n"] == 1
    assert metrics["distilled_accuracy"]["mean"] == metrics["history"]["eval_accuracies"][-1]
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


def test_resume_without_a_checkpoint(tmp_path, capsys):
    assert main(["distill", "--resume", "--out", str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_unknown_dataset_is_one_clear_line(capsys, tmp_path):
    assert main(["distill", "--dataset", "imagenet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddref: error: --dataset must name a data set") and "Traceback" not in err


def test_eval_every_0_still_draws_a_curve(tmp_path):
    out = tmp_path / "run"
    assert main(["distill", *TINY, "--eval-every", "0", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"]["eval_iterations"] == [0, 4]


def test_show_takes_the_npz_that_evaluate_takes(run_dir, tmp_path, capsys):
    alone = tmp_path / "set.npz"
    alone.write_bytes((run_dir / "distilled.npz").read_bytes())
    assert main(["show", str(alone)]) == 0
    assert (tmp_path / "set-distilled.png").stat().st_size > 0
    assert "no curves" in capsys.readouterr().out


def test_evaluate_n_inits_on_a_fixed_init_set_is_refused(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--n-inits", "3"]) == 2
    assert "--n-inits applies to sets distilled for random" in capsys.readouterr().err


BAD_OPTIONS = [
    ["distill", "--betas", "1.5", "0.9"], ["distill", "--lr", "inf"], ["distill", "--lr", "nan"],
    ["distill", "--lr-decay", "0"], ["distill", "--lr-decay", "-1"], ["distill", "--decay-every", "-2"],
    ["distill", "--eval-every", "-1"], ["distill", "--checkpoint-every", "-1"],
    ["distill", "--init-scale", "0"], ["distill", "--seed", "-1"], ["distill", "--threads", "-1"],
    ["--threads", "-3", "datasets"], ["distill", "--baseline-draws", "0"],
    ["distill", "--eval-inits", "0"], ["distill", "--n-nets", "0"], ["distill", "--steps", "1.5"],
    ["distill", "--distill-lr", "-0.02"], ["distill", "--init", "pretrained"],
    ["distill", "--objective", "attack", "--source-class", "10"],
    ["distill", "--objective", "attack", "--source-class", "3", "--target-class", "3"],
    ["evaluate", "nowhere/distilled.npz"], ["evaluate", ".", "--n-inits", "0"],
    ["show", "nowhere"], ["train", "--epochs", "0"], ["train", "--batch-size", "0"],
    ["train", "--lr", "0"], ["train", "--lr", "nan"], ["train", "--seed", "-1"],
    ["train", "--model", "resnet"], ["train", "--dataset", "imagenet"], ["download", "imagenet"],
    ["distill", "--batch-size", "100000"], ["distill", "--images-per-class", "2000"],
]


@pytest.mark.parametrize("argv", BAD_OPTIONS, ids=[" ".join(a) for a in BAD_OPTIONS])
def test_a_bad_option_is_one_sentence_before_any_work(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.run, "_finish_run", lambda *a: pytest.fail("ran anyway"))
    try:
        code = main(argv + (["--out", "run", "--iterations", "1", "--no-progress"]
                            if argv[0] == "distill" else []))
    except SystemExit as exit:          # argparse and a few path checks exit with a message
        code = exit.code if isinstance(exit.code, int) else 2
        message = exit.code if isinstance(exit.code, str) else ""
    else:
        message = ""
    err = capsys.readouterr().err + message
    assert code == 2, err
    assert "error" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()      # nothing was created


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


@pytest.mark.parametrize("argv", [["--threads", "1", "datasets"], ["datasets", "--threads", "1"]])
def test_threads_option_limits_blas(argv, monkeypatch):
    from threadpoolctl import threadpool_info

    seen = []
    monkeypatch.setitem(cli.COMMANDS, "datasets", lambda args: seen.append(
        [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]) or 0)
    assert main(argv) == 0
    assert seen and seen[0] and all(n == 1 for n in seen[0])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("ddref 0.")


def test_an_empty_out_is_refused(capsys):
    assert main(["distill", "--out", "", "--iterations", "1"]) == 2
    assert "--out is empty" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["bogus", "cupy"])
def test_a_bad_ddref_backend_is_one_sentence(backend):
    import subprocess
    import sys

    pytest.importorskip("numpy")
    if backend == "cupy":
        try:
            import cupy  # noqa: F401
            pytest.skip("CuPy is installed here")
        except ImportError:
            pass
    run = subprocess.run([sys.executable, "-m", "ddref", "datasets"], capture_output=True, text=True,
                         env={**__import__("os").environ, "DDREF_BACKEND": backend})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("ddref: error:") and "DDREF_BACKEND" in run.stderr


@pytest.mark.parametrize("extra,words", [(["--order", "pool"], "pool order (tuned lr"),
                                         (["--order", "shuffled"], "shuffled order"),
                                         (["--model", "lenet", "--n-inits", "1"], "with a tuned constant lr")])
def test_evaluate_in_another_order_or_on_another_network(run_dir, capsys, extra, words):
    assert main(["evaluate", str(run_dir), *extra]) == 0
    assert words in capsys.readouterr().out


# ---------------------------------------------------------------------------- issue 22, item 8


def test_train_with_a_huge_lr_says_it_diverged_and_warns_nothing(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "ddref", "train", "--lr", "1e6", "--epochs", "3",
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "training diverged" in done.stderr   # no RuntimeWarning
    assert "--lr 1e+06 is too large" in done.stderr


def test_show_of_a_set_with_a_label_beyond_its_classes_is_one_sentence(run_dir, tmp_path, capsys):
    from ddref.saved import DistilledSet

    distilled = DistilledSet.load(run_dir / "distilled.npz")
    distilled.labels = distilled.labels.copy()
    distilled.labels[-1] = 12
    path = tmp_path / "bad.npz"
    distilled.save(path)
    capsys.readouterr()
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its labels run 0..12, outside 0..9" in err
    assert not list(tmp_path.glob("*.png"))


def test_one_kind_of_error_one_exit_code(tmp_path, capsys):
    """Usage and input errors exit 2 (as argparse does), whoever finds them."""
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert main(["show", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "does not exist" in err
    with pytest.raises(SystemExit) as usage:
        main(["distill", "--steps", "many"])
    assert usage.value.code == 2
    assert "exit status: 0 done; 1 `ddref evaluate`" in cli.build_parser().format_help()
