"""ddref.nn: layers, models, initialisation.

Every derivative the package relies on is compared with central finite differences in
float64 (relative error < 1e-6 on random projections): the layers, whole MLP / LeNet
losses w.r.t. each parameter and the input, and the second derivatives through the
convolution that the meta-gradient needs (Hessian-vector products, including the mixed
∂²ℓ/∂θ∂x).  conv2d is also compared with a direct loop implementation, and im2col /
col2im with the definition of an adjoint.
"""

import itertools

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from autograd.misc import flatten

from ddref import losses, nn

TOL = 1e-6


# ---------------------------------------------------------------------------- helpers


def project(f, out_shape, rng):
    """A scalar function ⟨f(·), R⟩ with a fixed random R: its gradient is the VJP of f."""
    r = rng.normal(size=out_shape)
    return lambda *args: anp.sum(f(*args) * r)


def probe_direction(g, rng):
    """ĝ + r̂: the unit gradient plus a unit random vector.  A plain random direction is
    nearly orthogonal to g in many dimensions, so ⟨g, d⟩ is sometimes tiny by chance and
    rounding or the O(eps²) term alone then exceeds 1e-6 relative; ĝ keeps ⟨g, d⟩ ≈ ‖g‖
    while r̂ still probes the other directions (an error e in g shows up as ⟨e, d⟩)."""
    r = rng.normal(size=np.shape(g))
    norm = np.linalg.norm(g)
    return (g / norm if norm > 0 else 0.0) + r / np.linalg.norm(r)


def check_directional(fn, args, argnum, rng, rel_err, central_fd, directions=2):
    """∇_{args[argnum]} fn agrees with central differences along directions ĝ + r̂."""
    g = grad(fn, argnum)(*args)
    x = args[argnum]
    for _ in range(directions):
        d = probe_direction(g, rng)

        def along(t, d=d):
            shifted = list(args)
            shifted[argnum] = x + t * d
            return fn(*shifted)

        fd = central_fd(along, eps=1e-5, halvings=8)
        assert fd is not None, "finite difference straddles a kink; change the seed"
        assert rel_err(fd, np.vdot(g, d)) < TOL


def naive_conv2d(x, w, b, stride, pad):
    """Cross-correlation by nested loops over output positions (the definition)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, ho, wo))
    for i in range(n):
        for f in range(o):
            for p in range(ho):
                for q in range(wo):
                    patch = xp[i, :, p * stride: p * stride + kh, q * stride: q * stride + kw]
                    out[i, f, p, q] = np.sum(patch * w[f]) + b[f]
    return out


def loss_fn(model):
    def loss(params, x, targets):
        return losses.cross_entropy(model.apply(params, x), targets)
    return loss


def batch(rng, model, n=3):
    x = rng.normal(size=(n, *model.input_shape))
    targets = losses.one_hot(rng.integers(0, model.num_classes, n), model.num_classes)
    return x, targets


# ---------------------------------------------------------------------------- layers

CONV_CASES = [  # (H, W, kh, kw, stride, pad)
    (6, 6, 3, 3, 1, 0),
    (6, 6, 3, 3, 1, 2),
    (7, 7, 3, 3, 2, 0),
    (8, 8, 3, 3, 2, 0),   # (H − k) not a multiple of the stride: last row unused
    (7, 6, 5, 5, 2, 2),
    (5, 7, 2, 3, 1, 1),   # non-square image and kernel
    (6, 6, 5, 5, 1, 2),   # LeNet's first layer at toy size
]


@pytest.mark.parametrize("h,w,kh,kw,stride,pad", CONV_CASES)
def test_conv2d_matches_direct_loops(rng, h, w, kh, kw, stride, pad):
    x = rng.normal(size=(2, 3, h, w))
    wt = rng.normal(size=(4, 3, kh, kw))
    b = rng.normal(size=4)
    got = nn.conv2d(x, wt, b, stride=stride, pad=pad)
    want = naive_conv2d(x, wt, b, stride, pad)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("h,w,kh,kw,stride,pad", CONV_CASES)
def test_conv2d_nhwc_is_conv2d_transposed(rng, h, w, kh, kw, stride, pad):
    x = rng.normal(size=(2, 3, h, w))
    wt, b = rng.normal(size=(4, 3, kh, kw)), rng.normal(size=4)
    got = nn.conv2d_nhwc(nn.to_nhwc(x), wt, b, stride, pad)
    np.testing.assert_allclose(nn.to_nchw(got), naive_conv2d(x, wt, b, stride, pad),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("h,w,kh,kw,stride,pad", CONV_CASES)
def test_im2col_extracts_the_patches(rng, h, w, kh, kw, stride, pad):
    """cols[n, p, q, c, i, j] = x_padded[n, p·stride + i, q·stride + j, c] (NHWC)."""
    x = rng.normal(size=(2, h, w, 3))
    cols = nn.im2col(x, kh, kw, stride, pad)
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    assert cols.shape == (2, ho, wo, 3, kh, kw)
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    for p, q, i, j in itertools.product(range(ho), range(wo), range(kh), range(kw)):
        np.testing.assert_array_equal(cols[:, p, q, :, i, j], xp[:, p * stride + i, q * stride + j, :])


@pytest.mark.parametrize("h,w,kh,kw,stride,pad", CONV_CASES)
def test_im2col_col2im_are_adjoint(rng, h, w, kh, kw, stride, pad):
    """⟨im2col(x), c⟩ = ⟨x, col2im(c)⟩ — what makes each the other's VJP."""
    x = rng.normal(size=(2, h, w, 3))
    cols = nn.im2col(x, kh, kw, stride, pad)
    c = rng.normal(size=cols.shape)
    back = nn.col2im(c, x.shape, kh, kw, stride, pad)
    assert back.shape == x.shape
    lhs, rhs = np.vdot(cols, c), np.vdot(x, back)
    assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), abs(rhs), 1.0)


class _NumpyWithoutSlidingWindows:
    """numpy, minus ``lib.stride_tricks`` — like an array library lacking
    sliding_window_view, which sends im2col down its explicit-slicing fallback."""

    lib = object()

    def __getattr__(self, name):
        return getattr(np, name)


@pytest.mark.parametrize("h,w,kh,kw,stride,pad", CONV_CASES)
def test_im2col_fallback_path_agrees(rng, monkeypatch, h, w, kh, kw, stride, pad):
    from ddref import backend
    x = rng.normal(size=(2, h, w, 3))
    want = nn.im2col(x, kh, kw, stride, pad)
    monkeypatch.setitem(backend._STATE, "xp", _NumpyWithoutSlidingWindows())
    np.testing.assert_array_equal(nn.im2col(x, kh, kw, stride, pad), want)


@pytest.mark.parametrize("stride,pad", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_conv2d_gradients_match_finite_differences(rng, rel_err, central_fd, stride, pad):
    x = rng.normal(size=(2, 2, 7, 7))
    w = rng.normal(size=(3, 2, 3, 3))
    b = rng.normal(size=3)
    out_shape = nn.conv2d(x, w, b, stride, pad).shape
    f = project(lambda x, w, b: nn.conv2d(x, w, b, stride, pad), out_shape, rng)
    for argnum in range(3):
        check_directional(f, (x, w, b), argnum, rng, rel_err, central_fd)


@pytest.mark.parametrize("stride,pad", [(1, 0), (2, 2)])
def test_conv2d_second_derivative_matches_finite_differences(rng, rel_err, central_fd,
                                                             stride, pad):
    """A nonlinear function of the conv output, so the Hessian is non-trivial and autograd
    has to differentiate the im2col / col2im VJPs themselves (mixed x–w second derivative)."""
    x = rng.normal(size=(2, 2, 6, 6))
    w = rng.normal(size=(3, 2, 3, 3))
    b = rng.normal(size=3)
    r = rng.normal(size=nn.conv2d(x, w, b, stride, pad).shape)

    def f_ag(x, w):
        return anp.sum(anp.tanh(nn.conv2d(x, w, b, stride, pad)) * r)

    u = rng.normal(size=w.shape)
    # ⟨∇_w f, u⟩ as a function of x: its x-gradient is the mixed second derivative
    mixed = grad(lambda x: anp.sum(grad(f_ag, 1)(x, w) * u))(x)
    for d in (probe_direction(mixed, rng), probe_direction(mixed, rng)):
        fd = central_fd(lambda t: np.vdot(grad(f_ag, 1)(x + t * d, w), u), eps=1e-5)
        assert fd is not None
        assert rel_err(fd, np.vdot(mixed, d)) < TOL


def test_dense_gradients_match_finite_differences(rng, rel_err, central_fd):
    x, w, b = rng.normal(size=(4, 5)), rng.normal(size=(5, 3)), rng.normal(size=3)
    np.testing.assert_allclose(nn.dense(x, w, b), x @ w + b, rtol=1e-14)
    f = project(nn.dense, (4, 3), rng)
    for argnum in range(3):
        check_directional(f, (x, w, b), argnum, rng, rel_err, central_fd)


def test_matmul_second_derivative_matches_finite_differences(rng, rel_err, central_fd):
    """matmul is a primitive whose VJPs are matmuls again: check a mixed second derivative
    of a nonlinear function of it (∂/∂a ⟨∇_b f, u⟩) against finite differences."""
    a, b = rng.normal(size=(4, 5)), rng.normal(size=(5, 3))
    r, u = rng.normal(size=(4, 3)), rng.normal(size=(5, 3))

    def f(a, b):
        return anp.sum(anp.tanh(nn.matmul(a, b)) * r)

    def u_dot_grad_b(a):
        return anp.sum(grad(f, 1)(a, b) * u)

    mixed = grad(u_dot_grad_b)(a)
    for _ in range(2):
        d = probe_direction(mixed, rng)
        fd = central_fd(lambda t: u_dot_grad_b(a + t * d), eps=1e-5)
        assert fd is not None and rel_err(fd, np.vdot(mixed, d)) < TOL


def test_relu_value_and_gradient(rng, rel_err, central_fd):
    x = rng.normal(size=(4, 6))
    x = np.where(np.abs(x) < 1e-2, 0.5, x)          # keep away from the kink
    np.testing.assert_array_equal(nn.relu(x), np.where(x > 0, x, 0.0))
    f = project(nn.relu, x.shape, rng)
    check_directional(f, (x,), 0, rng, rel_err, central_fd)
    g = grad(lambda x: anp.sum(nn.relu(x)))(x)
    np.testing.assert_array_equal(g, (x > 0).astype(float))


@pytest.mark.parametrize("shape", [(2, 3, 6, 8), (2, 2, 5, 7)])
def test_max_pool_value_and_gradient(rng, rel_err, central_fd, shape):
    x = rng.normal(size=shape)
    n, c, h, w = shape
    out = nn.max_pool2x2(x)
    assert out.shape == (n, c, h // 2, w // 2)   # odd trailing row / column dropped
    want = np.empty(out.shape)
    for i, j in itertools.product(range(h // 2), range(w // 2)):
        want[:, :, i, j] = x[:, :, 2 * i: 2 * i + 2, 2 * j: 2 * j + 2].max(axis=(2, 3))
    np.testing.assert_array_equal(out, want)
    f = project(nn.max_pool2x2, out.shape, rng)
    check_directional(f, (x,), 0, rng, rel_err, central_fd)
    # the gradient routes each output's cotangent to its arg-max only
    g = grad(lambda x: anp.sum(nn.max_pool2x2(x)))(x)
    assert g.sum() == pytest.approx(out.size)
    assert set(np.unique(g)) <= {0.0, 1.0}
    # the NHWC version is the same map
    np.testing.assert_array_equal(nn.to_nchw(nn.max_pool2x2_nhwc(nn.to_nhwc(x))), out)


def test_max_pool_splits_ties_evenly():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 2:, 2:] = [[1.0, 1.0], [0.0, 1.0]]      # one window with a three-way tie
    g = grad(lambda x: anp.sum(nn.max_pool2x2(x)))(x)
    np.testing.assert_allclose(g[0, 0, :2, :2], 0.25)               # all four equal (zero)
    np.testing.assert_allclose(g[0, 0, 2:, 2:], [[1 / 3, 1 / 3], [0.0, 1 / 3]])


def test_flatten(rng):
    x = rng.normal(size=(3, 2, 4, 5))
    assert nn.flatten(x).shape == (3, 40)
    np.testing.assert_array_equal(nn.flatten(x)[1], x[1].ravel())


# ---------------------------------------------------------------------------- whole models

MODEL_CASES = [("mlp", (1, 8, 8)), ("lenet", (1, 28, 28)), ("lenet", (3, 32, 32))]


@pytest.mark.parametrize("name,shape", MODEL_CASES)
def test_model_loss_gradients_match_finite_differences(rng, rel_err, central_fd, name, shape):
    """∂ℓ/∂(every parameter tensor) and ∂ℓ/∂x against central differences."""
    model = nn.build_model(name, shape, 10)
    params = model.init(rng)
    x, targets = batch(rng, model, n=3)
    loss = loss_fn(model)
    g_params = grad(loss, 0)(params, x, targets)
    assert set(g_params) == set(params)
    for key in params:
        d = probe_direction(g_params[key], rng)

        def along(t, key=key, d=d):
            shifted = dict(params)
            shifted[key] = params[key] + t * d
            return loss(shifted, x, targets)

        fd = central_fd(along, eps=1e-5, halvings=8)
        assert fd is not None, f"{key}: finite difference straddles a kink"
        assert rel_err(fd, np.vdot(g_params[key], d)) < TOL, key
    check_directional(loss, (params, x, targets), 1, rng, rel_err, central_fd)


def test_lenet_hessian_vector_products_match_finite_differences(rng, rel_err, central_fd):
    """Second derivatives through conv / pool / relu: H_θθ v and the mixed ∂²ℓ/∂x∂θ v (the
    two products the back-gradient engine takes at every step)."""
    model = nn.build_model("lenet", (1, 28, 28), 10)
    params = model.init(rng)
    x, targets = batch(rng, model, n=2)
    loss = loss_fn(model)
    flat, unflatten = flatten(params)

    def grad_flat(theta, x):
        return flatten(grad(loss, 0)(unflatten(theta), x, targets))[0]

    v = rng.normal(size=flat.shape)
    v /= np.linalg.norm(v)
    hvp = grad(lambda th: anp.dot(v, grad_flat(th, x)))(flat)   # H v (H symmetric)
    u = probe_direction(hvp, rng)

    def u_dot_grad(theta, x):
        return anp.dot(u, grad_flat(theta, x))

    fd = central_fd(lambda t: u_dot_grad(flat + t * v, x), eps=1e-5, halvings=8)
    assert fd is not None
    assert rel_err(fd, np.dot(u, hvp)) < TOL

    mixed = grad(u_dot_grad, 1)(flat, x)                        # ∂/∂x ⟨u, ∇θ ℓ⟩
    d = probe_direction(mixed, rng)
    fd = central_fd(lambda t: u_dot_grad(flat, x + t * d), eps=1e-5, halvings=8)
    assert fd is not None
    assert rel_err(fd, np.vdot(mixed, d)) < TOL


@pytest.mark.parametrize("name,shape", MODEL_CASES + [("convnet", (3, 32, 32))])
def test_apply_does_not_mutate_inputs(rng, name, shape):
    model = nn.build_model(name, shape, 10)
    params = model.init(rng)
    x, targets = batch(rng, model, n=2)
    params_before = {k: v.copy() for k, v in params.items()}
    x_before = x.copy()
    model.apply(params, x)
    grad(loss_fn(model), (0, 1))(params, x, targets)
    for k in params:
        np.testing.assert_array_equal(params[k], params_before[k])
    np.testing.assert_array_equal(x, x_before)


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name,shape,classes", [
    ("mlp", (1, 8, 8), 10), ("mlp", (3, 5, 4), 7),
    ("lenet", (1, 28, 28), 10), ("lenet", (1, 32, 32), 10), ("lenet", (3, 32, 32), 4),
    ("convnet", (3, 32, 32), 10), ("convnet", (1, 32, 32), 3), ("linear", (1, 4, 4), 2),
])
def test_output_shapes(rng, name, shape, classes):
    model = nn.build_model(name, shape, classes)
    assert model.name == name and model.input_shape == shape and model.num_classes == classes
    params = model.init(rng)
    out = model.apply(params, rng.normal(size=(2, *shape)))
    assert out.shape == (2, classes)
    assert np.all(np.isfinite(out))


def test_mlp_hidden_sizes_define_the_parameter_shapes(rng):
    model = nn.build_model("mlp", (1, 4, 4), 10, hidden=(8, 6))
    params = model.init(rng)
    assert {k: v.shape for k, v in params.items()} == {
        "w0": (16, 8), "b0": (8,), "w1": (8, 6), "b1": (6,), "w2": (6, 10), "b2": (10,)}
    assert nn.num_params(params) == 16 * 8 + 8 + 8 * 6 + 6 + 6 * 10 + 10


def test_lenet_parameter_count_matches_the_original():
    params = nn.build_model("lenet", (1, 28, 28), 10).init(np.random.default_rng(0))
    assert nn.num_params(params) == 61706          # the classic LeNet-5 count


def test_lenet_rejects_images_it_cannot_take():
    with pytest.raises(nn.ShapeError, match=r"28×28 or 32×32.*8×8.*mlp"):
        nn.build_model("lenet", (1, 8, 8))
    assert issubclass(nn.ShapeError, ValueError)


def test_convnet_rejects_images_it_cannot_take():
    with pytest.raises(nn.ShapeError, match="32×32.*use lenet"):
        nn.build_model("convnet", (1, 28, 28))
    with pytest.raises(nn.ShapeError, match="8×8; use the mlp model"):
        nn.build_model("convnet", (1, 8, 8))


@pytest.mark.parametrize("name, shape, bad", [("mlp", (1, 8, 8), (3, 1, 28, 28)),
                                              ("lenet", (1, 28, 28), (3, 3, 32, 32)),
                                              ("lenet", (1, 28, 28), (1, 28, 28))])
def test_apply_rejects_images_of_the_wrong_shape(name, shape, bad):
    model = nn.build_model(name, shape)
    with pytest.raises(nn.ShapeError, match=r"takes a batch of images of shape \(N, 1, \d+, \d+\) but got"):
        model.apply(model.init(0), np.zeros(bad))


def test_check_input():
    model = nn.build_model("lenet", (1, 28, 28))
    model.check_input((5, 1, 28, 28))
    model.check_input((2, 7, 1, 28, 28))           # (steps, n, C, H, W) also fits
    with pytest.raises(nn.ShapeError, match=r"\(1, 28, 28\).*\(3, 32, 32\)"):
        model.check_input((5, 3, 32, 32))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*mlp"):
        nn.build_model("resnet", (1, 28, 28))


# ---------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("shape", [(300, 500), (64, 32, 5, 5)])
@pytest.mark.parametrize("scheme", ["xavier", "kaiming", "normal"])
def test_init_weight_std(rng, shape, scheme):
    if len(shape) == 2:
        fan_in, fan_out = shape
    else:
        fan_in, fan_out = shape[1] * 25, shape[0] * 25
    expected = {"xavier": np.sqrt(2.0 / (fan_in + fan_out)),
                "kaiming": np.sqrt(2.0 / fan_in),
                "normal": 1.0}[scheme]
    for scale in (1.0, 0.5):
        w = nn.init_weight(rng, shape, scheme, scale=scale)
        assert w.shape == shape and w.dtype == np.float64
        assert abs(w.mean()) < 0.02 * expected * scale
        assert w.std() == pytest.approx(expected * scale, rel=0.02)


def test_init_weight_unknown_scheme(rng):
    with pytest.raises(ValueError, match="unknown init scheme 'glorot'.*xavier"):
        nn.init_weight(rng, (3, 4), "glorot")
    with pytest.raises(ValueError, match="unknown init scheme"):
        nn.build_model("mlp", (1, 4, 4)).init(rng, scheme="glorot")


@pytest.mark.parametrize("name,shape", MODEL_CASES)
def test_model_init_biases_zero_weights_scaled(name, shape):
    model = nn.build_model(name, shape, 10)
    params = model.init(np.random.default_rng(1), scheme="normal", scale=0.3)
    for key, value in params.items():
        if value.ndim == 1:
            assert np.all(value == 0), key
        else:
            assert np.any(value != 0), key
    big = max((v for v in params.values() if v.ndim > 1), key=lambda v: v.size)
    assert big.std() == pytest.approx(0.3, rel=0.05)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_init_dtype(dtype):
    params = nn.build_model("lenet", (1, 28, 28)).init(np.random.default_rng(0), dtype=dtype)
    assert all(v.dtype == np.dtype(dtype) for v in params.values())


@pytest.mark.parametrize("name,shape", MODEL_CASES)
def test_init_is_reproducible(name, shape):
    model = nn.build_model(name, shape, 10)
    a = model.init(np.random.default_rng(7))
    b = model.init(7)                                 # an int seed works too
    c = model.init(np.random.default_rng(8))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
