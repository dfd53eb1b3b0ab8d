"""The convolution's patch matrix and the 2×2 max-pool, each as one device kernel.

Each function here is an autograd primitive with three implementations of the same numbers:

* **numpy** (the numpy backend): the readable reference — slices, loops over the kernel
  offsets, strided views;
* **CuPy**: one ``cupy.ElementwiseKernel`` per call, each thread computing one output
  element by index arithmetic (the design of Chainer's ``chainer/utils/conv.py``:
  im2col as a per-element copy, col2im as a per-element *gather* over the kernel offsets
  that reach the pixel, so no thread writes where another does and no atomics are needed);
* **emulated** (the strict fake device of the tests, ``xp.emulate_kernel``): the kernel's
  index arithmetic written in vectorised numpy, counted as one device operation.

tests/test_fused.py checks that the emulated kernels and the numpy path agree to 1e-10 in
float64, values and derivatives.

Shapes (channel-major, as :mod:`ddref.fused_layers` uses them):

=========================  =====================================================
``patches_cnhw``           x (C, N, H, W) → P (kh·kw·C, N·Ho·Wo),
                           P[(i, j, c), (n, y, x)] = x_pad[c, n, y + i, x + j]
``patches_cnhw_adjoint``   P → x (C, N, H, W):  x[c, n, y, x] = Σ_{i,j} P[(i, j, c), (n, y+p−i, x+p−j)]
``pool_relu``              z (O, N·Ho·Wo) → relu(max over each 2×2 window) (O, N, Ho/2, Wo/2)
``unpool``                 its derivative: each window's gradient to its maxima (ties split)
``pool_tangent``           the adjoint of ``unpool``: Σ over the window of ż · route
=========================  =====================================================
"""

from __future__ import annotations

import numpy

from autograd.extend import defvjp, primitive
from autograd.tracer import getval

from ddref import backend


def _out_size(h, w, kh, kw, pad):
    return h + 2 * pad - kh + 1, w + 2 * pad - kw + 1


def _launch(name, *args):
    """Run kernel ``name`` on the selected device: emulated on the fake device, compiled on CuPy."""
    xp = backend.xp()
    emulate = getattr(xp, "emulate_kernel", None)
    if emulate is not None:
        return emulate(_EMULATED[name], *args)
    return _CUPY[name](xp, *args)


def _on_host():
    return backend.xp() is numpy


# ---------------------------------------------------------------------------- im2col / col2im


@primitive
def patches_cnhw(x, kh, kw, pad=0):
    """The stride-1 patch matrix of x (C, N, H, W): row (i, j, c), column (n, y, x) holds
    x_padded[c, n, y + i, x + j].  Linear in x; its adjoint is :func:`patches_cnhw_adjoint`."""
    if not _on_host():
        return _launch("patches", x, kh, kw, pad)
    c, n, h, w = x.shape
    ho, wo = _out_size(h, w, kh, kw, pad)
    if pad:
        x = numpy.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = numpy.empty((kh, kw, c, n, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            out[i, j] = x[:, :, i: i + ho, j: j + wo]
    return out.reshape(kh * kw * c, n * ho * wo)


@primitive
def patches_cnhw_adjoint(cols, x_shape, kh, kw, pad=0):
    """Add the rows of a patch matrix back into an array of shape ``x_shape`` (C, N, H, W)."""
    if not _on_host():
        return _launch("patches_adjoint", cols, tuple(x_shape), kh, kw, pad)
    c, n, h, w = x_shape
    ho, wo = _out_size(h, w, kh, kw, pad)
    cols = cols.reshape(kh, kw, c, n, ho, wo)
    out = numpy.zeros((c, n, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i: i + ho, j: j + wo] += cols[i, j]
    return out[:, :, pad: pad + h, pad: pad + w] if pad else out


defvjp(patches_cnhw, lambda ans, x, kh, kw, pad=0: lambda g: patches_cnhw_adjoint(g, x.shape, kh, kw, pad))
defvjp(patches_cnhw_adjoint, lambda ans, cols, x_shape, kh, kw, pad=0: lambda g: patches_cnhw(g, kh, kw, pad))


def _emulate_patches(x, kh, kw, pad):
    """One thread per element of P: read x at (c, n, y + i − p, x + j − p), or 0 outside."""
    c, n, h, w = x.shape
    ho, wo = _out_size(h, w, kh, kw, pad)
    i, j, cc, nn, y, xx = numpy.ogrid[:kh, :kw, :c, :n, :ho, :wo]
    ys, xs = y + i - pad, xx + j - pad
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out = numpy.where(inside, x[cc, nn, ys.clip(0, h - 1), xs.clip(0, w - 1)], 0).astype(x.dtype)
    return out.reshape(kh * kw * c, n * ho * wo)


def _emulate_patches_adjoint(cols, x_shape, kh, kw, pad):
    """One thread per pixel of x: gather, in the order i then j, the entries of P that read it."""
    c, n, h, w = x_shape
    ho, wo = _out_size(h, w, kh, kw, pad)
    cols = cols.reshape(kh, kw, c, n, ho, wo)
    cc, nn, y, xx = numpy.ogrid[:c, :n, :h, :w]
    acc = numpy.zeros(x_shape, dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            ys, xs = y + pad - i, xx + pad - j
            inside = (ys >= 0) & (ys < ho) & (xs >= 0) & (xs < wo)
            acc = acc + numpy.where(inside, cols[i, j][cc, nn, ys.clip(0, ho - 1), xs.clip(0, wo - 1)], 0)
    return acc


# ---------------------------------------------------------------------------- max-pool 2×2
# The routing of a window — which entries are its maxima (``hit``) and what each receives
# (``scale`` = [max > 0] / number of maxima) — is a constant, so unpool and pool_tangent are
# linear maps, adjoint to each other, and autograd differentiates through them to any order.


def pool_relu(z, z_shape):
    """relu(max-pool 2×2 (z)) for z (O, N·Ho·Wo) laid out as ``z_shape`` (O, N, Ho, Wo) (odd
    trailing rows / columns dropped), and the routing its derivatives need."""
    value, route = _pool(getval(z), z_shape)
    return _pooled(z, value, route, z_shape), route


def _pool(z, z_shape):
    """(relu(max), (hit, scale)) — one kernel on a device."""
    if not _on_host():
        return _launch("pool", z, z_shape)
    windows = _windows(z, z_shape)
    pooled = numpy.maximum(numpy.maximum(windows[:, :, 0, :, 0], windows[:, :, 0, :, 1]),
                           numpy.maximum(windows[:, :, 1, :, 0], windows[:, :, 1, :, 1]))
    hit = windows == pooled[:, :, None, :, None]
    count = (hit[:, :, 0, :, 0].astype(pooled.dtype) + hit[:, :, 0, :, 1]
             + hit[:, :, 1, :, 0] + hit[:, :, 1, :, 1])
    mask = (pooled > 0).astype(pooled.dtype)
    o, n, ho, wo = z_shape
    return numpy.reshape(pooled * mask, (o, n, ho // 2, wo // 2)), (hit, mask / count)


def _windows(z, z_shape):
    """(O·N, Ho/2, 2, Wo/2, 2): the 2×2 windows of z (O, N·Ho·Wo)."""
    o, n, ho, wo = z_shape
    z = numpy.reshape(z, z_shape)
    if ho % 2 or wo % 2:
        z = z[:, :, : ho // 2 * 2, : wo // 2 * 2]
    return numpy.reshape(z, (o * n, ho // 2, 2, wo // 2, 2))


@primitive
def _pooled(z, value, route, z_shape):
    """``value`` = relu(max-pool(z)), already computed, as a function of z (its VJP unpools)."""
    return value


@primitive
def unpool(g, route, z_shape):
    """∂ℓ/∂z (O, N·Ho·Wo) from ∂ℓ/∂out (O, N, Ho/2, Wo/2): each window's gradient goes to its
    maxima, split evenly between ties, through the relu; cropped rows get none."""
    if not _on_host():
        return _launch("unpool", g, route, z_shape)
    hit, scale = route
    o, n, ho, wo = z_shape
    g = numpy.reshape(numpy.reshape(g, scale.shape) * scale, (o * n, ho // 2, 1, wo // 2, 1)) * hit
    g = numpy.reshape(g, (o, n, ho // 2 * 2, wo // 2 * 2))
    if ho % 2 or wo % 2:
        g = numpy.pad(g, ((0, 0), (0, 0), (0, ho % 2), (0, wo % 2)))
    return numpy.reshape(g, (o, n * ho * wo))


@primitive
def pool_tangent(z_dot, route, z_shape):
    """The derivative of :func:`pool_relu` along ż (O, N·Ho·Wo): Σ over each window of
    ż · hit, times scale — (O, N, Ho/2, Wo/2).  The adjoint of :func:`unpool`."""
    if not _on_host():
        return _launch("pool_tangent", z_dot, route, z_shape)
    hit, scale = route
    o, n, ho, wo = z_shape
    return numpy.reshape(numpy.sum(_windows(z_dot, z_shape) * hit, axis=(2, 4)) * scale,
                         (o, n, ho // 2, wo // 2))


defvjp(_pooled, lambda ans, z, value, route, z_shape: lambda g: unpool(g, route, z_shape))
defvjp(unpool, lambda ans, g, route, z_shape: lambda v: pool_tangent(v, route, z_shape))
defvjp(pool_tangent, lambda ans, z_dot, route, z_shape: lambda v: unpool(v, route, z_shape))


def _corners(a, z_shape):
    """The four (O·N, Ho/2, Wo/2) corner views of a (O, N·Ho·Wo) array: (0,0), (0,1), (1,0), (1,1)."""
    o, n, ho, wo = z_shape
    a = numpy.reshape(a, (o * n, ho, wo))
    return [a[:, di: ho // 2 * 2: 2, dj: wo // 2 * 2: 2] for di in (0, 1) for dj in (0, 1)]


def _emulate_pool(z, z_shape):
    """One thread per window: its maximum, which corners reach it, and [max > 0] / their count.
    ``hit`` is laid out like z (1 at a window's maxima, 0 elsewhere and in cropped rows)."""
    o, n, ho, wo = z_shape
    a, b, c, d = _corners(z, z_shape)
    top = numpy.maximum(numpy.maximum(a, b), numpy.maximum(c, d))
    hits = [(corner == top).astype(z.dtype) for corner in (a, b, c, d)]
    hit = numpy.zeros((o * n, ho, wo), dtype=z.dtype)
    for corner, h in zip(_corners(hit, z_shape), hits):
        corner[...] = h
    relu = (top > 0).astype(z.dtype)
    scale = relu / (hits[0] + hits[1] + hits[2] + hits[3])
    shape = (o, n, ho // 2, wo // 2)
    return (top * relu).reshape(shape), (hit.reshape(o, n * ho * wo), scale.reshape(shape))


def _emulate_unpool(g, route, z_shape):
    """One thread per entry of z: hit · g · scale of its window (0 in cropped rows)."""
    hit, scale = route
    o, n, ho, wo = z_shape
    y, x = numpy.ogrid[:ho, :wo]
    p, q = (y // 2).clip(0, ho // 2 - 1), (x // 2).clip(0, wo // 2 - 1)
    share = numpy.reshape(g, (o * n, ho // 2, wo // 2)) * numpy.reshape(scale, (o * n, ho // 2, wo // 2))
    return (numpy.reshape(hit, (o * n, ho, wo)) * share[:, p, q]).reshape(o, n * ho * wo)


def _emulate_pool_tangent(z_dot, route, z_shape):
    """One thread per window: (ż₀₀ h₀₀ + ż₀₁ h₀₁ + ż₁₀ h₁₀ + ż₁₁ h₁₁) · scale."""
    hit, scale = route
    o, n, ho, wo = z_shape
    zs, hs = _corners(z_dot, z_shape), _corners(hit, z_shape)
    total = zs[0] * hs[0] + zs[1] * hs[1] + zs[2] * hs[2] + zs[3] * hs[3]
    return total.reshape(o, n, ho // 2, wo // 2) * scale


_EMULATED = {"patches": _emulate_patches, "patches_adjoint": _emulate_patches_adjoint,
             "pool": _emulate_pool, "unpool": _emulate_unpool, "pool_tangent": _emulate_pool_tangent}


# ---------------------------------------------------------------------------- CuPy kernels
# The same index arithmetic as the emulations above, one CUDA thread per output element.

_SOURCES = {
    "patches": (
        "raw T x, int32 c, int32 n, int32 h, int32 w, int32 ho, int32 wo, int32 kw, int32 pad", "T col",
        """
        int ox = i % wo; int r = i / wo;
        int oy = r % ho; r /= ho;
        int b = r % n; r /= n;
        int ch = r % c; r /= c;
        int dj = r % kw; int di = r / kw;
        int y = oy + di - pad, xx = ox + dj - pad;
        col = (y >= 0 && y < h && xx >= 0 && xx < w) ? x[((ch * n + b) * h + y) * w + xx] : (T)0;
        """),
    "patches_adjoint": (
        "raw T col, int32 c, int32 n, int32 h, int32 w, int32 ho, int32 wo, int32 kh, int32 kw, int32 pad",
        "T img",
        """
        int xx = i % w; int r = i / w;
        int y = r % h; r /= h;
        int b = r % n; int ch = r / n;
        T acc = 0;
        for (int di = 0; di < kh; ++di) {
            int oy = y + pad - di;
            if (oy < 0 || oy >= ho) continue;
            for (int dj = 0; dj < kw; ++dj) {
                int ox = xx + pad - dj;
                if (ox < 0 || ox >= wo) continue;
                acc += col[((((di * kw + dj) * c + ch) * n + b) * ho + oy) * wo + ox];
            }
        }
        img = acc;
        """),
    "pool": (
        "raw T z, int32 ho, int32 wo, int32 hp, int32 wp", "T out, T scale, raw T hit",
        """
        int q = i % wp; int r = i / wp; int p = r % hp; int m = r / hp;
        long long k = ((long long)m * ho + 2 * p) * wo + 2 * q;
        T a = z[k], b = z[k + 1], c = z[k + wo], d = z[k + wo + 1];
        T ab = a > b || a != a ? a : b, cd = c > d || c != c ? c : d;
        T top = ab > cd || ab != ab ? ab : cd;
        T ha = a == top, hb = b == top, hc = c == top, hd = d == top;
        hit[k] = ha; hit[k + 1] = hb; hit[k + wo] = hc; hit[k + wo + 1] = hd;
        T relu = top > 0 ? (T)1 : (T)0;
        out = top * relu;
        scale = relu / (ha + hb + hc + hd);
        """),
    "unpool": (
        "T hit, raw T g, raw T scale, int32 ho, int32 wo, int32 hp, int32 wp", "T gz",
        """
        int x = i % wo; int r = i / wo; int y = r % ho; int m = r / ho;
        int p = min(y / 2, hp - 1), q = min(x / 2, wp - 1);
        long long k = ((long long)m * hp + p) * wp + q;
        gz = hit * (g[k] * scale[k]);
        """),
    "pool_tangent": (
        "raw T zd, raw T hit, T scale, int32 ho, int32 wo, int32 hp, int32 wp", "T pd",
        """
        int q = i % wp; int r = i / wp; int p = r % hp; int m = r / hp;
        long long k = ((long long)m * ho + 2 * p) * wo + 2 * q;
        pd = (zd[k] * hit[k] + zd[k + 1] * hit[k + 1] + zd[k + wo] * hit[k + wo]
              + zd[k + wo + 1] * hit[k + wo + 1]) * scale;
        """),
}
_COMPILED: dict = {}


def _kernel(cp, name):
    if name not in _COMPILED:
        in_params, out_params, body = _SOURCES[name]
        _COMPILED[name] = cp.ElementwiseKernel(in_params, out_params, body, f"ddref_{name}")
    return _COMPILED[name]


def _cupy_patches(cp, x, kh, kw, pad):
    c, n, h, w = x.shape
    ho, wo = _out_size(h, w, kh, kw, pad)
    out = cp.empty((kh * kw * c, n * ho * wo), dtype=x.dtype)
    return _kernel(cp, "patches")(cp.ascontiguousarray(x), c, n, h, w, ho, wo, kw, pad, out)


def _cupy_patches_adjoint(cp, cols, x_shape, kh, kw, pad):
    c, n, h, w = x_shape
    ho, wo = _out_size(h, w, kh, kw, pad)
    out = cp.empty(x_shape, dtype=cols.dtype)
    return _kernel(cp, "patches_adjoint")(cp.ascontiguousarray(cols), c, n, h, w, ho, wo, kh, kw, pad, out)


def _cupy_pool(cp, z, z_shape):
    o, n, ho, wo = z_shape
    shape = (o, n, ho // 2, wo // 2)
    out, scale = cp.empty(shape, dtype=z.dtype), cp.empty(shape, dtype=z.dtype)
    hit = (cp.zeros if ho % 2 or wo % 2 else cp.empty)((o, n * ho * wo), dtype=z.dtype)
    _kernel(cp, "pool")(cp.ascontiguousarray(z), ho, wo, ho // 2, wo // 2, out, scale, hit)
    return out, (hit, scale)


def _cupy_unpool(cp, g, route, z_shape):
    hit, scale = route
    o, n, ho, wo = z_shape
    out = cp.empty((o, n * ho * wo), dtype=hit.dtype)
    return _kernel(cp, "unpool")(hit, cp.ascontiguousarray(g), scale, ho, wo, ho // 2, wo // 2, out)


def _cupy_pool_tangent(cp, z_dot, route, z_shape):
    hit, scale = route
    o, n, ho, wo = z_shape
    out = cp.empty((o, n, ho // 2, wo // 2), dtype=hit.dtype)
    return _kernel(cp, "pool_tangent")(cp.ascontiguousarray(z_dot), hit, scale, ho, wo, ho // 2, wo // 2, out)


_CUPY = {"patches": _cupy_patches, "patches_adjoint": _cupy_patches_adjoint, "pool": _cupy_pool,
         "unpool": _cupy_unpool, "pool_tangent": _cupy_pool_tangent}
