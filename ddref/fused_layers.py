"""The layers of the fast path (:mod:`ddref.fused`): each layer's forward pass and its
derivatives written out by hand, for parameters θ and a direction θ̇ in parameter space
(Pearlmutter's R-operator):

    forward(θ, h)                      -> (out, cache)
    tangent(θ, θ̇, cache, ḣ)            -> (ouṫ, tcache)          ḣ None: the input does not move
    backward(θ, cache, g, need)        -> (g_h, {name: ∂ℓ/∂param})
    backward_tangent(θ, θ̇, cache, tcache, g, ġ, need) -> (g_h, ġ_h, grads, ġrads)

=================  ===========================================================
``Flatten``        (N, …) → (N, features)
``Dense``          h w + b, optionally followed by relu
``ToCHWN``         images to channel-first, batch-last (C, H, W, N), the convolutions' layout
``ConvReluPool``   conv (patch matrix + one matrix product) → relu → 2×2 max-pool
``FlattenCHWN``    (C, H, W, N) activations → (N, features) in ``nn.flatten``'s NHWC order
=================  ===========================================================

The models of :mod:`ddref.nn` describe themselves as lists of these layers; the module sits
below both ``nn`` and ``fused`` (it imports neither).  Every operation is a differentiable
primitive (``matmul``, the kernels of :mod:`ddref.kernels`, constant relu masks and pool
routings), so tracing a pass again — a third derivative — is still exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import autograd.numpy as anp
from autograd.extend import defvjp, primitive
from autograd.tracer import getval

from ddref import kernels
from ddref.kernels import patches_chwn, patches_chwn_adjoint, pool_relu, pool_tangent, unpool


@primitive
def matmul(a, b):
    """a @ b for 2-D arrays, with matrix-product VJPs g @ bᵀ and aᵀ @ g (the same primitive
    as ``matmul``; transposes are views, so every product goes straight to BLAS)."""
    return a @ b


defvjp(matmul,
       lambda ans, a, b: lambda g: matmul(g, anp.transpose(b)),
       lambda ans, a, b: lambda g: matmul(anp.transpose(a), g))


class Flatten:
    params = ()

    # images (…, C, H, W) → (…, C·H·W): a leading axis of stacked networks stays

    def forward(self, params, h):
        return anp.reshape(h, (*h.shape[:-3], -1)), h.shape

    def tangent(self, params, dparams, shape, h_dot):
        return (None if h_dot is None else anp.reshape(h_dot, (*h_dot.shape[:-3], -1))), None

    def backward(self, params, shape, g, need_input_grad):
        return (_unflatten(g, shape) if need_input_grad else None), {}

    def backward_tangent(self, params, dparams, shape, tcache, g, g_dot, need_input_grad):
        return _unflatten(g, shape), _unflatten(g_dot, shape), {}, {}

    def __repr__(self):
        return "Flatten()"


def _unflatten(g, shape):
    return anp.reshape(g, (*g.shape[:-1], *shape[-3:]))


def _relu_mask(z):
    """[z > 0] as a constant of z's dtype (the derivative of relu; piecewise constant)."""
    z = getval(z)
    return (z > 0).astype(z.dtype)


def _t(a):
    """The matrix transpose (of the last two axes; a view)."""
    return anp.swapaxes(a, -1, -2)


def _row(b):
    """A bias (out,) — or (K, out) for K stacked networks — broadcast over the rows of z."""
    return b if len(b.shape) == 1 else anp.expand_dims(b, -2)


@dataclass(frozen=True)
class Dense:
    """z = h w + b, then relu when ``relu``; w (in, out), b (out,)."""

    w: str
    b: str
    relu: bool = False

    @property
    def params(self):
        return (self.w, self.b)

    def forward(self, params, h):
        mm, b = matmul(h, params[self.w]), _row(params[self.b])
        if self.relu and kernels.fusable(mm, b):                  # one kernel on a device
            out, mask = kernels.bias_relu(mm, b)
            return out, (h, mask)
        z = mm + b
        if not self.relu:
            return z, (h, None)
        mask = _relu_mask(z)
        return z * mask, (h, mask)

    def tangent(self, params, dparams, cache, h_dot):
        h, mask = cache
        mm, db = matmul(h, dparams[self.w]), _row(dparams[self.b])
        mm_in = None if h_dot is None else matmul(h_dot, params[self.w])
        if mask is not None and kernels.fusable(mm, db, mm_in):   # one kernel on a device
            return kernels.add_mask(mm, db, mask, mm_in), h_dot
        z_dot = mm + db
        if mm_in is not None:
            z_dot = z_dot + mm_in
        return (z_dot if mask is None else z_dot * mask), h_dot

    def backward(self, params, cache, g, need_input_grad):
        h, mask = cache
        if mask is not None:
            g = g * mask
        grads = {self.w: matmul(_t(h), g), self.b: anp.sum(g, axis=-2)}
        g_h = matmul(g, _t(params[self.w])) if need_input_grad else None
        return g_h, grads

    def backward_tangent(self, params, dparams, cache, h_dot, g, g_dot, need_input_grad):
        h, mask = cache
        if mask is not None and kernels.fusable(g, g_dot):
            g, g_dot = kernels.mask_both(g, g_dot, mask)
        elif mask is not None:
            g, g_dot = g * mask, g_dot * mask
        g_h, grads = self.backward(params, (h, None), g, need_input_grad)
        dw = matmul(_t(h), g_dot)
        if h_dot is not None:
            dw = dw + matmul(_t(h_dot), g)
        dgrads = {self.w: dw, self.b: anp.sum(g_dot, axis=-2)}
        g_h_dot = None
        if need_input_grad:
            g_h_dot = matmul(g_dot, _t(params[self.w])) + matmul(g, _t(dparams[self.w]))
        return g_h, g_h_dot, grads, dgrads


_TO_CHWN, _FROM_CHWN = (1, 2, 3, 0), (3, 0, 1, 2)


class ToCHWN:
    """(N, C, H, W) images → channel-first, batch-last (C, H, W, N)."""

    params = ()

    def forward(self, params, h):
        return anp.transpose(h, _TO_CHWN), None

    def tangent(self, params, dparams, cache, h_dot):
        return (None if h_dot is None else anp.transpose(h_dot, _TO_CHWN)), None

    def backward(self, params, cache, g, need_input_grad):
        return (anp.transpose(g, _FROM_CHWN) if need_input_grad else None), {}

    def backward_tangent(self, params, dparams, cache, tcache, g, g_dot, need_input_grad):
        return anp.transpose(g, _FROM_CHWN), anp.transpose(g_dot, _FROM_CHWN), {}, {}

    def __repr__(self):
        return "ToCHWN()"


class FlattenCHWN:
    """(C, H, W, N) → (N, H·W·C): the features in the order ``nn.flatten`` gives NHWC arrays."""

    params = ()

    @staticmethod
    def _flat(h):
        h = anp.transpose(h, (3, 1, 2, 0))
        return anp.reshape(h, (h.shape[0], -1))

    @staticmethod
    def _unflat(g, shape):
        c, h, w, n = shape
        return anp.transpose(anp.reshape(g, (n, h, w, c)), (3, 1, 2, 0))

    def forward(self, params, h):
        return self._flat(h), h.shape

    def tangent(self, params, dparams, shape, h_dot):
        return (None if h_dot is None else self._flat(h_dot)), None

    def backward(self, params, shape, g, need_input_grad):
        return (self._unflat(g, shape) if need_input_grad else None), {}

    def backward_tangent(self, params, dparams, shape, tcache, g, g_dot, need_input_grad):
        return self._unflat(g, shape), self._unflat(g_dot, shape), {}, {}

    def __repr__(self):
        return "FlattenCHWN()"


def _conv_matrix(w):
    """w (O, C, kh, kw) as the (O, C·kh·kw) matrix that multiplies :func:`patches_chwn` (a view)."""
    return anp.reshape(w, (w.shape[0], -1))


def _conv_weight(m, shape):
    """The inverse of :func:`_conv_matrix`: (O, C·kh·kw) → (O, C, kh, kw)."""
    return anp.reshape(m, shape)


@dataclass(frozen=True)
class ConvReluPool:
    """max-pool 2×2 (relu (conv(h, w) + b)) on batch-last h (C, H, W, N), w (O, C, kh, kw),
    stride 1: the same numbers as ``nn.max_pool2x2_nhwc(relu(nn.conv2d_nhwc(...)))``.

    Computed as relu(max-pool(conv)), which is the same number (relu is monotone) on a
    quarter of the entries; the derivative routes each window's gradient to its maximum,
    split evenly between ties, exactly as ``nn.max_pool2x2_nhwc`` does.  The patch matrix,
    its adjoint and the pooling are one kernel each on a GPU (:mod:`ddref.kernels`)."""

    w: str
    b: str
    pad: int = 0

    @property
    def params(self):
        return (self.w, self.b)

    def _z_shape(self, h_shape, w_shape):
        (_, h, w, n), (o, _, kh, kw) = h_shape, w_shape
        return o, h + 2 * self.pad - kh + 1, w + 2 * self.pad - kw + 1, n

    def forward(self, params, h):
        w = params[self.w]
        kh, kw = w.shape[2:]
        cols = patches_chwn(h, kh, kw, self.pad)
        z_shape = self._z_shape(h.shape, w.shape)
        mm, b = matmul(_conv_matrix(w), cols), params[self.b]
        if kernels.fusable(mm, b):                                # + b inside the pool kernel
            out, route = kernels.pool_relu(mm, z_shape, bias=b)
        else:
            out, route = pool_relu(mm + anp.reshape(b, (-1, 1)), z_shape)
        return out, (h.shape, cols, z_shape, route)

    def tangent(self, params, dparams, cache, h_dot):
        h_shape, cols, z_shape, route = cache
        w = params[self.w]
        mm, db = matmul(_conv_matrix(dparams[self.w]), cols), dparams[self.b]
        cols_dot = mm_in = None
        if h_dot is not None:
            cols_dot = patches_chwn(h_dot, *w.shape[2:], self.pad)
            mm_in = matmul(_conv_matrix(w), cols_dot)
        if kernels.fusable(mm, db, mm_in):                       # one kernel on a device
            return kernels.pool_tangent_sum(mm, db, mm_in, route, z_shape), cols_dot
        z_dot = mm + anp.reshape(db, (-1, 1))
        if mm_in is not None:
            z_dot = z_dot + mm_in
        return pool_tangent(z_dot, route, z_shape), cols_dot

    @staticmethod
    def _unpool(g, cache):
        """∂ℓ/∂z (O, Ho·Wo·N) from ∂ℓ/∂out: through the relu, then to each window's maxima."""
        _, _, z_shape, route = cache
        return unpool(g, route, z_shape)

    def backward(self, params, cache, g, need_input_grad):
        return self._backward_z(params, cache, self._unpool(g, cache), need_input_grad)

    def _backward_z(self, params, cache, g_z, need_input_grad):
        h_shape, cols, _, _ = cache
        w = params[self.w]
        grads = {self.w: _conv_weight(matmul(g_z, anp.transpose(cols)), w.shape),
                 self.b: anp.sum(g_z, axis=1)}
        g_h = None
        if need_input_grad and kernels.host_conv_input_grad(w, g_z):                   # host
            g_h = kernels.conv_input_grad(w, g_z, h_shape, self.pad)
        elif need_input_grad:
            g_cols = matmul(anp.transpose(_conv_matrix(w)), g_z)
            g_h = patches_chwn_adjoint(g_cols, h_shape, *w.shape[2:], self.pad)
        return g_h, grads

    def _backward_tangent_stacked(self, params, dparams, cache, cols_dot, g_z, g_z_dot, need_input_grad):
        """:meth:`backward_tangent` from (∂ℓ/∂z, its tangent) on the host, untraced, with the
        two cotangents stacked as one (2O, Ho·Wo·N) matrix S = [g_z; ġ_z], so that fewer,
        larger products do the work (the numbers differ only in the order of float sums):

            [∂ℓ/∂W; d(∂ℓ/∂W)] = S Pᵀ  (+ g_z Ṗᵀ in the second half when the input moves)
            [∂ℓ/∂h; d(∂ℓ/∂h)] = the input gradient of S through the block weight [[W, Ẇ], [0, W]]
                                 (O·2 × 2C: ∂ℓ/∂h = Wᵀ g_z, d(∂ℓ/∂h) = Ẇᵀ g_z + Wᵀ ġ_z)."""
        h_shape, cols, _, _ = cache
        w, w_dot = params[self.w], dparams[self.w]
        o, c = w.shape[:2]
        stacked = anp.concatenate([g_z, g_z_dot])
        both = matmul(stacked, anp.transpose(cols))
        dw = both[o:] if cols_dot is None else both[o:] + matmul(g_z, anp.transpose(cols_dot))
        sums = anp.sum(stacked, axis=1)
        grads = {self.w: _conv_weight(both[:o], w.shape), self.b: sums[:o]}
        dgrads = {self.w: _conv_weight(dw, w.shape), self.b: sums[o:]}
        if not need_input_grad:
            return None, None, grads, dgrads
        block = anp.concatenate([anp.concatenate([w, w_dot], axis=1),
                                 anp.concatenate([anp.zeros_like(w), w], axis=1)])
        g_hs = kernels.conv_input_grad(block, stacked, (2 * c, *h_shape[1:]), self.pad)
        return g_hs[:c], g_hs[c:], grads, dgrads

    def backward_tangent(self, params, dparams, cache, cols_dot, g, g_dot, need_input_grad):
        h_shape, cols, _, _ = cache
        w, w_dot = params[self.w], dparams[self.w]
        if kernels.fusable(g, g_dot):                             # both in one kernel on a device
            g_z, g_z_dot = kernels.unpool_pair(g, g_dot, cache[3], cache[2])
        else:
            g_z, g_z_dot = self._unpool(g, cache), self._unpool(g_dot, cache)
        if kernels.host_conv_input_grad(w, w_dot, g_z, g_z_dot):   # host, untraced: stacked
            return self._backward_tangent_stacked(params, dparams, cache, cols_dot, g_z, g_z_dot,
                                                  need_input_grad)
        g_h, grads = self._backward_z(params, cache, g_z, need_input_grad)
        dw = matmul(g_z_dot, anp.transpose(cols))
        if cols_dot is not None:
            dw = dw + matmul(g_z, anp.transpose(cols_dot))
        dgrads = {self.w: _conv_weight(dw, w.shape), self.b: anp.sum(g_z_dot, axis=1)}
        g_h_dot = None
        if need_input_grad:
            g_cols_dot = (matmul(anp.transpose(_conv_matrix(w)), g_z_dot)
                          + matmul(anp.transpose(_conv_matrix(w_dot)), g_z))
            g_h_dot = patches_chwn_adjoint(g_cols_dot, h_shape, *w.shape[2:], self.pad)
        return g_h, g_h_dot, grads, dgrads


