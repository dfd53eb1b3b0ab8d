"""Meta-gradients of the other objectives against central finite differences (float64).

Two variants of Algorithm 1 change what the engines differentiate:

* the poisoning attack (§3.5): the outer loss is the cross-entropy on the real batch
  against ``losses.attack_targets`` — every image of class K labelled T — not its labels;
* soft distilled labels: the inner steps train on label distributions (rows summing to 1,
  not one-hot) instead of one-hot rows.

For each (and both together) the meta-gradients of both engines with respect to the images
x̃ and every raw learning rate are checked against central differences of a meta-loss
written out here, independently of ddref.unroll and ddref.losses, on a tiny MLP.  Each
case first checks that it is not the plain objective in disguise: the targets really
differ, and so does the meta-gradient.
"""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

from ddref import engines, hypergrad, losses, nn
from ddref.unroll import inverse_softplus

SHAPE, CLASSES, HIDDEN = (1, 4, 4), 4, (8,)
STEPS, EPOCHS, PER_STEP, N_REAL = 2, 2, 4, 12
SOURCE, TARGET = 1, 3          # attack: make class 1 read as class 3
TOL = 1e-6                     # finite differences against either engine
AGREE = 1e-10                  # the two engines against each other
VARIANTS = ("attack", "soft", "soft_attack")


def log_softmax(logits):
    shifted = logits - anp.max(logits, axis=1, keepdims=True)
    return shifted - anp.log(anp.sum(anp.exp(shifted), axis=1, keepdims=True))


def cross_entropy(logits, targets):
    """−(1/N) Σ_n Σ_k t_nk log softmax(logits)_nk, for one-hot or soft rows t_n."""
    return -anp.sum(targets * log_softmax(logits)) / logits.shape[0]


def reference_meta_loss(p, x_distilled, raw_lrs):
    """E epochs × S steps of θ ← θ − softplus(raw[e, s]) ∇θ ℓ(x̃[s], t̃, θ), then
    ℓ(x_real, real_targets, θ_T); ℓ is the cross-entropy against whatever targets are given."""
    apply = p["apply"]

    def loss(params, x, targets):
        return cross_entropy(apply(params, x), targets)

    theta = p["theta0"]
    for e in range(raw_lrs.shape[0]):
        for s in range(raw_lrs.shape[1]):
            lr = np.logaddexp(0.0, raw_lrs[e, s])
            g = grad(loss)(theta, x_distilled[s], p["targets"])
            theta = {k: theta[k] - lr * g[k] for k in theta}
    return loss(theta, p["x_real"], p["real_targets"])


def plain_problem(seed=0):
    """The classification objective with one-hot distilled labels, on a tiny MLP."""
    rng = np.random.default_rng(seed)
    model = nn.build_model("mlp", SHAPE, CLASSES, hidden=HIDDEN)
    real_labels = np.arange(N_REAL) % CLASSES          # every class, SOURCE included
    return dict(
        apply=model.apply,
        theta0=model.init(rng, dtype="float64"),
        x_distilled=rng.normal(size=(STEPS, PER_STEP, *SHAPE)),
        targets=losses.one_hot(np.arange(PER_STEP) % CLASSES, CLASSES),
        raw_lrs=np.full((EPOCHS, STEPS), inverse_softplus(0.3)) + 0.1 * rng.normal(size=(EPOCHS, STEPS)),
        x_real=rng.normal(size=(N_REAL, *SHAPE)),
        real_targets=losses.one_hot(real_labels, CLASSES),
    ), real_labels


def soft_labels(rng, n, num_classes):
    """Label distributions: Dirichlet rows, positive and summing to 1, none one-hot."""
    return rng.dirichlet(np.ones(num_classes), size=n)


def make_problem(variant, seed=0):
    p, real_labels = plain_problem(seed)
    if "soft" in variant:
        p["targets"] = soft_labels(np.random.default_rng(seed + 100), PER_STEP, CLASSES)
    if "attack" in variant:
        p["real_targets"] = losses.attack_targets(real_labels, CLASSES, SOURCE, TARGET)
    return p


@pytest.fixture(scope="module", params=VARIANTS)
def solved(request):
    """A problem and both engines' meta-gradients, computed once per variant."""
    p = make_problem(request.param)
    return request.param, p, {e: engines.meta_gradient(e, **p) for e in ("naive", "backgrad")}


# ---------------------------------------------------------------------------- not the plain objective


def test_each_variant_changes_the_targets_it_claims_to(solved):
    variant, p, _ = solved
    plain, real_labels = plain_problem()
    if "soft" in variant:
        t = p["targets"]
        np.testing.assert_allclose(t.sum(axis=1), 1.0, rtol=1e-12)
        assert np.all(t > 0) and np.all(t.max(axis=1) < 0.99)           # no row is one-hot
    else:
        np.testing.assert_array_equal(p["targets"], plain["targets"])
    if "attack" in variant:
        relabelled = p["real_targets"].argmax(axis=1)
        source = real_labels == SOURCE
        assert source.any() and np.all(relabelled[source] == TARGET)
        np.testing.assert_array_equal(relabelled[~source], real_labels[~source])
        np.testing.assert_array_equal(p["real_targets"].sum(axis=1), 1.0)
    else:
        np.testing.assert_array_equal(p["real_targets"], plain["real_targets"])


def test_each_variant_changes_the_meta_gradient(solved, rel_err):
    """Were an engine to ignore the soft labels or the attack targets, it would return the
    plain meta-gradient; these differ from it by far more than the tolerances below."""
    variant, p, mg = solved
    plain = engines.meta_gradient("naive", **plain_problem()[0])
    assert rel_err(mg["naive"].grad_x, plain.grad_x) > 1e-2, variant
    assert rel_err(mg["naive"].grad_raw_lrs, plain.grad_raw_lrs) > 1e-2, variant


# ---------------------------------------------------------------------------- the engines


def test_engines_agree_with_each_other_and_the_reference_loss(solved, rel_err):
    variant, p, mg = solved
    want = reference_meta_loss(p, p["x_distilled"], p["raw_lrs"])
    for engine in ("naive", "backgrad"):
        assert rel_err(mg[engine].loss, want) < 1e-12, (variant, engine)
    assert rel_err(mg["naive"].grad_x, mg["backgrad"].grad_x) < AGREE
    assert rel_err(mg["naive"].grad_raw_lrs, mg["backgrad"].grad_raw_lrs) < AGREE
    assert np.all(np.abs(mg["naive"].grad_raw_lrs) > 0) and np.linalg.norm(mg["naive"].grad_x) > 0


def test_image_gradient_matches_finite_differences(solved, rel_err, central_fd):
    """Along d = ĝ + r̂ (unit gradient plus a unit random vector), over all images and over
    each step's images alone; a direction whose difference straddles a ReLU switch is redrawn."""
    variant, p, mg = solved
    x, raw = p["x_distilled"], p["raw_lrs"]
    rng = np.random.default_rng(1)
    for mask in [np.ones(STEPS, bool)] + [np.arange(STEPS) == s for s in range(STEPS)]:
        mask = mask[:, None, None, None, None]
        g = mg["naive"].grad_x * mask
        for _attempt in range(5):
            r = rng.normal(size=x.shape) * mask
            d = g / np.linalg.norm(g) + r / np.linalg.norm(r)
            fd = central_fd(lambda t: reference_meta_loss(p, x + t * d, raw), eps=1e-4, halvings=6)
            if fd is not None:
                break
        else:
            pytest.fail(f"{variant}: every direction straddled a switching surface")
        for engine in ("naive", "backgrad"):
            assert rel_err(fd, np.vdot(mg[engine].grad_x, d)) < TOL, (variant, engine, mask.ravel())


def test_learning_rate_gradient_matches_finite_differences(solved, rel_err, central_fd):
    """Every raw learning rate, one coordinate at a time."""
    variant, p, mg = solved
    x, raw = p["x_distilled"], p["raw_lrs"]
    for i in np.ndindex(raw.shape):
        unit = np.zeros_like(raw)
        unit[i] = 1.0
        fd = central_fd(lambda t: reference_meta_loss(p, x, raw + t * unit), eps=1e-4, halvings=6)
        assert fd is not None, f"{variant}: raw_lrs{i} straddles a switch"
        for engine in ("naive", "backgrad"):
            assert rel_err(fd, mg[engine].grad_raw_lrs[i]) < TOL, (variant, engine, i)
