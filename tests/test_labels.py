"""ddref.labels: learned soft labels and any number of images per step.

The label gradient passes the same checks as x̃ and η̃: both engines agree to 1e-10 in
float64 (on the fast and the plain path), and both agree with central finite differences
of the meta-loss written out independently of ddref.unroll.  Then the run: labels are
learned, saved, evaluated with, checkpointed and resumed exactly.
"""

import json

import numpy as np
import pytest
from autograd import grad

from ddref import cli, data, engines, fused, hypergrad, labels, losses, nn, plot
from ddref.distill import DistillConfig, Distiller, held_out_accuracy
from ddref.evaluate import evaluate_distilled
from ddref.saved import DistilledSet, SavedFileError
from ddref.unroll import inverse_softplus, unroll

STEPS, EPOCHS, PER_STEP, N_REAL = 3, 2, 5, 16
AGREE = 1e-10
TOL = 1e-6
MODELS = {"mlp": (1, 8, 8), "lenet": (1, 28, 28)}


def make_problem(name, seed=0):
    shape = MODELS[name]
    rng = np.random.default_rng(seed)
    model = nn.build_model(name, shape, 10)
    assigned = labels.assigned_labels(10, PER_STEP)
    return dict(
        apply=model.apply, theta0=model.init(rng, dtype="float64"),
        x_distilled=rng.normal(size=(STEPS, PER_STEP, *shape)),
        logits=labels.initial_logits(assigned, 10, STEPS, "float64")
        + 0.5 * rng.normal(size=(STEPS, PER_STEP, 10)),
        raw_lrs=np.full((EPOCHS, STEPS), inverse_softplus(0.02)) + 0.1 * rng.normal(size=(EPOCHS, STEPS)),
        x_real=rng.normal(size=(N_REAL, *shape)),
        real_targets=losses.one_hot(rng.integers(0, 10, N_REAL), 10, dtype="float64"))


def label_gradient(engine, p, form="softmax"):
    """∂L/∂z for the label vectors z through both engines' ∂L/∂t and the chain rule of the
    label form (softmax, or the identity for free labels)."""
    targets = labels.soft_targets(p["logits"], form)
    mg = engines.meta_gradient(engine, p["apply"], p["theta0"], p["x_distilled"], targets,
                                 p["raw_lrs"], p["x_real"], p["real_targets"], wrt_targets=True)
    return mg, labels.logits_gradient(targets, mg.grad_targets, form)


def reference_meta_loss(p, logits, form="softmax"):
    """The meta-loss written out without ddref.unroll: per-step targets softmax(z[s]), or
    z[s] itself for free labels."""
    apply = p["apply"]

    def loss(params, x, t):
        return losses.cross_entropy(apply(params, x), t)

    theta = p["theta0"]
    for e in range(EPOCHS):
        for s in range(STEPS):
            z = logits[s]
            t = np.exp(z - z.max(axis=1, keepdims=True))
            t = t / t.sum(axis=1, keepdims=True) if form == "softmax" else z
            g = grad(loss)(theta, p["x_distilled"][s], t)
            theta = {k: theta[k] - np.logaddexp(0.0, p["raw_lrs"][e, s]) * g[k] for k in theta}
    return loss(theta, p["x_real"], p["real_targets"])


@pytest.fixture(scope="module", params=sorted(MODELS))
def solved(request):
    p = make_problem(request.param)
    fast = {e: label_gradient(e, p) for e in ("naive", "backgrad")}
    with fused.plain():
        plain = {e: label_gradient(e, p) for e in ("naive", "backgrad")}
    return request.param, p, fast, plain


# ---------------------------------------------------------------------------- the label gradient


def test_engines_agree_on_the_label_gradient(solved, rel_err):
    name, p, fast, plain = solved
    reference = plain["naive"][1]
    assert np.abs(reference).max() > 0
    for answers in (fast, plain):
        for engine in ("naive", "backgrad"):
            mg, grad_z = answers[engine]
            assert grad_z.shape == (STEPS, PER_STEP, 10)
            assert rel_err(grad_z, reference) < AGREE, (name, engine)
            assert rel_err(mg.grad_x, plain["naive"][0].grad_x) < AGREE, (name, engine)
            assert rel_err(mg.grad_raw_lrs, plain["naive"][0].grad_raw_lrs) < AGREE, (name, engine)


def assert_matches_finite_differences(p, z, grad_z, form, seed, rel_err, central_fd):
    """∂L/∂z along random unit directions against central differences of the written-out
    meta-loss; a direction whose difference straddles a ReLU switch is skipped (3 must pass)."""
    rng = np.random.default_rng(seed)
    checked = 0
    for _ in range(6):
        direction = rng.normal(size=z.shape)
        direction /= np.linalg.norm(direction)
        fd = central_fd(lambda h: reference_meta_loss(p, z + h * direction, form), eps=1e-4)
        if fd is None:
            continue
        assert rel_err(np.vdot(grad_z, direction), fd) < TOL
        checked += 1
    assert checked >= 3


def test_label_gradient_matches_finite_differences(solved, rel_err, central_fd):
    _, p, fast, _ = solved
    assert_matches_finite_differences(p, p["logits"], fast["backgrad"][1], "softmax", 1, rel_err,
                                      central_fd)


@pytest.mark.parametrize("engine", ("naive", "backgrad"))
def test_free_label_gradient_matches_finite_differences(solved, engine, rel_err, central_fd):
    """Free labels (t = z, any real vector): ∂L/∂z from both engines against central finite
    differences of the written-out meta-loss, at label vectors well off the simplex."""
    _, p, _, _ = solved
    z = p["logits"] / 2 - 0.3                         # negative entries, rows not summing to 1
    _, grad_z = label_gradient(engine, dict(p, logits=z), "free")
    assert_matches_finite_differences(p, z, grad_z, "free", 2, rel_err, central_fd)


def test_shared_targets_get_the_summed_gradient(rel_err):
    """(n, K) targets shared by every step: ∂L/∂t is the sum of the per-step gradients, and
    asking for it leaves ∂L/∂x̃, ∂L/∂η̃ exactly as without it."""
    p = make_problem("mlp")
    shared = labels.soft_targets(p["logits"][0])
    args = (p["apply"], p["theta0"], p["x_distilled"])
    rest = (p["raw_lrs"], p["x_real"], p["real_targets"])
    for engine in ("naive", "backgrad"):
        plain = engines.meta_gradient(engine, *args, shared, *rest)
        with_t = engines.meta_gradient(engine, *args, shared, *rest, wrt_targets=True)
        per_step = engines.meta_gradient(engine, *args, np.stack([shared] * STEPS), *rest,
                                           wrt_targets=True)
        assert plain.grad_targets is None
        np.testing.assert_array_equal(plain.grad_x, with_t.grad_x)
        np.testing.assert_array_equal(plain.grad_raw_lrs, with_t.grad_raw_lrs)
        assert with_t.grad_targets.shape == shared.shape
        assert rel_err(with_t.grad_targets, per_step.grad_targets.sum(axis=0)) < AGREE
        assert rel_err(plain.grad_x, per_step.grad_x) < AGREE


def test_per_step_targets_train_each_step_on_its_own():
    p = make_problem("mlp")
    t = labels.soft_targets(p["logits"])
    lrs = np.logaddexp(0.0, p["raw_lrs"])
    by_step = unroll(p["apply"], p["theta0"], p["x_distilled"], t, lrs)
    theta = p["theta0"]
    for e in range(EPOCHS):
        for s in range(STEPS):
            theta = unroll(p["apply"], theta, p["x_distilled"][s:s + 1], t[s], lrs[e:e + 1, s:s + 1])
    for k in theta:
        np.testing.assert_allclose(by_step[k], theta[k], rtol=0, atol=1e-14)


def test_logits_gradient_is_the_softmax_chain_rule(rng, rel_err):
    z = rng.normal(size=(2, 3, 4))
    upstream = rng.normal(size=z.shape)

    def f(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return np.sum(upstream * e / e.sum(axis=-1, keepdims=True))

    import autograd.numpy as anp

    def f_traced(z):
        e = anp.exp(z)
        return anp.sum(upstream * e / anp.sum(e, axis=-1, keepdims=True))

    expected = grad(f_traced)(z)
    assert rel_err(labels.logits_gradient(labels.soft_targets(z), upstream), expected) < 1e-12
    assert abs(f(z) - f_traced(z)) < 1e-12


# ---------------------------------------------------------------------------- labels and logits


@pytest.mark.parametrize("n, k, expected", [
    (5, 10, [0, 1, 2, 3, 4]),
    (10, 10, list(range(10))),
    (20, 10, list(np.repeat(np.arange(10), 2))),
    (13, 5, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4]),
])
def test_assigned_labels_round_robin_class_major(n, k, expected):
    assert labels.assigned_labels(k, n).tolist() == expected


def test_initial_logits_put_090_on_the_assigned_class():
    z = labels.initial_logits(np.array([0, 3, 3]), 10, 2, "float64")
    t = labels.soft_targets(z)
    assert z.shape == t.shape == (2, 3, 10)
    np.testing.assert_allclose(t[:, [0, 1, 2], [0, 3, 3]], 0.9, rtol=1e-12)
    np.testing.assert_allclose(t.sum(axis=-1), 1.0, rtol=1e-12)
    other = labels.soft_targets(labels.initial_logits(np.array([2]), 5, 1, "float64", 0.99))
    np.testing.assert_allclose(other[0, 0], [0.0025, 0.0025, 0.99, 0.0025, 0.0025], rtol=1e-12)


def test_free_labels_start_hard_and_are_their_own_targets(rng):
    z = labels.initial_logits(np.array([0, 3, 3]), 10, 2, "float64", form="free")
    np.testing.assert_array_equal(z, np.stack([losses.one_hot(np.array([0, 3, 3]), 10)] * 2))
    assert labels.soft_targets(z, "free") is z
    upstream = rng.normal(size=z.shape)
    assert labels.logits_gradient(z, upstream, "free") is upstream
    with pytest.raises(ValueError, match="label form must be one of softmax, free"):
        labels.soft_targets(z, "sigmoid")


def test_a_free_label_run_leaves_the_simplex_saves_and_evaluates(digits, tmp_path):
    distiller = Distiller(config(label_form="free", label_lr=0.3), dataset=digits,
                          progress=False).run()
    learned = distiller.soft_labels()
    assert (learned < 0).any() and not np.allclose(learned.sum(axis=-1), 1.0)
    distiller.distilled_set().save(tmp_path / "d.npz")
    loaded = DistilledSet.load(tmp_path / "d.npz", num_classes=10)
    np.testing.assert_array_equal(loaded.soft_labels, learned)
    assert held_out_accuracy(loaded, dataset=digits).mean == distiller.accuracy().mean
    softmax_set = Distiller(config(iterations=1), dataset=digits, progress=False).run().distilled_set()
    softmax_set.soft_labels = learned                   # the same numbers as distributions: refused
    softmax_set.save(tmp_path / "s.npz")
    with pytest.raises(SavedFileError, match="not probability rows"):
        DistilledSet.load(tmp_path / "s.npz", num_classes=10)


@pytest.mark.parametrize("form, title, limits", [
    ("softmax", "learned label distributions", (0.0, 1.0)),
    ("free", "learned label vectors (free)", (-2.5, 2.5)),
])
def test_the_label_picture_says_which_form_it_draws(form, title, limits):
    import matplotlib.pyplot as plt

    values = labels.soft_targets(np.array([[[2.5, -1.0, 0.5], [0.0, 1.0, -2.0]]]), form)
    fig = plot.plot_soft_labels(values, form=form)
    ax = fig.axes[0]
    assert ax.get_title().startswith(title)
    np.testing.assert_allclose(ax.images[0].get_clim(), limits)
    plt.close(fig)


def test_label_init_sets_the_starting_labels(digits):
    distiller = Distiller(config(label_init=0.5), dataset=digits, progress=False)
    np.testing.assert_allclose(distiller.soft_labels()[:, range(5), range(5)], 0.5, rtol=1e-12)


# ---------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", dtype="float64")


def config(**overrides):
    values = dict(steps=2, epochs=2, batch_size=64, iterations=6, dtype="float64", eval_every=3,
                  eval_inits=2, checkpoint_every=4, seed=3, learn_labels=True, images=5)
    values.update(overrides)
    return DistillConfig(**values)


@pytest.mark.parametrize("engine", ("naive", "backgrad"))
def test_a_run_learns_the_labels_and_evaluates_with_them(digits, engine, tmp_path):
    distiller = Distiller(config(engine=engine), dataset=digits, progress=False).run()
    start = labels.soft_targets(labels.initial_logits(distiller.labels, 10, 2, "float64"))
    soft = distiller.soft_labels()
    assert distiller.labels.tolist() == [0, 1, 2, 3, 4]
    assert soft.shape == (2, 5, 10) and np.abs(soft - start).max() > 1e-3
    distilled = distiller.distilled_set()
    np.testing.assert_array_equal(distilled.soft_labels, soft)
    distilled.save(tmp_path / "d.npz")
    loaded = DistilledSet.load(tmp_path / "d.npz", num_classes=10)
    np.testing.assert_array_equal(loaded.soft_labels, soft)
    accuracy = distiller.accuracy()
    assert held_out_accuracy(loaded, dataset=digits).mean == accuracy.mean
    trained_hard = evaluate_distilled(distiller.model, digits, distiller.x, distiller.labels,
                                      distiller.lrs(), theta0=distiller.theta0)
    trained_soft = evaluate_distilled(distiller.model, digits, distiller.x, distiller.labels,
                                      distiller.lrs(), theta0=distiller.theta0, soft_labels=soft)
    assert trained_soft.mean == accuracy.mean != trained_hard.mean


def test_both_engines_distil_the_same_labels(digits):
    runs = [Distiller(config(engine=e, iterations=3), dataset=digits, progress=False).run()
            for e in ("naive", "backgrad")]
    np.testing.assert_allclose(runs[0].label_logits, runs[1].label_logits, rtol=0, atol=1e-10)
    np.testing.assert_allclose(runs[0].x, runs[1].x, rtol=0, atol=1e-10)


def test_random_order_keeps_each_image_with_its_label(digits):
    """order='random': the step permutation moves labels with their images, and the gradient
    is mapped back to them — the same as permuting by hand."""
    a = Distiller(config(order="random", steps=3), dataset=digits, progress=False)
    b = Distiller(config(order="learned", steps=3), dataset=digits, progress=False)
    a.label_logits = a.label_logits + np.random.default_rng(0).normal(size=a.label_logits.shape)
    state = a.rng.bit_generator.state
    loss, grads = a.meta_gradients_in_order()
    b.rng.bit_generator.state = state
    order = b.rng.permutation(3)
    b.x, b.label_logits = a.x[order], a.label_logits[order]
    expected_loss, expected = b.meta_gradients()
    assert loss == expected_loss
    for k in ("x", "label_logits"):
        np.testing.assert_array_equal(grads[k][order], expected[k])
    np.testing.assert_array_equal(grads["raw_lrs"], expected["raw_lrs"])


def test_checkpoint_resume_is_exact(digits, tmp_path):
    cfg = config(init="random", n_nets=2, eval_every=2)   # the stop at 4 is a curve point
    whole = Distiller(cfg, dataset=digits, progress=False).run()
    checkpoint = tmp_path / "checkpoint.npz"
    Distiller(cfg, dataset=digits, progress=False).run(iterations=4, checkpoint_path=checkpoint)
    resumed = Distiller.from_checkpoint(checkpoint, dataset=digits, progress=False)
    assert resumed.iteration == 4
    resumed.run(checkpoint_path=checkpoint)
    for k in ("x", "raw_lrs", "label_logits"):
        np.testing.assert_array_equal(getattr(whole, k), getattr(resumed, k))
    for k in ("x", "raw_lrs", "label_logits"):
        np.testing.assert_array_equal(whole.adam.m[k], resumed.adam.m[k])
        np.testing.assert_array_equal(whole.adam.v[k], resumed.adam.v[k])
    assert whole.history.losses == resumed.history.losses
    assert whole.history.eval_accuracies == resumed.history.eval_accuracies


def test_resume_may_change_the_label_lr_like_the_outer_lr(digits, tmp_path):
    """--label-lr is an outer learning rate like --lr: a resume may lower it, and the resumed
    run then moves the logits by the new rate (the Adam moments carry on unchanged)."""
    checkpoint = tmp_path / "checkpoint.npz"
    Distiller(config(), dataset=digits, progress=False).run(iterations=2, checkpoint_path=checkpoint)
    moved = {}
    for label_lr in (config().label_lr, 0.01):
        resumed = Distiller.from_checkpoint(checkpoint, dataset=digits, progress=False,
                                            changes={"label_lr": label_lr})
        assert resumed.config.label_lr == label_lr
        before = resumed.label_logits.copy()
        resumed.run(iterations=3)
        moved[label_lr] = np.abs(resumed.label_logits - before).max()
    assert moved[0.01] < moved[config().label_lr]


def test_a_checkpoint_without_label_logits_is_refused(digits, tmp_path):
    checkpoint = tmp_path / "checkpoint.npz"
    Distiller(config(), dataset=digits, progress=False).run(iterations=1, checkpoint_path=checkpoint)
    arrays = dict(np.load(checkpoint))
    del arrays["label_logits"]
    np.savez(checkpoint, **arrays)
    with pytest.raises(Exception, match="lacks label_logits"):
        Distiller.from_checkpoint(checkpoint, dataset=digits, progress=False)


def test_hard_labels_with_fewer_images_than_classes(digits):
    distiller = Distiller(config(learn_labels=False, iterations=1), dataset=digits, progress=False)
    assert distiller.label_logits is None and distiller.targets.shape == (5, 10)
    distiller.run()
    assert distiller.distilled_set().soft_labels is None


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, message", [
    (dict(engine="checkpoint"), "--engine gives no gradient for learned labels: use --engine naive "
                                "or backgrad with --learn-labels; got 'checkpoint'"),
    (dict(momentum=0.5), "--momentum cannot be used with --learn-labels: leave it at 0; got 0.5"),
    (dict(truncate=2), "--truncate cannot be used with --learn-labels: leave it at 0; got 2"),
    (dict(init="fixed-pretrained"), "--init must be fixed or random with --learn-labels; got 'fixed-pretrained'"),
    (dict(objective="attack"), "--objective must be classify with --learn-labels; got 'attack'"),
    (dict(images=5, images_per_class=2), "--images and --images-per-class both set"),
    (dict(images=-1), "--images must be 0"),
    (dict(learn_labels=1), "--learn-labels must be bool"),
    (dict(label_lr=0.0), "--label-lr must be a positive finite number"),
    (dict(learn_labels=False, label_lr=0.5), "--label-lr only applies with --learn-labels"),
    (dict(label_init=1.0), "--label-init must be a probability strictly between 0 and 1"),
    (dict(learn_labels=False, label_init=0.5), "--label-init only applies with --learn-labels"),
    (dict(label_form="sigmoid"), "--label-form must be one of softmax, free"),
    (dict(learn_labels=False, label_form="free"), "--label-form only applies with --learn-labels"),
    (dict(label_form="free", label_init=0.5), "--label-init only applies with --label-form softmax"),
])
def test_bad_label_settings_are_one_sentence(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides).validate()


def test_more_images_of_a_class_than_it_has(digits):
    with pytest.raises(ValueError, match=r"--images 2000 asks for \d+ images of class \d+, more than"):
        Distiller(config(images=2000), dataset=digits, progress=False)


@pytest.mark.parametrize("change, message", [
    (lambda s: s[:, :, :9], "soft labels have shape"),
    (lambda s: s * 2, "not probability rows"),
    (lambda s: np.where(s > 0.5, np.nan, s), "NaN or inf"),
])
def test_bad_soft_labels_are_refused_on_load(digits, tmp_path, change, message):
    distilled = Distiller(config(iterations=1), dataset=digits, progress=False).run().distilled_set()
    distilled.soft_labels = change(distilled.soft_labels)
    distilled.save(tmp_path / "d.npz")
    with pytest.raises(SavedFileError, match=message):
        DistilledSet.load(tmp_path / "d.npz", num_classes=10)


def test_cli_learns_labels_and_evaluate_reproduces(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", "--steps", "1", "--epochs", "2", "--iterations", "3", "--batch-size", "64",
            "--learn-labels", "--images", "5", "--baseline-draws", "1", "--eval-every", "0",
            "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["learn_labels"] is True and metrics["n_images"] == 5
    assert DistilledSet.load(out / "distilled.npz").soft_labels.shape == (1, 5, 10)
    assert (out / "labels.png").stat().st_size > 0          # the label distributions, drawn
    capsys.readouterr()
    assert cli.main(["evaluate", str(out)]) == 0
    assert "reproduced" in capsys.readouterr().out
    assert cli.main(["evaluate", str(out), "--order", "shuffled"]) == 0
    assert "test accuracy, shuffled order" in capsys.readouterr().out
    assert cli.main(["evaluate", str(out), "--model", "lenet", "--n-inits", "1"]) == 0
    assert "with the learned learning rates" in capsys.readouterr().out


def test_label_lr_is_the_adam_rate_of_the_logits(digits):
    """The first Adam step moves every parameter by lr · m̂/(√v̂ + ε): doubling --label-lr
    doubles the step of the logits and leaves the images as they were."""
    steps = {}
    for label_lr in (0.01, 0.02):
        distiller = Distiller(config(lr=0.01, label_lr=label_lr, iterations=1, eval_every=0),
                              dataset=digits, progress=False)
        before = distiller.label_logits
        distiller.step()
        steps[label_lr] = (distiller.label_logits - before, distiller.x)
    np.testing.assert_allclose(steps[0.02][0], 2 * steps[0.01][0], rtol=1e-12, atol=0)
    np.testing.assert_array_equal(steps[0.02][1], steps[0.01][1])
    assert np.abs(steps[0.01][0]).max() == pytest.approx(0.01, rel=1e-4)   # Adam: first step ±lr


@pytest.mark.parametrize("engine", ("naive", "backgrad"))
def test_learned_labels_on_the_fake_device(engine, rel_err):
    """Label learning creates no host arrays: on the strict fake device (tests/fake_device.py)
    it gives numpy's numbers, random step order and evaluation included."""
    from ddref import _cupy, backend
    try:
        from fake_device import FakeArray, fake_xp
    except ImportError:  # tests/ imported as a package
        from tests.fake_device import FakeArray, fake_xp

    cfg = DistillConfig(dataset="digits", model="mlp", engine=engine, steps=2, epochs=2,
                        batch_size=32, iterations=2, eval_every=0, eval_inits=1,
                        checkpoint_every=0, dtype="float64", learn_labels=True, images=5,
                        order="random")

    def run():
        distiller = Distiller(cfg, progress=False)
        for _ in range(2):
            distiller.step()
        return distiller, distiller.accuracy(), distiller.distilled_set()

    _cupy.install(fake_xp, FakeArray)
    with backend._using_namespace("fake", fake_xp) as xp:
        on_device, device_accuracy, device_set = run()
        assert type(on_device.label_logits) is xp.ndarray
    with backend.using("numpy"):
        on_host, host_accuracy, host_set = run()
    assert rel_err(backend.to_numpy(on_device.label_logits), on_host.label_logits) < 1e-12
    assert rel_err(device_set.soft_labels, host_set.soft_labels) < 1e-12
    assert str(device_accuracy) == str(host_accuracy)
