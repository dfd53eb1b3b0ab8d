"""ddref.nn.convnet3: the ConvNet of DC / DSA / DM / KIP and its two new primitives.

Average pooling is compared with its definition (a loop over windows) and instance norm
with the definition of PyTorch's GroupNorm(C, C) written independently here; both are
checked for zero mean / unit variance and against central finite differences in float64
(first derivatives w.r.t. input, γ and β; second derivatives through the whole network,
which back-gradient needs).  The model's loss is differentiated w.r.t. every parameter
tensor and the images, and the meta-gradient engines (naive and back-gradient) run on it
and agree.
"""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

from ddref import engines, fused, hypergrad, losses, nn
from ddref.unroll import inverse_softplus, unroll

TOL = 1e-6
AGREE = 1e-10
WIDTH = 4                 # a small width keeps the float64 checks fast


def directional_check(fn, x, rng, rel_err, central_fd, g=None):
    """⟨∇fn(x), d⟩ against a central difference along d = ĝ + r̂ (see tests/test_nn.py)."""
    g = grad(fn)(x) if g is None else g
    r = rng.normal(size=np.shape(x))
    d = g / np.linalg.norm(g) + r / np.linalg.norm(r)
    fd = central_fd(lambda t: fn(x + t * d), eps=1e-5, halvings=8)
    assert fd is not None, "finite difference straddles a kink; change the seed"
    assert rel_err(fd, np.vdot(g, d)) < TOL


# ---------------------------------------------------------------------------- average pooling


def loop_avg_pool(x):
    """2×2 / stride-2 average pooling of NHWC x by a loop over output positions."""
    n, h, w, c = x.shape
    out = np.zeros((n, h // 2, w // 2, c))
    for i in range(h // 2):
        for j in range(w // 2):
            out[:, i, j, :] = x[:, 2 * i: 2 * i + 2, 2 * j: 2 * j + 2, :].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("h,w", [(4, 6), (5, 7), (2, 2)])
def test_avg_pool_matches_its_definition(rng, h, w):
    x = rng.normal(size=(2, h, w, 3))
    np.testing.assert_allclose(nn.avg_pool2x2_nhwc(x), loop_avg_pool(x), rtol=0, atol=1e-14)


def test_avg_pool_gradient_matches_finite_differences(rng, rel_err, central_fd):
    x = rng.normal(size=(2, 5, 6, 3))
    r = rng.normal(size=(2, 2, 3, 3))
    directional_check(lambda x: anp.sum(nn.avg_pool2x2_nhwc(x) * r), x, rng, rel_err, central_fd)


def test_avg_pool_spreads_the_gradient_evenly_and_drops_odd_edges(rng):
    g = grad(lambda x: anp.sum(nn.avg_pool2x2_nhwc(x)))(rng.normal(size=(1, 3, 5, 1)))
    want = np.zeros((1, 3, 5, 1))
    want[:, :2, :4, :] = 0.25                  # the last row and column are not pooled
    np.testing.assert_array_equal(g, want)


def test_avg_pool_keeps_float32(rng):
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    assert nn.avg_pool2x2_nhwc(x).dtype == np.float32


# ---------------------------------------------------------------------------- instance norm


def group_norm_reference(x_nchw, gamma, beta, eps=1e-5):
    """PyTorch's GroupNorm(C, C, affine=True) on NCHW input, written from its definition:
    every (image, channel) slice normalised by its own mean and biased variance."""
    out = np.empty_like(x_nchw)
    for n in range(x_nchw.shape[0]):
        for c in range(x_nchw.shape[1]):
            s = x_nchw[n, c]
            out[n, c] = (s - s.mean()) / np.sqrt(s.var() + eps) * gamma[c] + beta[c]
    return out


def test_instance_norm_is_group_norm_with_one_channel_per_group(rng):
    x = 3.0 + 2.0 * rng.normal(size=(3, 4, 5, 6))           # NCHW
    gamma, beta = rng.normal(size=4), rng.normal(size=4)
    got = nn.to_nchw(nn.instance_norm_nhwc(nn.to_nhwc(x), gamma, beta))
    np.testing.assert_allclose(got, group_norm_reference(x, gamma, beta), rtol=0, atol=1e-12)


def test_standardised_maps_have_zero_mean_and_unit_variance(rng):
    """Before γ and β: per image and channel, mean 0 and variance σ²/(σ² + ε), i.e. 1 to
    within ε/σ² — for maps of very different offsets and scales."""
    scales = np.array([0.5, 1.0, 5.0, 50.0]).reshape(1, 1, 1, 4)
    x = 10.0 * rng.normal(size=(3, 1, 1, 4)) + scales * rng.normal(size=(3, 6, 7, 4))
    y = nn.instance_standardise_nhwc(x)
    variance = x.var(axis=(1, 2))
    np.testing.assert_allclose(y.mean(axis=(1, 2)), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(1, 2)), variance / (variance + nn.INSTANCE_NORM_EPS),
                               rtol=1e-12)
    np.testing.assert_allclose(y.var(axis=(1, 2)), 1.0, atol=1e-4)


def test_instance_norm_images_do_not_see_each_other(rng):
    """Each image is normalised on its own: changing image 1 leaves image 0's output alone."""
    x = rng.normal(size=(2, 4, 4, 3))
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    y = nn.instance_norm_nhwc(x, gamma, beta)
    x2 = x.copy()
    x2[1] = 7.0 * x2[1] + 3.0
    np.testing.assert_array_equal(nn.instance_norm_nhwc(x2, gamma, beta)[0], y[0])


@pytest.mark.parametrize("argnum", [0, 1, 2])
def test_instance_norm_gradients_match_finite_differences(rng, rel_err, central_fd, argnum):
    """∂/∂x, ∂/∂γ, ∂/∂β of ⟨instance_norm(x, γ, β), R⟩ (instance norm is smooth)."""
    args = [rng.normal(size=(2, 3, 4, 5)), rng.normal(size=5), rng.normal(size=5)]
    r = rng.normal(size=(2, 3, 4, 5))

    def f(value):
        shifted = list(args)
        shifted[argnum] = value
        return anp.sum(nn.instance_norm_nhwc(*shifted) * r)

    directional_check(f, args[argnum], rng, rel_err, central_fd)


def test_instance_norm_second_derivative_matches_finite_differences(rng, rel_err, central_fd):
    """d/dt of ⟨∇ₓ f(x + t v), u⟩ = uᵀ H v: the Hessian-vector product back-gradient takes."""
    x, r = rng.normal(size=(2, 3, 3, 2)), rng.normal(size=(2, 3, 3, 2))
    gamma, beta = rng.normal(size=2), rng.normal(size=2)
    f = lambda x: anp.sum(nn.instance_norm_nhwc(x, gamma, beta) * r)
    u, v = rng.normal(size=x.shape), rng.normal(size=x.shape)
    hvp = grad(lambda x: anp.sum(grad(f)(x) * v))(x)
    fd = central_fd(lambda t: np.vdot(grad(f)(x + t * v), u), eps=1e-4, halvings=8)
    assert fd is not None
    assert rel_err(fd, np.vdot(hvp, u)) < TOL


def test_instance_norm_keeps_float32(rng):
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    gamma, beta = np.ones(3, "float32"), np.zeros(3, "float32")
    assert nn.instance_norm_nhwc(x, gamma, beta).dtype == np.float32
    g = grad(lambda x: anp.sum(nn.instance_norm_nhwc(x, gamma, beta) ** 2))(x)
    assert g.dtype == np.float32


# ---------------------------------------------------------------------------- the model


SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]


def batch(rng, shape, n=3, classes=10):
    x = rng.normal(size=(n, *shape))
    return x, losses.one_hot(rng.integers(0, classes, n), classes)


@pytest.mark.parametrize("shape,features", [((1, 28, 28), 4 * 4), ((3, 32, 32), 4 * 4),
                                            ((1, 8, 8), 1), ((3, 8, 8), 1), ((1, 4, 4), 1)])
def test_output_and_feature_shapes(rng, shape, features):
    """28×28 grey images are padded to 32×32 maps by the first convolution, as in DC's code,
    so MNIST-like and CIFAR-like images both give 4·4·width features."""
    model = nn.build_model("convnet3", shape, 7, width=5)
    params = model.init(rng)
    assert params["fw"].shape == (features * 5, 7)
    assert model.apply(params, rng.normal(size=(2, *shape))).shape == (2, 7)


def test_parameter_shapes_and_count_at_the_default_width():
    """DC's ConvNet on 32×32 colour images: 3·128·9 + 2·128·128·9 conv weights, 3·128 conv
    biases, 3·2·128 norm parameters, 2048·10 + 10 classifier: 320,010 parameters."""
    model = nn.build_model("convnet3", (3, 32, 32), 10)
    params = model.init(0, dtype="float32")
    assert params["c1w"].shape == (128, 3, 3, 3) and params["c2w"].shape == (128, 128, 3, 3)
    assert params["fw"].shape == (2048, 10)
    assert nn.num_params(params) == 3 * 128 * 9 + 2 * 128 * 128 * 9 + 3 * 128 + 6 * 128 + 20480 + 10


def test_init_scale_one_shift_zero_biases_zero(rng):
    model = nn.build_model("convnet3", (1, 28, 28), 10, width=16)
    params = model.init(rng, scheme="normal", scale=0.3)
    for i in (1, 2, 3):
        np.testing.assert_array_equal(params[f"n{i}g"], 1.0)
        np.testing.assert_array_equal(params[f"n{i}b"], 0.0)
        np.testing.assert_array_equal(params[f"c{i}b"], 0.0)
    assert params["c2w"].std() == pytest.approx(0.3, rel=0.05)
    assert set(params) == set(model.init.shapes)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_init_dtype_and_reproducibility(dtype):
    model = nn.build_model("convnet3", (3, 32, 32), 10, width=3)
    a, b = model.init(np.random.default_rng(5), dtype=dtype), model.init(5, dtype=dtype)
    c = model.init(6, dtype=dtype)
    assert all(v.dtype == np.dtype(dtype) for v in a.values())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["c1w"], c["c1w"])


def test_float32_forward_stays_float32(rng):
    model = nn.build_model("convnet3", (1, 28, 28), 10, width=3)
    params = model.init(rng, dtype="float32")
    assert model.apply(params, rng.normal(size=(2, 1, 28, 28)).astype("float32")).dtype == np.float32


@pytest.mark.parametrize("shape", [(1, 3, 3), (3, 7, 7), (3, 32, 4)])
def test_images_too_small_are_a_shape_error(shape):
    with pytest.raises(nn.ShapeError, match="convnet3 halves the maps three times"):
        nn.build_model("convnet3", shape, 10)


@pytest.mark.parametrize("width", [0, -3, 2.5, "8"])
def test_width_must_be_a_positive_integer(width):
    with pytest.raises(ValueError, match="convnet3's width must be a positive whole number"):
        nn.build_model("convnet3", (1, 28, 28), 10, width=width)


def test_apply_rejects_images_of_another_shape(rng):
    model = nn.build_model("convnet3", (1, 28, 28), 10, width=2)
    with pytest.raises(nn.ShapeError, match="convnet3"):
        model.apply(model.init(rng), rng.normal(size=(2, 3, 32, 32)))


def test_apply_is_the_written_out_network(rng):
    """The model equals the three blocks composed by hand from reference pieces (NCHW conv by
    the existing conv2d, GroupNorm from its definition, pooling by the loop)."""
    model = nn.build_model("convnet3", (1, 8, 8), 3, width=2)
    params = model.init(rng)
    params = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in params.items()}
    x = rng.normal(size=(2, 1, 8, 8))
    h = x
    for i, pad in ((1, 3), (2, 1), (3, 1)):
        h = nn.conv2d(h, params[f"c{i}w"], params[f"c{i}b"], pad=pad)
        h = np.maximum(group_norm_reference(h, params[f"n{i}g"], params[f"n{i}b"]), 0)
        h = nn.to_nchw(loop_avg_pool(nn.to_nhwc(h)))
    want = nn.to_nhwc(h).reshape(2, -1) @ params["fw"] + params["fb"]
    np.testing.assert_allclose(model.apply(params, x), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_loss_gradients_match_finite_differences(rng, rel_err, central_fd, shape):
    """∂ℓ/∂(every parameter tensor) and ∂ℓ/∂x against central differences in float64.  The
    convolution biases are cancelled by the instance norm that follows: their gradient is 0
    (to rounding), and so is the finite difference."""
    model = nn.build_model("convnet3", shape, 10, width=WIDTH)
    params = model.init(rng)
    params = {k: v + 0.2 * rng.normal(size=v.shape) for k, v in params.items()}   # γ ≠ 1, β ≠ 0
    x, targets = batch(rng, shape)

    def loss(params, x):
        return losses.cross_entropy(model.apply(params, x), targets)

    g = grad(loss)(params, x)
    assert set(g) == set(params)
    for key in params:
        if key in ("c1b", "c2b", "c3b"):
            assert np.abs(g[key]).max() < 1e-12, key
            d = rng.normal(size=params[key].shape)
            shifted = [loss({**params, key: params[key] + t * d}, x) for t in (1e-2, -1e-2)]
            assert abs(shifted[0] - shifted[1]) < 1e-12, key
            continue
        directional_check(lambda v, key=key: loss({**params, key: v}, x), params[key], rng,
                          rel_err, central_fd, g=g[key])
    directional_check(lambda x: loss(params, x), x, rng, rel_err, central_fd)


def test_mixed_second_derivative_matches_finite_differences(rng, rel_err, central_fd):
    """(∂²ℓ/∂x∂θ) v: how the inner gradient moves with the images, the product back-gradient
    accumulates into ∂L/∂x̃."""
    model = nn.build_model("convnet3", (1, 8, 8), 10, width=WIDTH)
    params = model.init(rng)
    x, targets = batch(rng, (1, 8, 8))
    v = {k: rng.normal(size=p.shape) for k, p in params.items()}
    u = rng.normal(size=x.shape)

    def g_dot_v(x):
        g = grad(lambda p: losses.cross_entropy(model.apply(p, x), targets))(params)
        return sum(anp.sum(g[k] * v[k]) for k in g)

    mixed = grad(g_dot_v)(x)
    fd = central_fd(lambda t: g_dot_v(x + t * u), eps=1e-5, halvings=8)
    assert fd is not None, "finite difference straddles a kink; change the seed"
    assert rel_err(fd, np.vdot(mixed, u)) < TOL


# ---------------------------------------------------------------------------- existing code paths


def meta_problem(rng, shape=(1, 8, 8), steps=2, epochs=2, per_step=4):
    model = nn.build_model("convnet3", shape, 10, width=3)
    theta0 = model.init(rng)
    x = rng.normal(size=(steps, per_step, *shape))
    targets = losses.one_hot(np.arange(per_step) % 10, 10)
    raw = np.full((epochs, steps), inverse_softplus(0.05)) + 0.1 * rng.normal(size=(epochs, steps))
    x_real, y_real = batch(rng, shape, n=6)
    return dict(apply=model.apply, theta0=theta0, x_distilled=x, targets=targets, raw_lrs=raw,
                x_real=x_real, real_targets=y_real)


def test_has_no_fast_path_so_every_gradient_is_autograds(rng):
    model = nn.build_model("convnet3", (1, 8, 8), 10, width=2)
    assert fused.gradient_for(model.apply, losses.cross_entropy) is None


def test_unroll_trains_it(rng):
    """A few gradient steps on one batch lower the loss on that batch."""
    p = meta_problem(rng, steps=1, epochs=1, per_step=10)
    x, targets = p["x_distilled"], p["targets"]
    before = losses.cross_entropy(p["apply"](p["theta0"], x[0]), targets)
    theta = unroll(p["apply"], p["theta0"], np.repeat(x, 5, axis=0), targets, np.full((1, 5), 0.1))
    assert losses.cross_entropy(p["apply"](theta, x[0]), targets) < before


def test_meta_gradient_engines_agree_and_match_finite_differences(rng, rel_err, central_fd):
    p = meta_problem(rng)
    naive = engines.meta_gradient("naive", **p)
    back = engines.meta_gradient("backgrad", **p)
    assert rel_err(naive.loss, back.loss) < AGREE
    assert rel_err(naive.grad_x, back.grad_x) < AGREE
    assert rel_err(naive.grad_raw_lrs, back.grad_raw_lrs) < AGREE
    assert np.linalg.norm(back.grad_x) > 0 and np.all(back.grad_raw_lrs != 0)

    def meta_loss(x, raw):
        q = {**p, "x_distilled": x, "raw_lrs": raw}
        return engines.meta_gradient("naive", **q).loss

    directional_check(lambda x: meta_loss(x, p["raw_lrs"]), p["x_distilled"], rng, rel_err,
                      central_fd, g=back.grad_x)
    e = np.zeros_like(p["raw_lrs"])
    e[1, 0] = 1.0
    fd = central_fd(lambda t: meta_loss(p["x_distilled"], p["raw_lrs"] + t * e), eps=1e-5, halvings=8)
    assert fd is not None and rel_err(fd, back.grad_raw_lrs[1, 0]) < TOL
