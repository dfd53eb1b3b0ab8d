"""The layers the networks are built from, as plain differentiable functions: dense and
convolutional layers, ReLU, max and average pooling, instance normalisation, and the
initialisations of their weights.

Everything is built from ``autograd.numpy`` operations and three small linear primitives
(``matmul``, ``im2col`` and its adjoint ``col2im``), so autograd can differentiate every layer
to any order — which Algorithm 1 needs: the inner step uses ∇θ ℓ and the meta-gradient
differentiates through that gradient again.  No function here modifies an array in place.
"""

from __future__ import annotations

import math

import autograd.numpy as anp
from autograd.extend import defvjp, primitive
from autograd.tracer import getval

from ddref import backend
from ddref.fused_layers import matmul  # a @ b whose VJPs are matrix products again (one primitive)

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


# ---------------------------------------------------------------------------- convnet3's layers
# The two layers of Zhao et al.'s ConvNet (Dataset Condensation, DSA, DM, KIP's conv rows) that
# LeNet lacks: plain compositions of autograd.numpy operations, differentiable to any order.

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
