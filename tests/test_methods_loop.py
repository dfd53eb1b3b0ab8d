"""DC, DM and KIP in the outer loop (issue 18): each runs end to end through Distiller and
`ddref distill --method X`, resumes to the same bytes after Ctrl-C (DC's network and its place
in the schedule included), saves a set whose field-protocol accuracy `held_out_accuracy`
reproduces, and refuses the options of Algorithm 1 that mean nothing for it."""

import json

import numpy as np
import pytest

from ddref import cli, data, objectives
from ddref.config import DistillConfig
from ddref.distill import Distiller, held_out_accuracy
from ddref.objectives.dc import GradientMatching
from ddref.saved import DistilledSet

METHODS = ("dc", "dm", "kip")


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", dtype="float64")


def small(method, **overrides):
    """A few seconds on digits: DC at 10 images per class (its schedule (10, 50): a network's
    turn is 10 matching steps with 50 epochs of training between them), the others at 2."""
    values = dict(dtype="float64", iterations=14, eval_every=7, checkpoint_every=4, seed=3,
                  field_epochs=15, eval_inits=2, images_per_class=10 if method == "dc" else 2,
                  batch_size=20)
    return DistillConfig.for_method(method, **{**values, **overrides})


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_through_the_loop_and_its_saved_set_is_judged_again(method, digits, tmp_path):
    run = Distiller(small(method), dataset=digits, progress=False).run()
    losses = run.history.losses
    assert run.iteration == 14 and len(losses) == 14 and np.isfinite(losses).all()
    assert run.history.eval_iterations == [0, 7, 14]
    n = 10 * run.config.images_per_class
    assert run.learned["x"].shape == (1, n, 1, 8, 8)
    assert not np.array_equal(run.learned["x"], Distiller(small(method), dataset=digits,
                                                          progress=False).learned["x"])  # it learned
    saved = run.distilled_set()
    assert saved.images.shape == (1, n, 1, 8, 8) and saved.lrs.shape == (1, 1)
    assert list(saved.labels) == sorted(saved.labels) and np.bincount(saved.labels).tolist() == [n // 10] * 10
    saved.save(tmp_path / "distilled.npz")
    again = held_out_accuracy(DistilledSet.load(tmp_path / "distilled.npz"), dataset=digits)
    assert again == run.accuracy()
    assert again.n == 2 and 0.3 < again.mean <= 1


@pytest.mark.parametrize("method", METHODS)
def test_the_initial_images_are_real_images_of_their_class(method, digits):
    run = Distiller(small(method), dataset=digits, progress=False)
    x = run.learned["x"][0].reshape(len(run.labels), -1)
    train = digits.x_train.reshape(len(digits.x_train), -1)
    for image, label in zip(x, run.labels):
        matches = np.flatnonzero((train == image).all(axis=1))
        assert len(matches) and digits.y_train[matches[0]] == label


def test_dc_trains_its_network_between_matching_steps_and_draws_a_fresh_one_per_turn(digits):
    run = Distiller(small("dc", iterations=0), dataset=digits, progress=False)
    assert (run.objective.outer_loop, run.objective.inner_loop) == (10, 50)
    thetas = []
    for _ in range(11):
        run.step()
        thetas.append(dict(run.objective.theta))
    assert run.objective.position == 1          # the 11th step began a new network's turn
    assert not np.array_equal(thetas[0]["w0"], thetas[1]["w0"])         # trained after step 1
    # the 10th step ends the turn (no training), the 11th draws θ afresh and trains it
    assert np.array_equal(thetas[8]["w0"], thetas[9]["w0"])


@pytest.mark.parametrize("method, interrupt_at", [("dc", 6), ("dc", 11), ("dm", 9), ("kip", 9)])
def test_ctrl_c_then_resume_gives_the_bytes_of_an_uninterrupted_run(method, interrupt_at, digits,
                                                                   tmp_path, monkeypatch):
    learn_labels = {"learn_labels": True} if method == "kip" else {}
    config = small(method, **learn_labels)
    whole = Distiller(config, dataset=digits, progress=False).run()

    cls = objectives.METHODS[method]
    original, calls = cls.loss_and_grads, {"n": 0}

    def interrupted(self, learned):
        calls["n"] += 1
        result = original(self, learned)       # DC has drawn its fresh network by now
        if calls["n"] == interrupt_at:
            raise KeyboardInterrupt
        return result

    path = tmp_path / "checkpoint.npz"
    monkeypatch.setattr(cls, "loss_and_grads", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Distiller(config, dataset=digits, progress=False).run(checkpoint_path=path)
    monkeypatch.setattr(cls, "loss_and_grads", original)

    resumed = Distiller.from_checkpoint(path, dataset=digits, progress=False)
    assert resumed.iteration == interrupt_at - 1
    resumed.run(checkpoint_path=path)
    assert sorted(resumed.learned) == sorted(whole.learned)
    for k in whole.learned:
        assert resumed.learned[k].tobytes() == whole.learned[k].tobytes(), k
    for k, v in whole.objective.state().items():
        assert np.asarray(resumed.objective.state()[k]).tobytes() == np.asarray(v).tobytes(), k
    assert resumed.history.losses == whole.history.losses
    assert resumed.rng.bit_generator.state == whole.rng.bit_generator.state


def test_a_checkpoint_with_a_dc_network_of_another_shape_is_refused(digits, tmp_path):
    path = tmp_path / "checkpoint.npz"
    Distiller(small("dc", iterations=3), dataset=digits, progress=False).run(checkpoint_path=path)
    arrays = dict(np.load(path))
    arrays["dc_theta/w0"] = arrays["dc_theta/w0"][:, :3]
    np.savez(path, **arrays)
    with pytest.raises(Exception, match="damaged: dc_theta/w0 has shape"):
        Distiller.from_checkpoint(path, dataset=digits, progress=False)


def test_kip_learns_its_labels_when_asked_and_trains_networks_on_them(digits, tmp_path):
    run = Distiller(small("kip", learn_labels=True, label_lr=0.05), dataset=digits, progress=False).run()
    assert run.config.label_form == "free"
    z = run.learned["label_logits"]
    start = np.eye(10)[run.labels] - 0.1
    assert z.shape == (20, 10) and not np.allclose(z, start)
    saved = run.distilled_set()
    np.testing.assert_array_equal(saved.soft_labels, (z + 0.1)[None])
    saved.save(tmp_path / "distilled.npz")
    assert held_out_accuracy(DistilledSet.load(tmp_path / "distilled.npz"), dataset=digits) == run.accuracy()


@pytest.mark.parametrize("method", METHODS)
def test_ddref_distill_method_writes_a_set_that_ddref_evaluate_reproduces(method, tmp_path, capsys):
    out = tmp_path / method
    ipc = "10" if method == "dc" else "2"
    argv = ["distill", "--method", method, "--iterations", "5", "--images-per-class", ipc,
            "--batch-size", "16", "--field-epochs", "10", "--eval-inits", "2", "--eval-every", "0",
            "--baseline-draws", "2", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"with {method} (" in printed and "field protocol" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["method"] == method and metrics["protocol"]["epochs"] == 10
    assert metrics["config"]["lr"] == DistillConfig.for_method(method).lr       # the paper's
    assert metrics["random_real_accuracy"]["n"] == 2
    accuracy = held_out_accuracy(DistilledSet.load(out / "distilled.npz"))
    assert accuracy.mean == metrics["distilled_accuracy"]["mean"]
    assert cli.main(["evaluate", str(out)]) == 0
    assert "(reproduced)" in capsys.readouterr().out
    assert cli.main(["evaluate", str(out), "--order", "pool"]) == 2
    assert "--order and --model apply to sets of --method bptt" in capsys.readouterr().err


def test_for_method_gives_each_papers_defaults_and_keeps_what_is_given():
    dc, dm, kip = (DistillConfig.for_method(m) for m in METHODS)
    assert (dc.lr, dc.batch_size, dc.steps, dc.epochs, dc.decay_every, dc.init) == (0.1, 256, 1, 1, 0, "random")
    assert (dm.lr, dm.batch_size) == (1.0, 256)
    assert (kip.lr, kip.batch_size, kip.betas) == (0.04, 500, (0.9, 0.999))
    assert DistillConfig.for_method("dm", lr=3.0).lr == 3.0
    assert DistillConfig.for_method("bptt") == DistillConfig()
    assert GradientMatching.optimiser == "sgd" and objectives.METHODS["kip"].optimiser == "adam"


@pytest.mark.parametrize("method, option, value, says", [
    ("dc", "steps", 3, "--steps 3 does not apply to --method dc, which learns one unordered set"),
    ("dm", "epochs", 2, "--epochs 2 does not apply to --method dm"),
    ("kip", "engine", "naive", "--engine 'naive' does not apply to --method kip, which has no meta-gradient"),
    ("dc", "order", "random", "--order 'random' does not apply to --method dc"),
    ("dm", "momentum", 0.9, "--momentum 0.9 does not apply to --method dm"),
    ("dc", "objective", "attack", "--objective 'attack' does not apply"),
    ("dm", "init", "fixed-pretrained", "--init 'fixed-pretrained' does not apply to --method dm"),
    ("dm", "init", "fixed", "--init 'fixed' does not apply to --method dm"),
    ("kip", "distill_lr", 0.1, "--distill-lr 0.1 does not apply to --method kip, which learns no learning rates"),
    ("dc", "betas", (0.9, 0.99), r"--betas \(0.9, 0.99\) does not apply to --method dc, which updates its images by SGD"),
    ("dm", "learn_labels", True, "--learn-labels True does not apply to --method dm"),
    ("dc", "model", "linear", "--model linear is not one --method dc supports"),
    ("dc", "images_per_class", 3, "DC's schedule .* is defined for 1, 10, 20"),
    ("kip", "width", 8, "--width only applies to --model convnet3"),
])
def test_options_that_mean_nothing_for_a_method_are_refused_in_one_sentence(method, option, value, says):
    config = DistillConfig.for_method(method, **{option: value})
    with pytest.raises(ValueError, match=says):
        objectives.check(config)


def test_truncate_and_label_form_softmax_are_refused_for_kip():
    with pytest.raises(ValueError, match="--truncate 1 does not apply to --method kip"):
        objectives.check(DistillConfig.for_method("kip", truncate=1))
    with pytest.raises(ValueError, match="use --label-form free"):
        objectives.check(DistillConfig.for_method("kip", learn_labels=True, label_form="softmax"))


def test_the_width_of_convnet3_reaches_the_model(digits):
    run = Distiller(small("dm", model="convnet3", width=6, iterations=1), dataset=digits, progress=False)
    assert run.model.init.shapes["c1w"] == (6, 1, 3, 3)
    run.step()


def test_a_pool_set_is_drawn_as_a_pool_without_learned_rates(tmp_path):
    """dc, dm and kip learn no steps and no η̃: the picture says 'pool', not 'step 1 η̃ 0.010'."""
    import matplotlib

    matplotlib.use("Agg")
    from ddref import plot
    from ddref.distill import DistillConfig, Distiller

    config = DistillConfig.for_method("dm", iterations=2, eval_every=0, images_per_class=2,
                                      batch_size=16, field_epochs=1)
    distilled = Distiller(config, progress=False).run().distilled_set()
    fig = plot.plot_distilled(distilled)
    texts = [t.get_text() for ax in fig.axes for t in (ax.texts + [ax.title, ax.yaxis.label])]
    texts.append(fig._suptitle.get_text() if fig._suptitle else "")
    assert not any("η̃" in t for t in texts) and any("unordered pool" in t for t in texts)
