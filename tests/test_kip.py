"""ddref.methods.kip: the closed-form NNGP / NTK of a fully connected ReLU network against wide
random networks and hand values, kernel ridge regression against a direct solve, and the
KIP loss's gradient w.r.t. the support images and labels against finite differences."""

import math

import numpy as np
import pytest
from autograd import grad

from ddref.methods import kip

SW2, SB2 = 2.0, 0.05


# ---------------------------------------------------------------------------- hand values


def test_kernel_at_sixty_degrees_by_hand():
    """Two unit-variance inputs at 60° (cos θ = ½), σ_b = 0, one hidden layer:
    K² = σ_w² /(2π) (sin θ + (π − θ) cos θ),  Θ² = K² + σ_w² Θ¹ (π − θ)/(2π) = K² + σ_w² · ½ · ⅓."""
    x = np.array([[1.0, 0.0], [0.5, math.sqrt(3) / 2]]) * math.sqrt(2)    # ⟨x, x⟩/d = 1
    nngp, ntk = kip.nngp_and_ntk(x, depth=1, sigma_w2=1.0, sigma_b2=0.0)
    k2 = (math.sin(math.pi / 3) + (2 * math.pi / 3) * 0.5) / (2 * math.pi)
    assert nngp[0, 1] == pytest.approx(k2, rel=1e-14)
    assert ntk[0, 1] == pytest.approx(k2 + 0.5 * (1 / 3), rel=1e-14)
    np.testing.assert_allclose(np.diag(nngp), 0.5, rtol=1e-14)           # J(1) = π: K¹/2
    np.testing.assert_allclose(np.diag(ntk), 0.5 + 0.5, rtol=1e-14)      # K² + Θ¹ · ½


def test_diagonal_by_hand_through_three_layers(rng):
    """On the diagonal θ = 0: K^{l+1} = σ_w² K^l / 2 + σ_b², Θ^{l+1} = K^{l+1} + σ_w² Θ^l / 2."""
    x = rng.normal(size=(4, 6))
    sw2, sb2 = 1.7, 0.3
    k = sw2 * np.sum(x * x, axis=1) / 6 + sb2
    theta = k
    for _ in range(3):
        k = sw2 * k / 2 + sb2
        theta = k + sw2 * theta / 2
    for x2 in (None, x):
        nngp, ntk = kip.nngp_and_ntk(x, x2, depth=3, sigma_w2=sw2, sigma_b2=sb2)
        np.testing.assert_allclose(np.diag(nngp), k, rtol=1e-7)
        np.testing.assert_allclose(np.diag(ntk), theta, rtol=1e-7)


def test_gram_matrix_is_symmetric_positive_and_equals_the_cross_kernel(rng):
    x = rng.normal(size=(6, 1, 3, 3))
    for kind in kip.KERNELS:
        gram = kip.kernel(x, kind=kind, depth=3)
        np.testing.assert_allclose(gram, gram.T, rtol=1e-13)
        # the cross kernel computes cos θ(x, x) = 1 − O(1e-16) and arccos turns that into
        # θ ≈ 1e-8: the Gram form, which knows its diagonal is exactly 1, is the accurate one
        np.testing.assert_allclose(gram, kip.kernel(x, x, kind=kind, depth=3), rtol=1e-7)
        assert np.linalg.eigvalsh(gram).min() > 0


# ---------------------------------------------------------------------------- wide networks


def empirical_kernels(rng, x, width, depth, sw2=SW2, sb2=SB2):
    """One random network in the NTK parameterisation (h = √(σ_w²/fan_in) a W + σ_b b, W, b ~ N(0, 1),
    one scalar output): its NNGP σ_w²/n ⟨a_L(x), a_L(y)⟩ + σ_b² (the output's covariance over the
    last layer's weights) and its NTK Σ_params ∂f(x)/∂p · ∂f(y)/∂p by backpropagation."""
    acts, weights, masks = [x], [], []
    for layer in range(depth):
        fan = x.shape[1] if layer == 0 else width
        w, b = rng.standard_normal((fan, width)), rng.standard_normal(width)
        h = math.sqrt(sw2 / fan) * acts[-1] @ w + math.sqrt(sb2) * b
        weights.append(w)
        masks.append(h > 0)
        acts.append(h * (h > 0))
    w_out = rng.standard_normal(width)
    nngp = sw2 / width * acts[-1] @ acts[-1].T + sb2
    ntk = nngp.copy()                                           # the output layer's own parameters
    delta = math.sqrt(sw2 / width) * w_out[None, :] * masks[-1]  # ∂f/∂h_L, (N, width)
    for layer in reversed(range(depth)):
        fan = x.shape[1] if layer == 0 else width
        ntk += (sw2 / fan * acts[layer] @ acts[layer].T + sb2) * (delta @ delta.T)
        if layer > 0:
            delta = math.sqrt(sw2 / width) * (delta @ weights[layer].T) * masks[layer - 1]
    return nngp, ntk, (weights, w_out)


def test_the_empirical_ntk_is_the_sum_over_parameters_of_gradient_products(rng):
    """The backpropagation above against autograd's gradient of each output, at width 8."""
    x = rng.normal(size=(3, 5))
    _, ntk, _ = empirical_kernels(np.random.default_rng(7), x, width=8, depth=2)
    draw = np.random.default_rng(7)
    p = {}
    for layer, fan in enumerate((5, 8)):
        p[f"w{layer}"], p[f"b{layer}"] = draw.standard_normal((fan, 8)), draw.standard_normal(8)
    p["out"] = draw.standard_normal(8)

    def f(p, xi):
        a = xi
        for layer, fan in enumerate((5, 8)):
            h = math.sqrt(SW2 / fan) * a @ p[f"w{layer}"] + math.sqrt(SB2) * p[f"b{layer}"]
            a = h * (h > 0)
        return math.sqrt(SW2 / 8) * a @ p["out"] + math.sqrt(SB2) * 1.0

    # the output bias: a parameter with gradient √σ_b² for every input
    jac = [np.concatenate([grad(f)(p, xi)[k].ravel() for k in sorted(p)] + [[math.sqrt(SB2)]]) for xi in x]
    jac = np.array(jac)
    np.testing.assert_allclose(ntk, jac @ jac.T, rtol=1e-12)


DRAWS, WIDTH, DEPTH = 12, 4096, 2


@pytest.fixture(scope="module")
def wide_networks():
    """DRAWS networks of width 4096 on five correlated inputs (angles from ~0 to ~90°, where
    (π − θ) and θ differ) and their mean kernels with the standard error of the mean."""
    rng = np.random.default_rng(2021)
    base = rng.normal(size=(1, 12))
    x = np.concatenate([base + 0.3 * rng.normal(size=(3, 12)), rng.normal(size=(2, 12))])
    draws = [empirical_kernels(rng, x, WIDTH, DEPTH)[:2] for _ in range(DRAWS)]
    stats = {}
    for i, kind in enumerate(("nngp", "ntk")):
        values = np.array([d[i] for d in draws])
        stats[kind] = (values.mean(axis=0), values.std(axis=0, ddof=1) / math.sqrt(DRAWS))
    return x, stats


def z_scores(x, stats, kind):
    mean, se = stats[kind]
    return np.abs(kip.kernel(x, kind=kind, depth=DEPTH, sigma_w2=SW2, sigma_b2=SB2) - mean) / se


@pytest.mark.parametrize("kind", kip.KERNELS)
def test_closed_form_equals_wide_random_networks(wide_networks, kind):
    x, stats = wide_networks
    mean, se = stats[kind]
    assert np.max(se / np.abs(mean)) < 0.05                     # the check is sharp: SE ≤ 5%
    assert np.max(z_scores(x, stats, kind)) < 5                 # within five standard errors


def test_the_wide_network_check_rejects_a_changed_recursion(wide_networks, monkeypatch):
    """(π − θ) → θ in the NTK, and sin θ dropped from the NNGP, are both far outside the error."""
    x, stats = wide_networks
    with monkeypatch.context() as m:
        m.setattr(kip, "safe_arccos", lambda c: math.pi - np.arccos(np.clip(c, -1, 1)))
        assert np.max(z_scores(x, stats, "ntk")) > 20
    with monkeypatch.context() as m:
        m.setattr(kip, "arc_cosine_j1", lambda c: (math.pi - np.arccos(np.clip(c, -1, 1))) * c)
        assert np.max(z_scores(x, stats, "nngp")) > 20


# ---------------------------------------------------------------------------- regression and loss


def support_and_target(rng, n=6, n_target=9, num_classes=3):
    x_s, x_t = rng.normal(size=(n, 1, 3, 3)), rng.normal(size=(n_target, 1, 3, 3))
    y_s = kip.one_hot_labels(np.arange(n) % num_classes, num_classes)
    y_t = kip.one_hot_labels(rng.integers(0, num_classes, n_target), num_classes)
    return x_s, y_s, x_t, y_t


def test_labels_are_centred_one_hot():
    y = kip.one_hot_labels(np.array([2, 0]), 4)
    np.testing.assert_allclose(y, np.eye(4)[[2, 0]] - 0.25)
    np.testing.assert_allclose(kip.one_hot_labels(np.array([1]), 3, center=False), [[0, 1, 0]])


@pytest.mark.parametrize("kind", kip.KERNELS)
@pytest.mark.parametrize("reg", [0.0, 1e-6, 0.1])
def test_predictions_equal_a_direct_linear_solve(rng, kind, reg):
    x_s, y_s, x_t, _ = support_and_target(rng)
    options = dict(kind=kind, depth=2, sigma_w2=SW2, sigma_b2=SB2)
    k_ss, k_ts = kip.kernel(x_s, x_s, **options), kip.kernel(x_t, x_s, **options)
    system = k_ss + reg * np.trace(k_ss) / len(x_s) * np.eye(len(x_s))
    expected = k_ts @ np.linalg.solve(system, y_s)
    np.testing.assert_allclose(kip.predict(x_s, y_s, x_t, reg=reg, **options), expected, rtol=1e-9, atol=1e-12)


def test_without_ridge_the_support_set_is_interpolated(rng):
    x_s, y_s, _, _ = support_and_target(rng)
    np.testing.assert_allclose(kip.predict(x_s, y_s, x_s, reg=0.0), y_s, atol=1e-9)


def test_loss_is_half_the_mean_squared_error(rng):
    x_s, y_s, x_t, y_t = support_and_target(rng)
    pred = kip.predict(x_s, y_s, x_t)
    assert kip.kip_loss(x_s, y_s, x_t, y_t) == pytest.approx(0.5 * np.mean((pred - y_t) ** 2), rel=1e-14)


@pytest.mark.parametrize("kind", kip.KERNELS)
def test_gradient_wrt_support_images_and_labels_matches_finite_differences(rng, central_fd, rel_err, kind):
    x_s, y_s, x_t, y_t = support_and_target(rng)
    options = dict(kind=kind, depth=2, sigma_w2=SW2, sigma_b2=SB2, reg=1e-3)
    g_x, g_y = grad(lambda x, y: kip.kip_loss(x, y, x_t, y_t, **options), argnum=(0, 1))(x_s, y_s)
    for _ in range(3):
        v, u = rng.normal(size=x_s.shape), rng.normal(size=y_s.shape)
        fd_x = central_fd(lambda t: kip.kip_loss(x_s + t * v, y_s, x_t, y_t, **options), eps=1e-5)
        fd_y = central_fd(lambda t: kip.kip_loss(x_s, y_s + t * u, x_t, y_t, **options), eps=1e-5)
        assert rel_err(np.sum(g_x * v), fd_x) < 1e-6
        assert rel_err(np.sum(g_y * u), fd_y) < 1e-6


def test_gradient_is_finite_where_points_coincide(rng):
    """cos θ = 1 on the diagonal, between duplicated support images and between a target and a
    support image: arccos' infinite slope there must not turn the gradient into NaN."""
    x_s, y_s, x_t, y_t = support_and_target(rng)
    x_s[1] = x_s[0]
    x_t[0] = x_s[2]
    for kind in kip.KERNELS:
        g_x, g_y = grad(lambda x, y: kip.kip_loss(x, y, x_t, y_t, kind=kind, reg=1e-3), argnum=(0, 1))(x_s, y_s)
        assert np.all(np.isfinite(g_x)) and np.all(np.isfinite(g_y))


def test_bad_options_are_named(rng):
    x_s, y_s, x_t, y_t = support_and_target(rng)
    with pytest.raises(ValueError, match="unknown kernel 'rbf'"):
        kip.kip_loss(x_s, y_s, x_t, y_t, kind="rbf")
    with pytest.raises(ValueError, match="depth=0 must be an integer ≥ 1"):
        kip.kernel(x_s, depth=0)
    with pytest.raises(ValueError, match="reg=-1"):
        kip.predict(x_s, y_s, x_t, reg=-1)
    with pytest.raises(ValueError, match="y_support must be label rows"):
        kip.predict(x_s, y_s[:-1], x_t)
    with pytest.raises(ValueError, match="use sigma_b2 > 0"):
        kip.kernel(np.zeros((2, 4)), sigma_b2=0.0)
    with pytest.raises(ValueError, match="x_test images have shape"):
        kip.predict(x_s, y_s, x_t[:, :, :2])
