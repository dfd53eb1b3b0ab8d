"""The convolution's patch matrix and the 2×2 max-pool, each as one device kernel.

Each function here is an autograd primitive with three implementations of the same numbers:

* **numpy** (the numpy backend): the readable reference — slices, loops over the kernel
  offsets, strided views;
* **CuPy**: one ``cupy.ElementwiseKernel`` per call (:mod:`ddref.cuda_kernels`), each thread computing one output
  element by index arithmetic (the design of Chainer's ``chainer/utils/conv.py``:
  im2col as a per-element copy, col2im as a per-element *gather* over the kernel offsets
  that reach the pixel, so no thread writes where another does and no atomics are needed);
* **emulated** (the strict fake device of the tests, ``xp.emulate_kernel``): the kernel's
  index arithmetic written in vectorised numpy, counted as one device operation.

tests/test_fused.py checks that the emulated kernels and the numpy path agree to 1e-10 in
float64, values and derivatives.

Shapes: channel-first, batch-last (C, H, W, N), as :mod:`ddref.fused_layers` uses them.  The
batch is the innermost axis, so every slice these functions take (a kernel offset's window,
a pooling corner) reads and writes contiguous runs of Wo·N or N numbers — long runs for the
real batch of the outer loss, where the time goes — and, on a device, neighbouring threads
touch neighbouring addresses:

=========================  =====================================================
``patches_chwn``           x (C, H, W, N) → P (C·kh·kw, Ho·Wo·N),
                           P[(c, i, j), (y, x, n)] = x_pad[c, y + i, x + j, n]
``patches_chwn_adjoint``   P → x (C, H, W, N):  x[c, y, x, n] = Σ_{i,j} P[(c, i, j), (y+p−i, x+p−j, n)]
``conv_input_grad``        host only, untraced: patches_chwn_adjoint(W_matᵀ g_z) without the
                           patch-gradient matrix (offset by offset, or over "wide" rows)
``pool_relu``              z (O, Ho·Wo·N) → relu(max over each 2×2 window) (O, Ho/2, Wo/2, N)
``unpool``                 its derivative: each window's gradient to its maxima (ties split)
``pool_tangent``           the adjoint of ``unpool``: Σ over the window of ż · route
=========================  =====================================================
"""

from __future__ import annotations

import numpy

from autograd.extend import defvjp, primitive
from autograd.tracer import getval

from ddref import backend, cuda_kernels


def _out_size(h, w, kh, kw, pad):
    return h + 2 * pad - kh + 1, w + 2 * pad - kw + 1


def _launch(name, *args):
    """Run kernel ``name`` on the selected device: emulated on the fake device, compiled on CuPy."""
    xp = backend.xp()
    emulate = getattr(xp, "emulate_kernel", None)
    if emulate is not None:
        return emulate(_EMULATED[name], *args)
    return cuda_kernels.LAUNCHERS[name](xp, *args)


def _on_host():
    return backend.xp() is numpy


# ---------------------------------------------------------------------------- im2col / col2im


@primitive
def patches_chwn(x, kh, kw, pad=0):
    """The stride-1 patch matrix of x (C, H, W, N): row (c, i, j), column (y, x, n) holds
    x_padded[c, y + i, x + j, n] — rows in the order of a conv weight's (C, kh, kw) axes, so
    the weight (O, C, kh, kw) multiplies it as its (O, C·kh·kw) reshape, a view.  Linear in x;
    its adjoint is :func:`patches_chwn_adjoint`."""
    if not _on_host():
        return _launch("patches", x, kh, kw, pad)
    c, h, w, n = x.shape
    ho, wo = _out_size(h, w, kh, kw, pad)
    if pad:
        x = numpy.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = numpy.empty((c, kh, kw, ho, wo, n), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, i, j] = x[:, i: i + ho, j: j + wo]
    return out.reshape(c * kh * kw, ho * wo * n)


@primitive
def patches_chwn_adjoint(cols, x_shape, kh, kw, pad=0):
    """Add the rows of a patch matrix back into an array of shape ``x_shape`` (C, H, W, N)."""
    if not _on_host():
        return _launch("patches_adjoint", cols, tuple(x_shape), kh, kw, pad)
    c, h, w, n = x_shape
    ho, wo = _out_size(h, w, kh, kw, pad)
    cols = cols.reshape(c, kh, kw, ho, wo, n)
    out = numpy.zeros((c, h + 2 * pad, w + 2 * pad, n), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, i: i + ho, j: j + wo] += cols[:, i, j]
    return out[:, pad: pad + h, pad: pad + w] if pad else out


# From this many columns Ho·Wo·N of the patch matrix on, :func:`conv_input_grad` goes one
# kernel offset at a time; below it, one GEMM over "wide" rows.  (LeNet's conv2 has 12,800
# columns in a slice of 128 real images, offset by offset 3–6% faster; an inner step of 10
# images has 1,000 for conv2, 7,840 for conv1, and the wide rows win there.)
_WIDE_COLUMNS = 8192


def host_conv_input_grad(*values):
    """True when :func:`conv_input_grad` should be used: the numpy backend, no autograd tracing."""
    return _on_host() and all(getval(v) is v for v in values)


def conv_input_grad(w, g_z, x_shape, pad=0):
    """∂ℓ/∂x (C, H, W, N) of a stride-1 convolution from ∂ℓ/∂z (O, Ho·Wo·N) and its weight w
    (O, C, kh, kw), on the host, untraced (see :func:`host_conv_input_grad`):

        x[c, y, x, n] = Σ_{i,j} Σ_o w[o, c, i, j] g_z[o, (y+p−i, x+p−j, n)],

    the same number as ``patches_chwn_adjoint(W_matᵀ g_z, …)`` up to the order of the float
    sums (a sum of two such terms is one call with w and g_z stacked along O).  numpy's cost
    here is its inner loops (one run of Wo·N entries per add), so:

    * a large batch (≥ ``_WIDE_COLUMNS`` columns) is accumulated one kernel offset (i, j) at
      a time — a (C, O)·(O, Ho·Wo·N) product added straight into its shifted window — and the
      (C·kh·kw, Ho·Wo·N) patch gradient, which would not fit in cache, is never materialised;
    * a small batch pads each row of g_z with zeros to the padded input's row length Wp, so
      that the patch gradient Wᵀ g_z comes out "wide": offset (i, j) is then one contiguous
      run of ((Ho − 1)·Wp + Wo)·N entries per channel, added at (i·Wp + j)·N of the flat
      padded channel (the padding columns carry exact zeros)."""
    o, c, kh, kw = w.shape
    h, wd, n = x_shape[1:]
    hp, wp = h + 2 * pad, wd + 2 * pad
    ho, wo = _out_size(h, wd, kh, kw, pad)
    dtype = numpy.result_type(w, g_z)
    if g_z.shape[1] >= _WIDE_COLUMNS:
        out = numpy.zeros((c, hp, wp, n), dtype=dtype)
        term = numpy.empty((c, ho * wo * n), dtype=dtype)
        window = term.reshape(c, ho, wo, n)
        taps = numpy.transpose(w, (2, 3, 1, 0))                          # (kh, kw, C, O) view
        for i in range(kh):
            for j in range(kw):
                numpy.matmul(taps[i, j], g_z, out=term)
                out[:, i: i + ho, j: j + wo] += window
    else:
        g_wide = numpy.zeros((o, ho, wp, n), dtype=g_z.dtype)
        g_wide[:, :, :wo] = numpy.reshape(g_z, (o, ho, wo, n))
        cols = numpy.reshape(numpy.reshape(w, (o, -1)).T @ numpy.reshape(g_wide, (o, -1)),
                             (c, kh, kw, ho * wp * n))
        run = ((ho - 1) * wp + wo) * n                                    # first to last entry
        flat = numpy.zeros((c, hp * wp * n), dtype=dtype)
        for i in range(kh):
            for j in range(kw):
                start = (i * wp + j) * n
                flat[:, start: start + run] += cols[:, i, j, :run]
        out = numpy.reshape(flat, (c, hp, wp, n))
    return out[:, pad: pad + h, pad: pad + wd] if pad else out


defvjp(patches_chwn, lambda ans, x, kh, kw, pad=0: lambda g: patches_chwn_adjoint(g, x.shape, kh, kw, pad))
defvjp(patches_chwn_adjoint, lambda ans, cols, x_shape, kh, kw, pad=0: lambda g: patches_chwn(g, kh, kw, pad))


def _emulate_patches(x, kh, kw, pad):
    """One thread per element of P: read x at (c, y + i − p, x + j − p, n), or 0 outside."""
    c, h, w, n = x.shape
    ho, wo = _out_size(h, w, kh, kw, pad)
    cc, i, j, y, xx, nn = numpy.ogrid[:c, :kh, :kw, :ho, :wo, :n]
    ys, xs = y + i - pad, xx + j - pad
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out = numpy.where(inside, x[cc, ys.clip(0, h - 1), xs.clip(0, w - 1), nn], 0).astype(x.dtype)
    return out.reshape(c * kh * kw, ho * wo * n)


def _emulate_patches_adjoint(cols, x_shape, kh, kw, pad):
    """One thread per pixel of x: gather, in the order i then j, the entries of P that read it."""
    c, h, w, n = x_shape
    ho, wo = _out_size(h, w, kh, kw, pad)
    cols = cols.reshape(c, kh, kw, ho, wo, n)
    cc, y, xx, nn = numpy.ogrid[:c, :h, :w, :n]
    acc = numpy.zeros(x_shape, dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            ys, xs = y + pad - i, xx + pad - j
            inside = (ys >= 0) & (ys < ho) & (xs >= 0) & (xs < wo)
            acc = acc + numpy.where(inside, cols[:, i, j][cc, ys.clip(0, ho - 1), xs.clip(0, wo - 1), nn], 0)
    return acc


# ---------------------------------------------------------------------------- max-pool 2×2
# The routing of a window — which entries are its maxima (``hit``) and what each receives
# (``scale`` = [max > 0] / number of maxima) — is a constant, so unpool and pool_tangent are
# linear maps, adjoint to each other, and autograd differentiates through them to any order.


def pool_relu(z, z_shape, bias=None):
    """relu(max-pool 2×2 (z)) for z (O, Ho·Wo·N) laid out as ``z_shape`` (O, Ho, Wo, N) (odd
    trailing rows / columns dropped), and the routing its derivatives need.  ``bias`` (O,),
    untraced values only: the pool of z + bias (the kernel adds it on the way)."""
    value, route = _pool(getval(z), z_shape, bias)
    return _pooled(z, value, route, z_shape), route


def _pool(z, z_shape, bias=None):
    """(relu(max), (hit, scale)) — one kernel on a device."""
    if not _on_host():
        bias = backend.xp().zeros((z_shape[0],), dtype=z.dtype) if bias is None else bias
        return _launch("pool", z, bias, z_shape)
    if bias is not None:
        z = z + numpy.reshape(bias, (-1, 1))
    corners = _window_corners(z, z_shape)                        # 4 × (O, Ho/2, Wo/2, N) views
    pooled = numpy.maximum(numpy.maximum(corners[0], corners[1]), numpy.maximum(corners[2], corners[3]))
    hit = numpy.empty((4, *pooled.shape), dtype=bool)                  # which corners are maxima
    for k in range(4):
        numpy.equal(corners[k], pooled, out=hit[k])
    ones = hit.view(numpy.uint8)                                        # count them in bytes
    count = ones[0] + ones[1] + ones[2] + ones[3]
    mask = (pooled > 0).astype(pooled.dtype)
    return pooled * mask, (hit, mask / count)


_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


def _window_corners(z, z_shape):
    """The four corners (0,0), (0,1), (1,0), (1,1) of every 2×2 window of z (O, Ho·Wo·N), as
    (O, Ho/2, Wo/2, N) views (odd trailing rows / columns dropped)."""
    o, ho, wo, n = z_shape
    z = numpy.reshape(z, z_shape)
    return [z[:, di: ho // 2 * 2: 2, dj: wo // 2 * 2: 2] for di, dj in _CORNERS]


@primitive
def _pooled(z, value, route, z_shape):
    """``value`` = relu(max-pool(z)), already computed, as a function of z (its VJP unpools)."""
    return value


@primitive
def unpool(g, route, z_shape):
    """∂ℓ/∂z (O, Ho·Wo·N) from ∂ℓ/∂out (O, Ho/2, Wo/2, N): each window's gradient goes to its
    maxima, split evenly between ties, through the relu; cropped rows get none."""
    if not _on_host():
        return _launch("unpool", g, route, z_shape)
    hit, scale = route
    o, ho, wo, n = z_shape
    share = numpy.reshape(g, scale.shape) * scale                      # each window's gradient
    out = (numpy.zeros if ho % 2 or wo % 2 else numpy.empty)((o, ho * wo * n), dtype=share.dtype)
    for k, corner in enumerate(_window_corners(out, z_shape)):
        numpy.multiply(share, hit[k], out=corner)
    return out


@primitive
def pool_tangent(z_dot, route, z_shape):
    """The derivative of :func:`pool_relu` along ż (O, Ho·Wo·N): Σ over each window of
    ż · hit, times scale — (O, Ho/2, Wo/2, N).  The adjoint of :func:`unpool`."""
    if not _on_host():
        return _launch("pool_tangent", z_dot, route, z_shape)
    hit, scale = route
    c = _window_corners(z_dot, z_shape)
    total = c[0] * hit[0] + c[1] * hit[1] + c[2] * hit[2] + c[3] * hit[3]
    return total * scale


defvjp(_pooled, lambda ans, z, value, route, z_shape: lambda g: unpool(g, route, z_shape))
defvjp(unpool, lambda ans, g, route, z_shape: lambda v: pool_tangent(v, route, z_shape))
defvjp(pool_tangent, lambda ans, z_dot, route, z_shape: lambda v: unpool(v, route, z_shape))


def _emulate_pool(z, bias, z_shape):
    """One thread per window: its maximum, which corners reach it, and [max > 0] / their count.
    ``hit`` is laid out like z (1 at a window's maxima, 0 elsewhere and in cropped rows)."""
    z = z + bias[:, None]
    a, b, c, d = _window_corners(z, z_shape)
    top = numpy.maximum(numpy.maximum(a, b), numpy.maximum(c, d))
    hits = [(corner == top).astype(z.dtype) for corner in (a, b, c, d)]
    hit = numpy.zeros(z.shape, dtype=z.dtype)
    for corner, h in zip(_window_corners(hit, z_shape), hits):
        corner[...] = h
    relu = (top > 0).astype(z.dtype)
    scale = relu / (hits[0] + hits[1] + hits[2] + hits[3])
    return top * relu, (hit, scale)


def pool_tangent_sum(a, bias, c, route, z_shape):
    """:func:`pool_tangent` of ż = a + bias (O,) [+ c], untraced, as one kernel on a device."""
    return _launch("pool_tangent_sum", a, bias, a if c is None else c, c is not None, route, z_shape)


def unpool_pair(g, g_dot, route, z_shape):
    """(unpool(g), unpool(ġ)) as one kernel on a device (untraced)."""
    return _launch("unpool_pair", g, g_dot, route, z_shape)


def _emulate_pool_tangent_sum(a, bias, c, has_c, route, z_shape):
    z_dot = a + bias[:, None]
    return _emulate_pool_tangent(z_dot + c if has_c else z_dot, route, z_shape)


def _emulate_unpool(g, route, z_shape):
    """One thread per entry of z: hit · g · scale of its window (0 in cropped rows)."""
    hit, scale = route
    o, ho, wo, n = z_shape
    y, x = numpy.ogrid[:ho, :wo]
    p, q = (y // 2).clip(0, ho // 2 - 1), (x // 2).clip(0, wo // 2 - 1)
    share = numpy.reshape(g, scale.shape) * scale
    return (numpy.reshape(hit, z_shape) * share[:, p, q]).reshape(o, ho * wo * n)


def _emulate_pool_tangent(z_dot, route, z_shape):
    """One thread per window: (ż₀₀ h₀₀ + ż₀₁ h₀₁ + ż₁₀ h₁₀ + ż₁₁ h₁₁) · scale."""
    hit, scale = route
    zs, hs = _window_corners(z_dot, z_shape), _window_corners(hit, z_shape)
    return (zs[0] * hs[0] + zs[1] * hs[1] + zs[2] * hs[2] + zs[3] * hs[3]) * scale


# ---------------------------------------------------------------------------- element-wise chains
# On a device, a chain of small element-wise operations costs one kernel launch each; these
# run a whole chain as one.  They are used only on a device and only on untraced values
# (``fusable``): the readable composition stays the reference, and the one autograd traces.


def fusable(*values):
    """True when a chain may run as one kernel: a device backend and no autograd tracing."""
    return not _on_host() and all(getval(v) is v for v in values if v is not None)


def bias_relu(mm, b):
    """(relu(mm + b), [mm + b > 0]) for a product mm and a broadcast bias b."""
    return _launch("bias_relu", mm, b)


def add_mask(a, b, mask, c=None):
    """(a + b [+ c]) · mask."""
    return _launch("add_mask", a, b, mask) if c is None else _launch("add3_mask", a, b, c, mask)


def step(p, g, lr):
    """p − lr · g (lr a 0-d array or number)."""
    return _launch("step", p, g, lr)


def mask_both(g, g_dot, mask):
    """(g · mask, ġ · mask)."""
    return _launch("mask_both", g, g_dot, mask)


def softmax_cross_entropy(z, t):
    """Row by row over the last axis (N rows per network): ℓ = −Σ t · log p / N with
    p = softmax(z), ∂ℓ/∂z = (p Σ_k t − t) / N, and the cache (p, Σ_k t, log p)."""
    return _launch("xent", z, t)


def softmax_cross_entropy_tangent(p, mass, z_dot):
    """Along ż: d(∂ℓ/∂z) = p (ż − ⟨p, ż⟩) Σ_k t / N and d(∂ℓ/∂t) = −(ż − ⟨p, ż⟩) / N."""
    return _launch("xent_tangent", p, mass, z_dot)


def _emulate_bias_relu(mm, b):
    z = mm + b
    mask = (z > 0).astype(z.dtype)
    return z * mask, mask


def _emulate_xent(z, t):
    n = z.shape[-2]
    shifted = z - z.max(axis=-1, keepdims=True)
    log_p = shifted - numpy.log(numpy.exp(shifted).sum(axis=-1, keepdims=True))
    p = numpy.exp(log_p)
    mass = t.sum(axis=-1, keepdims=True)
    row_loss = -(t * log_p).sum(axis=-1) / n
    return row_loss.sum(), (p * mass - t) / n, (p, mass, log_p)


def _emulate_xent_tangent(p, mass, z_dot):
    n = z_dot.shape[-2]
    log_p_dot = z_dot - (p * z_dot).sum(axis=-1, keepdims=True)
    return p * log_p_dot * mass / n, -log_p_dot / n


_EMULATED = {"patches": _emulate_patches, "patches_adjoint": _emulate_patches_adjoint,
             "pool": _emulate_pool, "unpool": _emulate_unpool, "pool_tangent": _emulate_pool_tangent,
             "pool_tangent_sum": _emulate_pool_tangent_sum,
             "unpool_pair": lambda g, g_dot, route, z_shape: (_emulate_unpool(g, route, z_shape),
                                                              _emulate_unpool(g_dot, route, z_shape)),
             "bias_relu": _emulate_bias_relu, "step": lambda p, g, lr: p - lr * g,
             "add_mask": lambda a, b, mask: (a + b) * mask,
             "add3_mask": lambda a, b, c, mask: (a + b + c) * mask,
             "mask_both": lambda g, g_dot, mask: (g * mask, g_dot * mask),
             "xent": _emulate_xent, "xent_tangent": _emulate_xent_tangent}
