"""Networks written by hand: parameters are plain dicts of arrays, a model is a pair of
pure functions ``init(rng) -> params`` and ``apply(params, x) -> logits``.

Everything inside ``apply`` is built from ``autograd.numpy`` operations and two small
linear primitives (``im2col`` and its adjoint ``col2im``), so autograd can differentiate
it to any order — which is what Algorithm 1 needs: the inner step uses ∇θ ℓ and the
meta-gradient differentiates through that gradient again.

No function here modifies an array in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import autograd.numpy as anp
from autograd.extend import defvjp, primitive
from autograd.tracer import getval

from ddref import backend, fused_layers as fused  # the layer descriptions of ddref.fused's fast path

# ---------------------------------------------------------------------------- initialisation

INIT_SCHEMES = ("xavier", "kaiming", "normal")


def _fans(shape):
    """fan_in and fan_out of a dense (in, out) or conv (out, in, kh, kw) weight."""
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def init_weight(rng, shape, scheme="xavier", scale=1.0, dtype="float64"):
    """A weight tensor drawn with an explicit RNG.

    ``xavier``  — N(0, scale² · 2 / (fan_in + fan_out))   (the original code's default, gain = scale)
    ``kaiming`` — N(0, scale² · 2 / fan_in)
    ``normal``  — N(0, scale²)
    """
    fan_in, fan_out = _fans(shape)
    if scheme == "xavier":
        std = scale * math.sqrt(2.0 / (fan_in + fan_out))
    elif scheme == "kaiming":
        std = scale * math.sqrt(2.0 / fan_in)
    elif scheme == "normal":
        std = scale
    else:
        raise ValueError(f"unknown init scheme {scheme!r}: choose one of {', '.join(INIT_SCHEMES)}.")
    return backend.normal(rng, shape, std, dtype=dtype)


# ---------------------------------------------------------------------------- layers


@primitive
def matmul(a, b):
    """a @ b for 2-D arrays.  Its vector–Jacobian products are matrix products again,
    g @ bᵀ and aᵀ @ g; transposes are views, so every product goes straight to BLAS
    (autograd's own rule for ``dot`` goes through ``tensordot`` and copies)."""
    return a @ b


defvjp(matmul,
       lambda ans, a, b: lambda g: matmul(g, anp.transpose(b)),
       lambda ans, a, b: lambda g: matmul(anp.transpose(a), g))


def dense(x, w, b):
    """x: (N, in), w: (in, out), b: (out,)."""
    return matmul(x, w) + b


def relu(x):
    """max(x, 0), written as x · [x > 0] so its derivative is a plain mask (the mask is
    piecewise constant, so second derivatives through it are zero, as they should be)."""
    return x * (x > 0)


def flatten(x):
    return anp.reshape(x, (x.shape[0], -1))


# Convolutions and pooling work on NHWC arrays inside the models (channels last keeps each
# patch contiguous, so im2col is one copy and the convolution one matrix product).  The
# models take NCHW images, like the data sets, and transpose once on the way in.


def to_nhwc(x):
    return anp.transpose(x, (0, 2, 3, 1))


def to_nchw(x):
    return anp.transpose(x, (0, 3, 1, 2))


def max_pool2x2_nhwc(x):
    """2×2 max-pool with stride 2 on NHWC input (odd trailing rows/columns are dropped)."""
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    windows = anp.reshape(x, (n, h // 2, 2, w // 2, 2, c))
    return _max_over_windows(windows)


@primitive
def _max_over_windows(windows):
    """max over axes 2 and 4 of (N, H/2, 2, W/2, 2, C), as the maximum of the four strided
    views (several times faster than a reduction over two inner axes)."""
    xp = backend.xp()
    return xp.maximum(xp.maximum(windows[:, :, 0, :, 0], windows[:, :, 0, :, 1]),
                      xp.maximum(windows[:, :, 1, :, 0], windows[:, :, 1, :, 1]))


def window_routing(windows, pooled):
    """Where each 2×2 window's gradient goes: 1 at its maximum, 1/k to each of k tied maxima
    (a constant array shaped like ``windows``)."""
    windows, pooled = getval(windows), getval(pooled)
    n, h, _, w, _, c = windows.shape
    hit = windows == pooled.reshape(n, h, 1, w, 1, c)
    count = (hit[:, :, 0, :, 0].astype(windows.dtype) + hit[:, :, 0, :, 1]
             + hit[:, :, 1, :, 0] + hit[:, :, 1, :, 1])
    return hit * (1 / count).reshape(n, h, 1, w, 1, c)


def _route_to_max(g, windows, pooled):
    """The VJP of the max-pool: each window's gradient goes to its maximum, ties split evenly.
    The routing is a constant, so this is linear in g and autograd differentiates it again."""
    n, h, _, w, _, c = windows.shape
    return anp.reshape(g, (n, h, 1, w, 1, c)) * window_routing(windows, pooled)


defvjp(_max_over_windows, lambda ans, windows: lambda g: _route_to_max(g, windows, ans))


def max_pool2x2(x):
    """2×2 max-pool with stride 2 on NCHW input (odd trailing rows/columns are dropped)."""
    return to_nchw(max_pool2x2_nhwc(to_nhwc(x)))


def _out_size(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


def _patch_view(x, kh, kw, stride, ho, wo):
    """A strided view (N, Ho, Wo, C, kh, kw) of the padded NHWC array x (no copy)."""
    xp = backend.xp()
    sliding = getattr(getattr(xp, "lib", None), "stride_tricks", None)
    if sliding is not None and hasattr(sliding, "sliding_window_view"):
        view = sliding.sliding_window_view(x, (kh, kw), axis=(1, 2))
        return view[:, ::stride, ::stride][:, :ho, :wo]
    patches = [[x[:, i: i + stride * ho: stride, j: j + stride * wo: stride, :] for j in range(kw)]
               for i in range(kh)]
    return xp.stack([xp.stack(row, axis=-1) for row in patches], axis=-2)


@primitive
def im2col(x, kh, kw, stride=1, pad=0):
    """Patches of the NHWC array x as an array (N, Ho, Wo, C, kh, kw).

    A linear map of x; its adjoint is :func:`col2im`.  Declaring the pair as primitives
    whose vector–Jacobian products are each other gives exact derivatives of every order
    without autograd tracing the index arithmetic.
    """
    xp = backend.xp()
    n, h, w, c = x.shape
    ho, wo = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    if pad:
        x = xp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return xp.ascontiguousarray(_patch_view(x, kh, kw, stride, ho, wo))


@primitive
def col2im(cols, x_shape, kh, kw, stride=1, pad=0):
    """The adjoint of :func:`im2col`: add patches (N, Ho, Wo, C, kh, kw) back into the NHWC
    array of shape ``x_shape`` they came from."""
    xp = backend.xp()
    n, h, w, c = x_shape
    ho, wo = cols.shape[1], cols.shape[2]
    out = xp.zeros((n, h + 2 * pad, w + 2 * pad, c), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, i: i + stride * ho: stride, j: j + stride * wo: stride, :] += cols[..., i, j]
    return out[:, pad: pad + h, pad: pad + w, :]


defvjp(im2col, lambda ans, x, kh, kw, stride=1, pad=0:
       lambda g: col2im(g, x.shape, kh, kw, stride, pad))
defvjp(col2im, lambda ans, cols, x_shape, kh, kw, stride=1, pad=0:
       lambda g: im2col(g, kh, kw, stride, pad))


def conv2d_nhwc(x, w, b, stride=1, pad=0):
    """Cross-correlation of the NHWC array x with w (O, C, kh, kw), plus bias b (O,):
    im2col, then one matrix product over the C·kh·kw entries of each patch."""
    o, c, kh, kw = w.shape
    cols = im2col(x, kh, kw, stride, pad)                          # (N, Ho, Wo, C, kh, kw)
    n, ho, wo = cols.shape[:3]
    out = matmul(anp.reshape(cols, (n * ho * wo, c * kh * kw)), anp.transpose(anp.reshape(w, (o, -1))))
    return anp.reshape(out, (n, ho, wo, o)) + b


def conv2d(x, w, b, stride=1, pad=0):
    """Cross-correlation of x (N, C, H, W) with w (O, C, kh, kw), plus bias b (O,), NCHW in and out."""
    return to_nchw(conv2d_nhwc(to_nhwc(x), w, b, stride, pad))


# ---------------------------------------------------------------------------- models


class ShapeError(ValueError):
    """An input whose shape the model cannot take."""


@dataclass(frozen=True)
class Model:
    """A network: ``init(rng, dtype)`` draws parameters, ``apply(params, x)`` gives logits."""

    name: str
    input_shape: tuple          # (C, H, W)
    num_classes: int
    init: Callable
    apply: Callable

    def check_input(self, x_shape):
        """Raise :class:`ShapeError` with one clear sentence if images of ``x_shape`` do not fit."""
        _check_images(self.name, self.input_shape, x_shape)


def _check_images(name, input_shape, x_shape):
    got = tuple(x_shape[-3:])
    if got != tuple(input_shape):
        raise ShapeError(
            f"model {name!r} takes images of shape {tuple(input_shape)} (C, H, W) "
            f"but got {got}; choose a model built for this data set "
            f"(e.g. build_model(name, dataset.image_shape, dataset.num_classes)).")


def _model(name, input_shape, num_classes, shapes, forward, layers=None):
    """A :class:`Model` whose ``apply`` first checks the image shape (one cheap comparison),
    then runs ``forward``.  ``layers`` describes the same network for the hand-written
    gradient of :mod:`ddref.fused` (tests/test_fused.py checks that both agree)."""
    input_shape = tuple(input_shape)

    def apply(params, x):
        if tuple(x.shape[1:]) != input_shape:
            raise ShapeError(
                f"model {name!r} takes a batch of images of shape (N, {', '.join(map(str, input_shape))}) "
                f"but got an array of shape {tuple(x.shape)}; pass images shaped (N, C, H, W) from the "
                f"data set the model was built for.")
        return forward(params, x)

    apply.__doc__ = forward.__doc__
    apply.input_shape = input_shape
    if layers is not None:
        apply.layers = tuple(layers)
    return Model(name, input_shape, num_classes, _make_init(shapes), apply)


def _init_params(rng, shapes, scheme, scale, dtype):
    """Weights from ``scheme``; biases (1-D shapes) start at zero, as in the original code."""
    rng = backend.rng(rng)
    params = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            params[key] = backend.zeros(shape, dtype=dtype)
        else:
            params[key] = init_weight(rng, shape, scheme, scale, dtype)
    return params


def _make_init(shapes):
    def init(rng, dtype="float64", scheme="xavier", scale=1.0):
        return _init_params(rng, shapes, scheme, scale, dtype)

    init.shapes = shapes
    return init


def mlp(input_shape, hidden=(128,), num_classes=10):
    """A fully connected ReLU network: flatten → dense → relu → … → dense (logits)."""
    sizes = [math.prod(input_shape), *hidden, num_classes]
    shapes = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        shapes[f"w{i}"], shapes[f"b{i}"] = (n_in, n_out), (n_out,)
    n_layers = len(sizes) - 1

    def apply(params, x):
        h = flatten(x)
        for i in range(n_layers):
            h = dense(h, params[f"w{i}"], params[f"b{i}"])
            if i < n_layers - 1:
                h = relu(h)
        return h

    layers = [fused.Flatten()] + [fused.Dense(f"w{i}", f"b{i}", relu=i < n_layers - 1)
                                  for i in range(n_layers)]
    return _model("mlp", input_shape, num_classes, shapes, apply, layers)


def lenet(input_shape=(1, 28, 28), num_classes=10):
    """LeNet as in the original code: conv 6@5×5 (pad 2 for 28×28, 0 for 32×32) → relu → pool →
    conv 16@5×5 → relu → pool → 120 → 84 → classes."""
    c, h, w = input_shape
    if (h, w) not in ((28, 28), (32, 32)):
        raise ShapeError(
            f"lenet takes 28×28 or 32×32 images but got {h}×{w}; use the mlp model for this data set."
        )
    pad = 2 if h == 28 else 0
    shapes = {"c1w": (6, c, 5, 5), "c1b": (6,), "c2w": (16, 6, 5, 5), "c2b": (16,),
              "f1w": (400, 120), "f1b": (120,), "f2w": (120, 84), "f2b": (84,),
              "f3w": (84, num_classes), "f3b": (num_classes,)}

    def apply(params, x):
        h = to_nhwc(x)
        h = max_pool2x2_nhwc(relu(conv2d_nhwc(h, params["c1w"], params["c1b"], pad=pad)))
        h = max_pool2x2_nhwc(relu(conv2d_nhwc(h, params["c2w"], params["c2b"])))
        h = relu(dense(flatten(h), params["f1w"], params["f1b"]))
        h = relu(dense(h, params["f2w"], params["f2b"]))
        return dense(h, params["f3w"], params["f3b"])

    layers = [fused.ToCNHW(), fused.ConvReluPool("c1w", "c1b", pad), fused.ConvReluPool("c2w", "c2b"),
              *_classifier_layers()]
    return _model("lenet", input_shape, num_classes, shapes, apply, layers)


def _classifier_layers():
    """flatten → dense+relu → dense+relu → dense: the fully connected end of lenet and convnet."""
    return [fused.FlattenCNHW(), fused.Dense("f1w", "f1b", relu=True), fused.Dense("f2w", "f2b", relu=True),
            fused.Dense("f3w", "f3b")]


def convnet(input_shape=(3, 32, 32), num_classes=10):
    """A small AlexNet-like convnet for 32×32 colour images (the paper's CIFAR-10 network, scaled
    down): [conv 5×5 pad 2 → relu → pool] × 2 with 32 and 64 channels → 384 → 192 → classes."""
    c, h, w = input_shape
    if (h, w) != (32, 32):
        raise ShapeError(
            f"convnet takes 32×32 images but got {h}×{w}; use "
            f"{'lenet' if (h, w) == (28, 28) else 'the mlp model'} for this data set."
        )
    shapes = {"c1w": (32, c, 5, 5), "c1b": (32,), "c2w": (64, 32, 5, 5), "c2b": (64,),
              "f1w": (64 * 8 * 8, 384), "f1b": (384,), "f2w": (384, 192), "f2b": (192,),
              "f3w": (192, num_classes), "f3b": (num_classes,)}

    def apply(params, x):
        h = to_nhwc(x)
        h = max_pool2x2_nhwc(relu(conv2d_nhwc(h, params["c1w"], params["c1b"], pad=2)))
        h = max_pool2x2_nhwc(relu(conv2d_nhwc(h, params["c2w"], params["c2b"], pad=2)))
        h = relu(dense(flatten(h), params["f1w"], params["f1b"]))
        h = relu(dense(h, params["f2w"], params["f2b"]))
        return dense(h, params["f3w"], params["f3b"])

    layers = [fused.ToCNHW(), fused.ConvReluPool("c1w", "c1b", 2), fused.ConvReluPool("c2w", "c2b", 2),
              *_classifier_layers()]
    return _model("convnet", input_shape, num_classes, shapes, apply, layers)


# ---------------------------------------------------------------------------- convnet3 (Zhao et al.)
# The ConvNet of Dataset Condensation (Zhao, Mopuri & Bilen 2021) and of DSA, DM and KIP's
# convolutional rows: its two new primitives are plain compositions of autograd.numpy
# operations, so autograd differentiates them to any order like everything above.

INSTANCE_NORM_EPS = 1e-5        # PyTorch's GroupNorm default


def instance_standardise_nhwc(x, eps=INSTANCE_NORM_EPS):
    """x̂ = (x − μ) / √(σ² + ε) on NHWC input, with μ and σ² the mean and the biased variance
    of each image's channel over its H×W positions (one pair per image and channel)."""
    count = x.shape[1] * x.shape[2]       # sum / count, not mean: keeps float32 float32 (losses.py)
    mean = anp.sum(x, axis=(1, 2), keepdims=True) / count
    centred = x - mean
    variance = anp.sum(centred * centred, axis=(1, 2), keepdims=True) / count
    return centred / anp.sqrt(variance + eps)


def instance_norm_nhwc(x, gamma, beta, eps=INSTANCE_NORM_EPS):
    """Instance normalisation y = γ_c x̂ + β_c with x̂ from :func:`instance_standardise_nhwc`
    and a learnable scale γ and shift β per channel: PyTorch's ``GroupNorm(C, C, affine=True)``,
    which is what DC's ``net_norm='instancenorm'`` builds.  Each image is normalised on its
    own, so training and testing compute the same function (no running statistics)."""
    return instance_standardise_nhwc(x, eps) * gamma + beta


def avg_pool2x2_nhwc(x):
    """2×2 average pooling with stride 2 on NHWC input: the mean of each window (odd trailing
    rows/columns are dropped, as PyTorch's ``AvgPool2d(2, 2)`` drops them).  Linear in x."""
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    windows = anp.reshape(x, (n, h // 2, 2, w // 2, 2, c))
    return anp.sum(windows, axis=(2, 4)) * 0.25


def convnet3_first_pad(channels):
    """The first convolution's padding: 3 for one-channel images (28×28 → 32×32, as DC's code
    pads MNIST-like images), else 1."""
    return 3 if channels == 1 else 1


def convnet3_feature_sizes(input_shape):
    """The (H, W) of the maps after each of convnet3's three blocks: the 3×3 convolution keeps
    the size (padding 1; the first block's padding from :func:`convnet3_first_pad` adds 4 to
    each side length for one-channel images), the pooling halves it, rounding down.
    A ShapeError when a map vanishes."""
    c, h, w = input_shape
    pad = convnet3_first_pad(c)
    h, w = h + 2 * pad - 2, w + 2 * pad - 2
    sizes = []
    for block in (1, 2, 3):
        h, w = h // 2, w // 2
        if h < 1 or w < 1:
            smallest = 4 if pad == 3 else 8
            raise ShapeError(
                f"convnet3 halves the maps three times, so {input_shape[1]}×{input_shape[2]} images "
                f"leave no features after block {block}; it needs images of at least "
                f"{smallest}×{smallest} pixels ({c} channel{'s' if c > 1 else ''}): use the mlp "
                f"model for this data set.")
        sizes.append((h, w))
    return sizes


def convnet3(input_shape=(3, 32, 32), num_classes=10, width=128):
    """ConvNet-3, the field's standard network (Zhao et al. 2021, DC's ``ConvNet`` with its
    defaults: depth 3, width 128, ReLU, instance norm, average pooling):

        [conv 3×3 (``width`` channels) → instance norm (γ, β) → relu → 2×2 average pool] × 3
        → flatten → linear classifier.

    Padding is 1, except the first convolution on one-channel images pads 3, as DC's code
    does: 28×28 MNIST / Fashion-MNIST images become 32×32 maps (32 → 16 → 8 → 4) and the
    classifier sees 4·4·width features, as on 32×32 colour images.  8×8 digits give
    12 → 6 → 3 → 1 (1·1·width features).

    Initialisation: the convolution and classifier weights by the chosen scheme (xavier by
    default, like the other models; DC uses PyTorch's defaults), biases zero, γ = 1, β = 0.
    The convolution biases are kept as DC keeps them, though instance norm cancels them (their
    gradient is exactly zero).  The classifier reads the features in NHWC order (DC: NCHW),
    a fixed permutation of its weights.
    """
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"convnet3's width must be a positive whole number of channels, got {width!r}.")
    c = input_shape[0]
    pad1 = convnet3_first_pad(c)
    fh, fw = convnet3_feature_sizes(input_shape)[-1]
    shapes = {}
    for i, channels_in in enumerate((c, width, width), start=1):
        shapes[f"c{i}w"], shapes[f"c{i}b"] = (width, channels_in, 3, 3), (width,)
        shapes[f"n{i}g"], shapes[f"n{i}b"] = (width,), (width,)
    shapes["fw"], shapes["fb"] = (fh * fw * width, num_classes), (num_classes,)

    def apply(params, x):
        h = to_nhwc(x)
        for i, pad in ((1, pad1), (2, 1), (3, 1)):
            h = conv2d_nhwc(h, params[f"c{i}w"], params[f"c{i}b"], pad=pad)
            h = avg_pool2x2_nhwc(relu(instance_norm_nhwc(h, params[f"n{i}g"], params[f"n{i}b"])))
        return dense(flatten(h), params["fw"], params["fb"])

    apply.__doc__ = convnet3.__doc__
    plain = _model("convnet3", input_shape, num_classes, shapes, apply)

    def init(rng, dtype="float64", scheme="xavier", scale=1.0):
        params = _init_params(rng, shapes, scheme, scale, dtype)
        for i in (1, 2, 3):
            params[f"n{i}g"] = backend.ones((width,), dtype=dtype)      # γ = 1, β = 0
        return params

    init.shapes = shapes
    return Model(plain.name, plain.input_shape, plain.num_classes, init, plain.apply)


def linear(input_shape, num_classes=1):
    """Linear regression without bias, outputs = flatten(x) · w with w (D, K): the model of the
    paper's §3.4 (pair it with ``losses.squared_error``)."""
    shapes = {"w": (math.prod(input_shape), num_classes)}

    def apply(params, x):
        return matmul(flatten(x), params["w"])

    return _model("linear", input_shape, num_classes, shapes, apply)


MODELS = {"mlp": mlp, "lenet": lenet, "convnet": convnet, "linear": linear, "convnet3": convnet3}


def build_model(name, input_shape, num_classes=10, **options):
    """The model called ``name`` sized for images of ``input_shape`` (C, H, W)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}.")
    return MODELS[name](tuple(input_shape), num_classes=num_classes, **options)


def num_params(params) -> int:
    return sum(int(math.prod(p.shape)) for p in params.values())
