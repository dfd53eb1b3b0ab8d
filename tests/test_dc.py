"""ddref.methods.dc: gradient matching (Zhao, Mopuri & Bilen 2021) — the layer-wise distance,
the loss (zero when S = T, its second-order gradient against finite differences), the inner
training step and the paper's schedule."""

import numpy as np
import pytest
from autograd import grad

from ddref import nn
from ddref.methods import dc

K = 3


def small_problem(rng, model_name="mlp", n_syn=2, n_real=4):
    shape = (1, 4, 4) if model_name == "mlp" else (1, 28, 28)
    options = {"hidden": (10,)} if model_name == "mlp" else {}
    model = nn.build_model(model_name, shape, K, **options)
    params = model.init(rng)
    x_syn = rng.normal(size=(n_syn * K, *shape))
    x_real = rng.normal(size=(n_real * K, *shape))
    return model, params, x_syn, np.repeat(np.arange(K), n_syn), x_real, np.repeat(np.arange(K), n_real)


# ---------------------------------------------------------------------------- schedule


def test_schedule_is_the_official_get_loops():
    assert dc.schedule(1) == (1, 1)
    assert dc.schedule(10) == (10, 50)
    assert dc.schedule(50) == (50, 10)
    with pytest.raises(ValueError, match="defined for 1, 10, 20, 30, 40, 50 images per class, not 3"):
        dc.schedule(3)


# ---------------------------------------------------------------------------- the distance


def direct_distance(a_rows, b_rows, eps):
    """Σ_i (1 − a_i·b_i / (|a_i| |b_i| + eps)), one row at a time, a row zero in both counting 0."""
    return sum(0.0 if not (a.any() or b.any()) else
               1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + eps) for a, b in zip(a_rows, b_rows))


def test_layer_distance_takes_rows_per_output_unit(rng):
    dense_a, dense_b = rng.normal(size=(7, 4)), rng.normal(size=(7, 4))      # ddref: (in, out)
    conv_a, conv_b = rng.normal(size=(5, 2, 3, 3)), rng.normal(size=(5, 2, 3, 3))
    assert dc.layer_distance(dense_a, dense_b) == pytest.approx(
        direct_distance(dense_a.T, dense_b.T, 1e-6), rel=1e-13)               # rows = the 4 outputs
    assert dc.layer_distance(conv_a, conv_b) == pytest.approx(
        direct_distance(conv_a.reshape(5, -1), conv_b.reshape(5, -1), 1e-6), rel=1e-13)
    assert dc.layer_distance(rng.normal(size=6), rng.normal(size=6)) == 0.0   # biases: ignored


def test_layer_distance_is_a_sum_of_row_cosines(rng):
    a = rng.normal(size=(6, 3))
    scales = rng.uniform(0.1, 10, size=3)                                     # one per output row
    assert dc.layer_distance(a, a * scales, eps=0) == pytest.approx(0, abs=1e-14)
    assert dc.layer_distance(a, -a * scales, eps=0) == pytest.approx(2 * 3, rel=1e-14)
    identity = np.eye(3)
    assert dc.layer_distance(identity, identity[[1, 2, 0]], eps=0) == pytest.approx(3.0)  # cos 0


def test_zero_rows_count_zero_together_and_one_alone():
    a = np.array([[1.0, 0.0], [2.0, 0.0]])                       # (in=2, out=2): row 1 is zero
    b = np.array([[3.0, 0.0], [1.0, 0.0]])
    for eps in (0.0, 1e-6):
        assert dc.layer_distance(a, a, eps) == pytest.approx(eps / (5 + eps), abs=1e-15)
        assert np.isfinite(dc.layer_distance(a, b, eps))
    c = np.array([[1.0, 1.0], [2.0, 1.0]])                        # row 1 nonzero here only
    assert dc.layer_distance(c, a, eps=0) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("model_name", ["mlp", "lenet"])
def test_loss_is_zero_when_synthetic_set_is_the_real_batch(rng, model_name):
    model, params, _, _, x_real, y_real = small_problem(rng, model_name)
    assert abs(dc.dc_loss(model, params, x_real, y_real, x_real, y_real, eps=0)) < 1e-12
    changed = x_real.copy()
    changed[0] += rng.normal(size=changed[0].shape)
    assert dc.dc_loss(model, params, changed, y_real, x_real, y_real, eps=0) > 1e-3


def test_with_the_official_eps_the_floor_is_the_sum_of_eps_over_row_norms(rng):
    """At S = T each nonzero row contributes ε/(‖a‖² + ε): the official ε's known offset."""
    model, params, _, _, x_real, y_real = small_problem(rng)
    floor = 0.0
    for c in range(K):
        g = grad(lambda p: dc.class_loss(model, p, x_real[y_real == c], y_real[y_real == c], K))(params)
        for key in ("w0", "w1"):
            sq = np.sum(dc.as_rows(g[key]) ** 2, axis=1)
            floor += np.sum(1e-6 / (sq[sq > 0] + 1e-6))
    assert dc.dc_loss(model, params, x_real, y_real, x_real, y_real) == pytest.approx(floor, rel=1e-9)


def test_loss_matches_per_class_not_pooled(rng):
    """Swapping the labels of two classes' images keeps the pooled gradient of the same images
    but breaks the per-class match."""
    model, params, _, _, x_real, y_real = small_problem(rng)
    swapped = np.where(y_real == 0, 1, np.where(y_real == 1, 0, y_real))
    assert dc.dc_loss(model, params, x_real, swapped, x_real, y_real, eps=0) > 1e-2


def test_loss_is_the_sum_of_the_class_distances(rng):
    model, params, x_syn, y_syn, x_real, y_real = small_problem(rng)
    total = 0.0
    for c in range(K):
        g_real = grad(lambda p: dc.class_loss(model, p, x_real[y_real == c], y_real[y_real == c], K))(params)
        g_syn = grad(lambda p: dc.class_loss(model, p, x_syn[y_syn == c], y_syn[y_syn == c], K))(params)
        total += sum(direct_distance(dc.as_rows(g_real[k]), dc.as_rows(g_syn[k]), 1e-6)
                     for k in ("w0", "w1"))
    assert dc.dc_loss(model, params, x_syn, y_syn, x_real, y_real) == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize("model_name", ["mlp", "lenet"])
def test_gradient_wrt_synthetic_images_matches_finite_differences(rng, directional_check, model_name):
    model, params, x_syn, y_syn, x_real, y_real = small_problem(rng, model_name, n_syn=1, n_real=3)

    def loss(x):
        return dc.dc_loss(model, params, x, y_syn, x_real, y_real)

    g = grad(loss)(x_syn)
    assert np.all(np.isfinite(g)) and np.linalg.norm(g) > 0
    directional_check(loss, g, x_syn, rng, tol=1e-6)


def test_loss_rejects_a_real_batch_without_a_synthetic_class(rng):
    model, params, x_syn, y_syn, x_real, y_real = small_problem(rng)
    keep = y_real != 2
    with pytest.raises(ValueError, match=r"no images of class\(es\) \[2\]"):
        dc.dc_loss(model, params, x_syn, y_syn, x_real[keep], y_real[keep])
    with pytest.raises(ValueError, match="y_syn must be whole class numbers"):
        dc.dc_loss(model, params, x_syn, y_syn + 0.5, x_real, y_real)


# ---------------------------------------------------------------------------- inner training


def test_train_network_one_full_batch_epoch_is_one_sgd_step(rng):
    model, params, x_syn, y_syn, _, _ = small_problem(rng)
    g = grad(lambda p: dc.class_loss(model, p, x_syn, y_syn, K))(params)
    trained = dc.train_network(model, params, x_syn, y_syn, epochs=1, lr=0.01)
    for k in params:
        np.testing.assert_allclose(trained[k], params[k] - 0.01 * g[k], rtol=1e-14, atol=1e-16)
    assert dc.train_network(model, params, x_syn, y_syn, epochs=0) is params


def test_train_network_in_batches_is_reproducible_and_lowers_the_loss(rng):
    model, params, x_syn, y_syn, _, _ = small_problem(rng, n_syn=3)
    with pytest.raises(ValueError, match="pass rng"):
        dc.train_network(model, params, x_syn, y_syn, epochs=1, batch_size=4)
    a = dc.train_network(model, params, x_syn, y_syn, epochs=20, lr=0.1, batch_size=4, rng=5)
    b = dc.train_network(model, params, x_syn, y_syn, epochs=20, lr=0.1, batch_size=4, rng=5)
    for k in params:
        np.testing.assert_array_equal(a[k], b[k])
    assert dc.class_loss(model, a, x_syn, y_syn, K) < 0.8 * dc.class_loss(model, params, x_syn, y_syn, K)
