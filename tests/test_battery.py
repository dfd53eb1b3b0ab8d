"""A battery of hostile command lines (issue 22's audit, re-run on every change): each one ends
with exit status 2 and one sentence `ddref: error: …` that names what to change — never a
traceback, never a silent success — and checks before anything is computed or written."""

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from ddref import cli

BAD_DISTILL = [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "10000000"], "would need about"),
    (["--epochs", "100000000"], "would need about"),
    (["--init", "random", "--n-nets", "10000000"], "would need about"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--distill-lr", "0"], "--distill-lr must be a positive finite number"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--truncate", "999"], "--truncate must be between 0"),
    (["--engine", "reverse"], "needs momentum > 0"),
    (["--dataset", "nope"], "--dataset"),
    (["--method", "nope"], "--method must be one of"),
    (["--batch-size", "100000"], "--batch-size 100000 is more than"),
    (["--images-per-class", "1000"], "more than its"),
    (["--source-class", "3"], "--source-class only applies to --objective attack"),
    (["--pool-nets", "3"], "--pool-nets only applies to --init fixed-pretrained or random-pretrained"),
    (["--pretrained-net", "2", "--init", "random"], "--pretrained-net only applies to --init fixed-pretrained"),
    (["--learn-labels", "--engine", "checkpoint"], "--engine gives no gradient for learned labels"),
    (["--learn-labels", "--momentum", "0.5"], "--momentum cannot be used with --learn-labels"),
    (["--objective", "attack", "--source-class", "1", "--target-class", "1"], "must differ"),
    (["--objective", "attack", "--source-class", "12"], "--source-class 12 is not a class of digits"),
    (["--seed", "-1"], "--seed"),
    (["--iterations", "-1"], "--iterations"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--label-lr", "0.5"], "--label-lr only applies with --learn-labels"),
    (["--n-nets", "3"], "--n-nets only applies to a random init"),
]


def run(argv):
    """(exit status, stdout, stderr) of ``ddref ARGV`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = cli.main(["--threads", "1", *argv])
        except SystemExit as stop:         # argparse's own refusals
            status = stop.code
    return status, out.getvalue(), err.getvalue()


def assert_one_sentence(status, err, words):
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) >= 1 and words in err, err
    assert lines[-1].startswith(("ddref: error:", "usage:", "ddref distill: error:")) or \
        "error:" in lines[-1], err


@pytest.mark.parametrize("options, words", BAD_DISTILL, ids=[" ".join(o) for o, _ in BAD_DISTILL])
def test_a_bad_distill_option_is_one_sentence_and_nothing_is_written(tmp_path, options, words):
    out = tmp_path / "run"
    status, _, err = run(["distill", "--iterations", "2", "--no-progress", "--out", str(out), *options])
    assert_one_sentence(status, err, words)
    assert not (out / "distilled.npz").exists() and not (out / "checkpoint.npz").exists()


def test_a_finished_run_is_never_overwritten_unasked(tmp_path):
    out = tmp_path / "run"
    common = ["distill", "--iterations", "2", "--steps", "1", "--epochs", "1", "--eval-every", "0",
              "--baseline-draws", "1", "--no-progress", "--out", str(out)]
    assert run(common)[0] == 0
    before = (out / "distilled.npz").read_bytes()
    status, _, err = run(common)
    assert_one_sentence(status, err, "--force")
    assert (out / "distilled.npz").read_bytes() == before
    status, _, err = run([*common, "--resume", "--iterations", "1"])
    assert_one_sentence(status, err, "--iterations 1 is fewer than the 2 iterations")


@pytest.mark.parametrize("argv, words", [
    (["evaluate", "no/such/run"], "no/such/run"),
    (["show", "no/such/run"], "no/such/run"),
    (["download", "nope"], "nope"),
    (["table", "--grid", "nope"], "nope"),
    (["pretrain", "--nets", "999999"], "--nets"),
    (["distill", "--resume", "--out", "no/such/run"], "no/such/run"),
])
def test_other_bad_commands_are_one_sentence(argv, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                  # the relative paths would land here
    status, _, err = run(argv)
    assert_one_sentence(status, err, words)
    assert not any(tmp_path.iterdir()), "a refused command left files or folders behind"


@pytest.mark.parametrize("content", [b"", b"not an npz at all", b"PK\x03\x04 truncated zip"])
def test_a_damaged_distilled_file_is_one_sentence(tmp_path, content):
    (tmp_path / "distilled.npz").write_bytes(content)
    for command in ("evaluate", "show"):
        status, _, err = run([command, str(tmp_path)])
        assert_one_sentence(status, err, "distilled.npz")


def test_a_distilled_file_with_a_foreign_config_is_one_sentence(tmp_path):
    np.savez(tmp_path / "distilled.npz", images=np.zeros((1, 10, 1, 8, 8)), labels=np.arange(10),
             lrs=np.ones((1, 1)), mean=np.zeros(1), std=np.ones(1), version=np.array("0"),
             config=np.array(json.dumps({"dataset": "digits", "steps": "many"})))
    status, _, err = run(["evaluate", str(tmp_path)])
    assert_one_sentence(status, err, "config")
