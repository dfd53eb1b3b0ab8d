"""ddref.losses: cross-entropy (hard and soft labels), accuracy, the attack objective."""

import numpy as np
import pytest
from autograd import grad

from ddref import losses

TOL = 1e-6


def direct_cross_entropy(logits, targets):
    """The textbook formula, evaluated naively (fine for moderate logits)."""
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return -np.mean(np.sum(targets * np.log(p), axis=1))


def soft_labels(rng, n, k):
    t = rng.random(size=(n, k))
    return t / t.sum(axis=1, keepdims=True)


def test_one_hot():
    t = losses.one_hot(np.array([2, 0, 3]), 4)
    np.testing.assert_array_equal(t, np.eye(4)[[2, 0, 3]])
    assert t.dtype == np.float64
    assert losses.one_hot([1], 3, dtype="float32").dtype == np.float32


@pytest.mark.parametrize("labels", [[12], [0, -1], [3, 10]])
def test_one_hot_rejects_labels_out_of_range(labels):
    with pytest.raises(ValueError, match="labels must lie in 0..9 for 10 classes"):
        losses.one_hot(np.array(labels), 10)


def test_log_softmax_normalised_and_shift_invariant(rng):
    z = rng.normal(size=(5, 7)) * 3
    ls = losses.log_softmax(z)
    np.testing.assert_allclose(np.exp(ls).sum(axis=1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(losses.log_softmax(z + 100.0), ls, atol=1e-12)


@pytest.mark.parametrize("labels", ["hard", "soft"])
def test_cross_entropy_equals_direct_formula(rng, labels):
    z = rng.normal(size=(6, 5)) * 2
    t = losses.one_hot(rng.integers(0, 5, 6), 5) if labels == "hard" else soft_labels(rng, 6, 5)
    assert losses.cross_entropy(z, t) == pytest.approx(direct_cross_entropy(z, t), rel=1e-13)


def test_cross_entropy_of_uniform_logits_is_log_k():
    t = losses.one_hot(np.arange(4), 10)
    assert losses.cross_entropy(np.zeros((4, 10)), t) == pytest.approx(np.log(10), rel=1e-15)


def test_cross_entropy_stable_for_huge_logits():
    z = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 3.0]])
    right = losses.one_hot(np.array([0, 1]), 3)
    wrong = losses.one_hot(np.array([1, 2]), 3)
    assert losses.cross_entropy(z, right) == pytest.approx(0.0, abs=1e-300)
    assert losses.cross_entropy(z, wrong) == pytest.approx((1e4 + (1e4 - 3.0)) / 2, rel=1e-15)
    for t in (right, wrong, np.full((2, 3), 1 / 3)):
        value = losses.cross_entropy(z, t)
        g = grad(losses.cross_entropy)(z, t)
        assert np.isfinite(value) and np.all(np.isfinite(g))
    # the gradient at huge logits is still softmax − target, divided by N
    g = grad(losses.cross_entropy)(z, wrong)
    np.testing.assert_allclose(g, (np.array([[1, 0, 0], [0, 1, 0]]) - wrong) / 2, atol=1e-15)


@pytest.mark.parametrize("labels", ["hard", "soft"])
def test_cross_entropy_gradient_matches_finite_differences(rng, rel_err, central_fd, labels):
    n, k = 4, 6
    z = rng.normal(size=(n, k))      # moderate logits: no partial is vanishingly small
    t = losses.one_hot(rng.integers(0, k, n), k) if labels == "hard" else soft_labels(rng, n, k)
    g = grad(losses.cross_entropy)(z, t)
    # closed form: (softmax(z) − t) / N
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(g, (p - t) / n, rtol=1e-12, atol=1e-15)
    for i in np.ndindex(z.shape):                       # every coordinate
        e = np.zeros_like(z)
        e[i] = 1.0
        # a large eps: the loss is smooth, and some partials are ~1e-4 next to ℓ ≈ 2
        fd = central_fd(lambda s: losses.cross_entropy(z + s * e, t), eps=1e-4, halvings=6)
        assert fd is not None and rel_err(fd, g[i]) < TOL, i
    d = g / np.linalg.norm(g) + rng.normal(size=z.shape) / np.sqrt(z.size)  # and ĝ + noise
    fd = central_fd(lambda s: losses.cross_entropy(z + s * d, t), eps=1e-4, halvings=6)
    assert fd is not None and rel_err(fd, np.vdot(g, d)) < TOL


def test_squared_error_value_and_gradient(rng, rel_err, central_fd):
    y, t = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    assert losses.squared_error(y, t) == pytest.approx(0.5 * np.sum((y - t) ** 2) / 5, rel=1e-14)
    g = grad(losses.squared_error)(y, t)
    np.testing.assert_allclose(g, (y - t) / 5, rtol=1e-14)
    d = g / np.linalg.norm(g) + rng.normal(size=y.shape) / np.sqrt(y.size)
    fd = central_fd(lambda s: losses.squared_error(y + s * d, t), eps=1e-4)
    assert fd is not None and rel_err(fd, np.vdot(g, d)) < TOL


def test_accuracy():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert losses.accuracy(logits, np.array([1, 0, 0, 0])) == 0.75
    assert losses.accuracy(logits, [1, 0, 1, 0]) == 1.0
    assert losses.accuracy(logits, np.array([0, 1, 0, 1])) == 0.0
    assert isinstance(losses.accuracy(logits, np.array([1, 0, 1, 0])), float)


def test_attack_targets_relabel_only_the_source_class():
    labels = np.array([0, 3, 1, 3, 5, 9, 3])
    before = labels.copy()
    t = losses.attack_targets(labels, 10, source_class=3, target_class=5)
    np.testing.assert_array_equal(labels, before)       # input untouched
    expected = np.array([0, 5, 1, 5, 5, 9, 5])
    np.testing.assert_array_equal(t, losses.one_hot(expected, 10))
    assert t.dtype == np.float64
    assert losses.attack_targets(labels, 10, 3, 5, dtype="float32").dtype == np.float32


@pytest.mark.parametrize("source,target,match", [
    (-1, 5, "source_class=-1"), (10, 5, "source_class=10"),
    (3, -1, "target_class=-1"), (3, 10, "target_class=10"),
    (4, 4, "must differ"),
])
def test_attack_targets_validates_class_indices(source, target, match):
    with pytest.raises(ValueError, match=match):
        losses.attack_targets(np.arange(10), 10, source, target)


@pytest.mark.parametrize("labels,source", [(np.array([0, 3, 12]), 3), (np.array([0, 2, 3]), 2.5)])
def test_attack_targets_rejects_bad_labels_and_class_indices(labels, source):
    with pytest.raises(ValueError):
        losses.attack_targets(labels, 10, source, 5)


@pytest.mark.parametrize("loss", [losses.cross_entropy, losses.squared_error])
def test_float32_gradients_stay_float32(loss):
    from autograd import grad
    logits = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    targets = losses.one_hot([0, 1, 2, 0, 1], 3, "float32")
    assert grad(loss)(logits, targets).dtype == np.float32
