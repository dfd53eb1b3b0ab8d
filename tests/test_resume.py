"""Ctrl-C then --resume gives exactly the run that was never interrupted.

A real SIGINT is delivered at several points *inside* an outer iteration — after the real
batch has been drawn from the random generator, after the meta-gradient, half-way through
the Adam update, while the curve point is evaluated and while a checkpoint is written — and
once, from outside, to a `ddref distill` subprocess at moments it does not choose.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ddref import data, engines, evaluate, hypergrad, loop
from ddref.distill import DistillConfig, Distiller
from ddref.objectives.bptt import Algorithm1


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", dtype="float64")


def config(**overrides):
    values = dict(steps=2, epochs=2, batch_size=64, iterations=6, dtype="float64",
                  eval_every=2, eval_inits=2, checkpoint_every=4, seed=3)
    values.update(overrides)
    return DistillConfig(**values)


def sigint_self():
    """A real Ctrl-C: the operating system delivers SIGINT to this process, and Python raises
    KeyboardInterrupt at the next bytecode boundary, wherever that is."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)  # the interrupt arrives during the sleep at the latest


def interrupt_once(monkeypatch, owner, name, at_call):
    """Patch ``owner.name`` to deliver SIGINT from inside its ``at_call``-th call (after the
    original has done its work, so the interrupted iteration has changed state)."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at_call:
            sigint_self()
        return result

    monkeypatch.setattr(owner, name, wrapped)
    return lambda: monkeypatch.setattr(owner, name, original)


def final_state(distiller):
    return (distiller.x, distiller.raw_lrs, distiller.history.losses,
            distiller.history.eval_iterations, distiller.history.eval_accuracies)


def assert_same_run(a, b):
    for u, v in zip(final_state(a), final_state(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


POINTS = [
    # (what is patched, on which call the SIGINT comes)
    ((Algorithm1, "sample_real_batch"), 5),      # the real batch of iteration 5 has been drawn
    ((engines, "mean_meta_gradient"), 3),     # after the meta-gradient of iteration 3
    ((evaluate.Adam, "step"), 4),               # Adam has updated its moments and the images
    ((Distiller, "record_accuracy"), 2),        # while evaluating the curve point at 2
    ((loop, "atomic_savez"), 1),             # while writing the periodic checkpoint
]


@pytest.mark.parametrize("init", ["fixed", "random"])
@pytest.mark.parametrize("point", POINTS, ids=[n for (o, n), _ in POINTS])
def test_sigint_inside_an_iteration_resumes_exactly(digits, tmp_path, monkeypatch, init, point):
    (owner, name), at_call = point
    cfg = config(init=init, n_nets=2 if init == "random" else 1)
    whole = Distiller(cfg, dataset=digits, progress=False).run()

    checkpoint = tmp_path / "checkpoint.npz"
    restore = interrupt_once(monkeypatch, owner, name, at_call)
    interrupted = Distiller(cfg, dataset=digits, progress=False)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(checkpoint_path=checkpoint)
    restore()

    resumed = Distiller.from_checkpoint(checkpoint, dataset=digits, progress=False)
    assert 0 <= resumed.iteration < cfg.iterations
    resumed.run(checkpoint_path=checkpoint)
    assert_same_run(whole, resumed)


def test_divergence_keeps_the_last_good_state_whatever_the_interval(digits, tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint.npz"
    distiller = Distiller(config(checkpoint_every=0, eval_every=0), dataset=digits, progress=False)
    distiller.run(iterations=3, checkpoint_path=checkpoint)
    good_x = distiller.x.copy()

    real = engines.mean_meta_gradient
    monkeypatch.setattr(engines, "mean_meta_gradient", lambda *a, **k: hypergrad.MetaGradient(
        float("nan"), real(*a, **k).grad_x, real(*a, **k).grad_raw_lrs))
    with pytest.raises(Exception, match=r"iteration 4.*right after the state it resumed from; "
                                        r"start again with --force and a smaller --lr"):
        distiller.run(iterations=6, checkpoint_path=checkpoint)
    kept = Distiller.from_checkpoint(checkpoint, dataset=digits, progress=False)
    assert kept.iteration == 3
    np.testing.assert_array_equal(kept.x, good_x)


def test_resume_may_change_the_outer_lr_but_not_the_problem(digits, tmp_path):
    checkpoint = tmp_path / "checkpoint.npz"
    Distiller(config(), dataset=digits, progress=False).run(iterations=2, checkpoint_path=checkpoint)
    slower = Distiller.from_checkpoint(checkpoint, dataset=digits, progress=False,
                                       changes={"lr": 0.001, "steps": 2})   # steps unchanged: fine
    assert slower.config.lr == 0.001 and slower.iteration == 2
    with pytest.raises(Exception, match="--steps cannot change when a run is resumed"):
        Distiller.from_checkpoint(checkpoint, dataset=digits, progress=False, changes={"steps": 3})
    with pytest.raises(Exception, match="--distill-lr cannot change"):
        Distiller.from_checkpoint(checkpoint, dataset=digits, progress=False,
                                  changes={"distill_lr": 0.001})


# ---------------------------------------------------------------------------- a real Ctrl-C from outside

CLI = ["--threads", "1", "distill", "--steps", "3", "--epochs", "2", "--iterations", "40",
       "--eval-every", "10", "--checkpoint-every", "1000", "--batch-size", "128",
       "--baseline-draws", "1", "--no-progress"]


def ddref(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "ddref", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_ctrl_c_to_the_command_then_resume_equals_one_run(tmp_path):
    whole = ddref([*CLI, "--out", str(tmp_path / "whole")])
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    out = tmp_path / "interrupted"
    for delay in (0.05, 0.4, 0.15):
        args = [*CLI, "--out", str(out)] + (["--resume"] if (out / "checkpoint.npz").exists() else [])
        run = ddref(args)
        while "distilling" not in run.stdout.readline():   # the loop is about to start
            assert run.poll() is None, run.stderr.read()
        time.sleep(delay)
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=300)
        if run.returncode == 0:          # it had already finished: nothing to interrupt
            break
        assert run.returncode == 130, stderr
        assert "Traceback" not in stderr and "--resume --out" in stderr
    else:
        finish = ddref([*CLI, "--out", str(out), "--resume"])
        assert finish.wait(timeout=300) == 0, finish.stderr.read()

    a = np.load(tmp_path / "whole" / "distilled.npz")
    b = np.load(out / "distilled.npz")
    for key in ("images", "lrs"):
        np.testing.assert_array_equal(a[key], b[key])
    ma = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    mb = json.loads((out / "metrics.json").read_text())
    assert ma["distilled_accuracy"] == mb["distilled_accuracy"]
    assert ma["history"]["losses"] == mb["history"]["losses"]
