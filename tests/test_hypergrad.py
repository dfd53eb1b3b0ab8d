"""ddref.unroll and ddref.hypergrad: the inner loop and the two meta-gradient engines.

The two engines must give the same numbers (1e-10 in float64), and both must agree with
central finite differences (1e-6) of the meta-loss ℓ(x_real, θ_T(x̃, η̃)), for the images
along random directions and for every raw learning rate.

Finite differences of the meta-loss need care: θ_T depends on ∇θ ℓ, which jumps where a
ReLU / max-pool unit switches, so the meta-loss itself has (small) jumps.  The
``central_fd`` fixture detects a step that straddles one (eps and eps/2 disagree) and
halves eps; the image checks draw another direction if that is not enough.
"""

import numpy as np
import pytest
from autograd import grad

from ddref import engines, fused, hypergrad, losses, nn
from ddref.unroll import inverse_softplus, sgd_step, softplus, step_schedule, unroll

from problems import EPOCHS, MODELS, PER_STEP, STEPS, make_problem
AGREE = 1e-10
TOL = 1e-6


def reference_meta_loss(p, x_distilled, raw_lrs):
    """The meta-loss written out independently of ddref.unroll: E epochs × S steps of
    θ ← θ − softplus(raw[e, s]) ∇θ ℓ(x̃[s], θ), then ℓ on the real batch."""
    apply, targets = p["apply"], p["targets"]

    def loss(params, x, t):
        return losses.cross_entropy(apply(params, x), t)

    theta = p["theta0"]
    for e in range(raw_lrs.shape[0]):
        for s in range(raw_lrs.shape[1]):
            lr = np.logaddexp(0.0, raw_lrs[e, s])
            g = grad(loss)(theta, x_distilled[s], targets)
            theta = {k: theta[k] - lr * g[k] for k in theta}
    return loss(theta, p["x_real"], p["real_targets"])


@pytest.fixture(scope="module", params=sorted(MODELS))
def solved(request):
    """A problem and both engines' answers, computed once per model."""
    p = make_problem(request.param)
    return request.param, p, {e: engines.meta_gradient(e, **p) for e in ("naive", "backgrad")}


# ---------------------------------------------------------------------------- engines agree


def test_naive_and_backgrad_agree(solved, rel_err):
    _, p, mg = solved
    naive, back = mg["naive"], mg["backgrad"]
    assert isinstance(naive.loss, float) and isinstance(back.loss, float)
    assert naive.grad_x.shape == back.grad_x.shape == p["x_distilled"].shape
    assert naive.grad_raw_lrs.shape == back.grad_raw_lrs.shape == p["raw_lrs"].shape
    assert rel_err(naive.loss, back.loss) < AGREE
    assert rel_err(naive.grad_x, back.grad_x) < AGREE
    assert rel_err(naive.grad_raw_lrs, back.grad_raw_lrs) < AGREE
    for s in range(STEPS):                    # each step's images, not just the total
        assert rel_err(naive.grad_x[s], back.grad_x[s]) < AGREE
    # and the gradients are not trivially zero
    assert np.all(np.abs(naive.grad_raw_lrs) > 0) and np.linalg.norm(naive.grad_x) > 0


def test_loss_is_the_meta_loss(solved, rel_err):
    _, p, mg = solved
    want = reference_meta_loss(p, p["x_distilled"], p["raw_lrs"])
    assert rel_err(mg["naive"].loss, want) < 1e-12
    assert rel_err(mg["backgrad"].loss, want) < 1e-12


# ---------------------------------------------------------------------------- finite differences


def test_image_gradient_matches_finite_differences(solved, rel_err, central_fd):
    """Along directions d = ĝ + r̂ (unit gradient plus a unit random vector), over all
    images and supported on each step's images in turn (so a wrong per-step accumulation
    across epochs would show).

    Why not a plain random d: in ~10⁴ dimensions a random direction is nearly orthogonal
    to the gradient, so ⟨g, d⟩ is tiny next to ℓ and rounding in ℓ(x ± εd) alone costs
    ~1e-6; the ĝ term keeps ⟨g, d⟩ ≈ ‖g‖ while r̂ still probes every other direction.
    """
    name, p, mg = solved
    x, raw = p["x_distilled"], p["raw_lrs"]
    rng = np.random.default_rng(1)
    masks = [np.ones(STEPS, bool)] + [np.arange(STEPS) == s for s in range(STEPS)]
    if name == "lenet":            # keep the suite fast: all images, then step 0 alone
        masks = masks[:2]
    for mask in masks:
        mask = mask[:, None, None, None, None]
        g = mg["naive"].grad_x * mask
        for _attempt in range(5):
            r = rng.normal(size=x.shape) * mask
            d = g / np.linalg.norm(g) + r / np.linalg.norm(r)
            fd = central_fd(lambda t: reference_meta_loss(p, x + t * d, raw),
                            eps=1e-4, halvings=6)
            if fd is not None:
                break
        else:
            pytest.fail(f"{name}: every direction straddled a switching surface")
        for engine in ("naive", "backgrad"):
            assert rel_err(fd, np.vdot(mg[engine].grad_x, d)) < TOL, (engine, mask.ravel())


def test_learning_rate_gradient_matches_finite_differences(solved, rel_err, central_fd):
    """Every raw learning rate, one coordinate at a time.  ∂ℓ/∂raw can be ~1e-5 next to
    ℓ ≈ 2.3, so the ladder starts at eps = 1e-4 (rounding ~1e-8) and steps down past jumps."""
    _, p, mg = solved
    x, raw = p["x_distilled"], p["raw_lrs"]
    for i in np.ndindex(raw.shape):
        e = np.zeros_like(raw)
        e[i] = 1.0
        fd = central_fd(lambda t: reference_meta_loss(p, x, raw + t * e), eps=1e-4, halvings=6)
        assert fd is not None, f"raw_lrs{i}: finite difference straddles a switch"
        for engine in ("naive", "backgrad"):
            assert rel_err(fd, mg[engine].grad_raw_lrs[i]) < TOL, (engine, i)


# ---------------------------------------------------------------------------- other objectives


def test_squared_error_loss_on_the_linear_model(rel_err, central_fd):
    """The ``loss`` keyword (§3.4: linear regression with the squared error) reaches both
    the inner steps and the outer loss, in both engines; checked against a hand-written
    unroll of θ ← θ − η dᵀ(dθ − t)/n and central differences."""
    rng = np.random.default_rng(11)
    model = nn.build_model("linear", (1, 3, 3), num_classes=2)
    theta0 = model.init(rng)
    p = dict(apply=model.apply, theta0=theta0, x_distilled=rng.normal(size=(2, 4, 1, 3, 3)),
             targets=rng.normal(size=(4, 2)), raw_lrs=rng.normal(size=(2, 2)) - 2.0,
             x_real=rng.normal(size=(6, 1, 3, 3)), real_targets=rng.normal(size=(6, 2)),
             loss=losses.squared_error)
    mg = {e: engines.meta_gradient(e, **p) for e in ("naive", "backgrad")}

    def by_hand(x_distilled, raw_lrs):
        w = theta0["w"]
        for e in range(raw_lrs.shape[0]):
            for s in range(raw_lrs.shape[1]):
                d = x_distilled[s].reshape(4, -1)
                w = w - np.logaddexp(0.0, raw_lrs[e, s]) * d.T @ (d @ w - p["targets"]) / 4
        r = p["x_real"].reshape(6, -1) @ w - p["real_targets"]
        return 0.5 * np.sum(r ** 2) / 6

    x, raw = p["x_distilled"], p["raw_lrs"]
    for e in ("naive", "backgrad"):
        assert rel_err(mg[e].loss, by_hand(x, raw)) < 1e-12
    assert rel_err(mg["naive"].grad_x, mg["backgrad"].grad_x) < AGREE
    assert rel_err(mg["naive"].grad_raw_lrs, mg["backgrad"].grad_raw_lrs) < AGREE
    g = mg["naive"].grad_x
    d = g / np.linalg.norm(g) + rng.normal(size=g.shape) / np.sqrt(g.size)
    fd = central_fd(lambda t: by_hand(x + t * d, raw), eps=1e-5)
    assert fd is not None and rel_err(fd, np.vdot(g, d)) < TOL
    for i in np.ndindex(raw.shape):
        unit = np.zeros_like(raw)
        unit[i] = 1.0
        fd = central_fd(lambda t: by_hand(x, raw + t * unit), eps=1e-5)
        for e in ("naive", "backgrad"):
            assert fd is not None and rel_err(fd, mg[e].grad_raw_lrs[i]) < TOL


@pytest.mark.parametrize("variant", ["attack", "soft_targets", "one_epoch_one_step"])
def test_engines_agree_on_other_objectives(rel_err, variant):
    """The poisoning objective (§3.5), soft distilled labels, and a single step."""
    if variant == "one_epoch_one_step":
        p = make_problem("mlp", seed=3, steps=1, epochs=1)
    else:
        p = make_problem("mlp", seed=3)
    if variant == "attack":
        labels = p["real_targets"].argmax(axis=1)
        p["real_targets"] = losses.attack_targets(labels, 10, source_class=int(labels[0]),
                                                  target_class=(int(labels[0]) + 1) % 10)
    elif variant == "soft_targets":
        t = np.random.default_rng(4).random(size=p["targets"].shape)
        p["targets"] = t / t.sum(axis=1, keepdims=True)
    a, b = hypergrad.naive(**p), hypergrad.backgrad(**p)
    assert rel_err(a.loss, b.loss) < AGREE
    assert rel_err(a.grad_x, b.grad_x) < AGREE
    assert rel_err(a.grad_raw_lrs, b.grad_raw_lrs) < AGREE


@pytest.mark.parametrize("engine", ("naive", "backgrad"))
def test_engines_do_not_mutate_inputs(engine):
    p = make_problem("mlp", seed=5)
    before = {k: (({kk: vv.copy() for kk, vv in v.items()}) if isinstance(v, dict)
                  else v.copy() if isinstance(v, np.ndarray) else v) for k, v in p.items()}
    engines.meta_gradient(engine, **p)
    for k, v in p.items():
        if isinstance(v, dict):
            for kk in v:
                np.testing.assert_array_equal(v[kk], before[k][kk])
        elif isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, before[k])


# ---------------------------------------------------------------------------- float32


@pytest.mark.parametrize("engine", ("naive", "backgrad"))
def test_float32_in_float32_out(engine, rel_err):
    p32 = make_problem("mlp", seed=6, dtype="float32")
    assert all(v.dtype == np.float32 for v in p32["theta0"].values())
    mg = engines.meta_gradient(engine, **p32)
    assert mg.grad_x.dtype == np.float32
    assert mg.grad_raw_lrs.dtype == np.float32
    assert np.isfinite(mg.loss)
    # same numbers as float64, to float32 accuracy
    mg64 = engines.meta_gradient(engine, **make_problem("mlp", seed=6))
    assert rel_err(mg.loss, mg64.loss) < 1e-5
    assert rel_err(mg.grad_x, mg64.grad_x) < 1e-3
    assert rel_err(mg.grad_raw_lrs, mg64.grad_raw_lrs) < 1e-3


# ---------------------------------------------------------------------------- errors


def test_meta_gradient_unknown_engine():
    p = make_problem("mlp")
    with pytest.raises(ValueError, match="unknown meta-gradient engine 'bogus'.*naive.*backgrad"):
        engines.meta_gradient("bogus", **p)


@pytest.mark.parametrize("engine", ("naive", "backgrad"))
def test_meta_gradient_dispatches(engine):
    p = make_problem("mlp", seed=7)
    via = engines.meta_gradient(engine, **p)
    direct = getattr(hypergrad, engine)(**p)
    assert via.loss == direct.loss
    np.testing.assert_array_equal(via.grad_x, direct.grad_x)
    np.testing.assert_array_equal(via.grad_raw_lrs, direct.grad_raw_lrs)


BAD_LR_SHAPES = {"too_many_steps": (EPOCHS, STEPS + 1), "too_few_steps": (EPOCHS, STEPS - 1),
                 "flat": (EPOCHS * STEPS,), "three_d": (EPOCHS, STEPS, 1)}


@pytest.mark.parametrize("bad", sorted(BAD_LR_SHAPES))
@pytest.mark.parametrize("engine", ("naive", "backgrad"))
def test_mismatched_lrs_shape_is_a_clear_error(engine, bad):
    p = make_problem("mlp")
    p["raw_lrs"] = np.zeros(BAD_LR_SHAPES[bad])
    with pytest.raises(ValueError, match=r"learning rates.*\(epochs, steps\) = \(E, 3\)"):
        engines.meta_gradient(engine, **p)


def test_unroll_mismatched_lrs_shape():
    p = make_problem("mlp")
    with pytest.raises(ValueError, match=r"learning rates of shape \(2, 2\).*3 groups"):
        unroll(p["apply"], p["theta0"], p["x_distilled"], p["targets"], np.ones((2, 2)))


# ---------------------------------------------------------------------------- unroll


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mean_meta_gradient_of_stacked_networks_is_the_mean(name, rel_err):
    """K networks at once (stacked for the MLP's back-gradient) give the mean of the K
    one-network meta-gradients, for either engine and path."""
    problems = [make_problem(name, seed=s) for s in (11, 12, 13)]
    p = problems[0]
    theta0s = [q["theta0"] for q in problems]
    x_reals = [q["x_real"] for q in problems]
    real_targets = [q["real_targets"] for q in problems]
    singles = [engines.meta_gradient("naive", p["apply"], th, p["x_distilled"], p["targets"], p["raw_lrs"],
                                       xr, tr) for th, xr, tr in zip(theta0s, x_reals, real_targets)]
    want_loss = np.mean([m.loss for m in singles])
    want_x = np.mean([m.grad_x for m in singles], axis=0)
    want_raw = np.mean([m.grad_raw_lrs for m in singles], axis=0)
    for engine in ("naive", "backgrad"):
        mg = engines.mean_meta_gradient(engine, p["apply"], theta0s, p["x_distilled"], p["targets"],
                                          p["raw_lrs"], x_reals, real_targets)
        assert rel_err(mg.loss, want_loss) < AGREE, engine
        assert rel_err(mg.grad_x, want_x) < AGREE, engine
        assert rel_err(mg.grad_raw_lrs, want_raw) < AGREE, engine


def test_the_mlp_stacks_and_lenet_does_not():
    mlp = nn.build_model("mlp", (1, 8, 8), 10)
    assert fused.gradient_for(mlp.apply, losses.cross_entropy).stackable
    lenet = nn.build_model("lenet", (1, 28, 28), 10)
    assert not fused.gradient_for(lenet.apply, losses.cross_entropy).stackable


def test_unroll_blames_images_without_the_step_axis():
    p = make_problem("mlp")
    one_step = p["x_distilled"][0]                      # (n, C, H, W): no step axis
    with pytest.raises(ValueError, match="distilled images of shape .* lack the step axis"):
        unroll(p["apply"], p["theta0"], one_step, p["targets"], np.ones((1, PER_STEP)))


@pytest.mark.parametrize("engine", [None, *("naive", "backgrad")])
@pytest.mark.parametrize("what", ["images", "lrs"])
def test_nan_inputs_are_a_clear_error(engine, what):
    p = make_problem("mlp")
    x, raw = p["x_distilled"].copy(), p["raw_lrs"].copy()
    (x if what == "images" else raw)[0, 0] = np.nan
    with pytest.raises(ValueError, match="contain NaN or inf"):
        if engine is None:
            with np.errstate(invalid="ignore"):                     # softplus(NaN), the test's own call
                lrs = softplus(raw)
            unroll(p["apply"], p["theta0"], x, p["targets"], lrs)
        else:
            engines.meta_gradient(engine, p["apply"], p["theta0"], x, p["targets"], raw,
                                    p["x_real"], p["real_targets"])


def test_unroll_return_all():
    p = make_problem("mlp", seed=8)
    lrs = softplus(p["raw_lrs"])
    args = (p["apply"], p["theta0"], p["x_distilled"], p["targets"], lrs)
    trajectory = unroll(*args, return_all=True)
    final = unroll(*args)
    assert len(trajectory) == EPOCHS * STEPS + 1
    assert trajectory[0] is p["theta0"]
    for k in final:
        np.testing.assert_array_equal(trajectory[-1][k], final[k])
    # each entry is one SGD step on x̃[s] with η̃[e, s] from the previous one, epoch-major
    for t, (e, s) in enumerate(step_schedule(EPOCHS, STEPS)):
        want = sgd_step(p["apply"], trajectory[t], p["x_distilled"][s], p["targets"], lrs[e, s])
        for k in want:
            np.testing.assert_array_equal(trajectory[t + 1][k], want[k])
    assert step_schedule(2, 3) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


@pytest.mark.parametrize("lr", [1e-300, 1e-8, 0.02, 1.0, 30.0, 800.0])
def test_softplus_inverts_inverse_softplus(lr):
    raw = inverse_softplus(lr)
    assert abs(float(softplus(raw)) - lr) <= 1e-15 * max(lr, 1.0)


def test_softplus_of_002_exactly():
    assert abs(float(softplus(inverse_softplus(0.02))) - 0.02) < 1e-15


def test_softplus_is_positive_and_stable():
    raw = np.array([-800.0, -30.0, 0.0, 30.0, 800.0])
    lr = softplus(raw)
    assert np.all(np.isfinite(lr)) and np.all(lr >= 0) and np.all(lr[1:] > 0)
    assert lr[2] == pytest.approx(np.log(2.0), rel=1e-15)
    assert lr[4] == 800.0


@pytest.mark.parametrize("lr", [0.0, -0.02, -1.0, float("nan")])
def test_inverse_softplus_rejects_non_positive(lr):
    with pytest.raises(ValueError, match="must be positive"):
        inverse_softplus(lr)
