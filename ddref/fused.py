"""The fast path: the inner gradient ∇θ ℓ and its derivatives written out by hand, beside
the plain composition.

The plain path (read it first) is ``autograd.grad`` of ``loss(model.apply(θ, x), targets)``:
autograd records every small operation of the forward pass and walks the record back.
The meta-gradient then differentiates that gradient again, so every inner step is traced
at two levels — about 80 autograd nodes per step for the MLP, 200 for LeNet.

Here the same numbers come from three hand-written passes over a model described as layers
(``apply.layers``, set in :mod:`ddref.nn`):

* :func:`network_value_and_grad` — backpropagation: ℓ and g = ∇θ ℓ;
* :func:`network_grad_and_hvp`  — forward-over-reverse (Pearlmutter's R-operator): along a
  parameter direction θ̇, the derivatives of (∇θ ℓ, ∇x ℓ, ∇t ℓ).  Second derivatives are
  symmetric, so these are the vector–Jacobian products of g with respect to θ, the images
  x and the targets t at the cotangent θ̇ — exactly what back-gradient's reverse step needs;
* ``_grads`` — g as *one* autograd primitive whose VJP is the previous pass, so the naive
  engine traces one node per inner step instead of a whole backward pass.

Every pass is built from differentiable primitives (``nn.matmul``, the patch matrices
below and their adjoints, constant relu masks and max-pool routings), so tracing through
them again — a third derivative — is still exact.  :func:`gradient_for` returns the fast
gradient of a model and loss (cross-entropy, squared error) or ``None``, and
:mod:`ddref.unroll` / :mod:`ddref.hypergrad` then use the plain path; ``with fused.plain():``
switches the fast path off.  tests/test_fused.py checks that both paths agree in value,
first and second derivatives to 1e-10 in float64.

Layers: ``forward`` / ``backward`` (backpropagation) and ``tangent`` / ``backward_tangent``
(the same two passes differentiated along θ̇).

=================  ===========================================================
``Flatten``        (N, …) → (N, features)
``Dense``          h w + b, optionally followed by relu
``ToCNHW``         images to channel-major (C, N, H, W), the layout the convolutions use
``ConvReluPool``   conv (patch matrix + one matrix product) → relu → 2×2 max-pool
``FlattenCNHW``    channel-major activations → (N, features) in ``nn.flatten``'s NHWC order
=================  ===========================================================
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import autograd.numpy as anp
from autograd.builtins import dict as traced_dict
from autograd.extend import defvjp, defvjp_argnums, primitive
from autograd.tracer import getval

from ddref import backend, losses, nn

_STATE = {"enabled": True}


@contextlib.contextmanager
def plain():
    """Within the block, every gradient takes the plain autograd path."""
    saved = _STATE["enabled"]
    _STATE["enabled"] = False
    try:
        yield
    finally:
        _STATE["enabled"] = saved


def enabled() -> bool:
    return _STATE["enabled"]


# ---------------------------------------------------------------------------- losses
# forward(z, t) -> (ℓ, ∂ℓ/∂z, cache);  tangent(cache, t, Ż) -> (d(∂ℓ/∂z), d(∂ℓ/∂t)) along Ż.
# The plain compositions are losses.cross_entropy and losses.squared_error.


class CrossEntropy:
    """ℓ = −Σ t · log softmax(z) / N,  ∂ℓ/∂z = (p · Σ_k t − t) / N  with p = softmax(z),
    ∂ℓ/∂t = −log p / N.  (Σ_k t is 1 for one-hot or probability rows; kept so that any
    targets are exact.)"""

    @staticmethod
    def forward(logits, targets):
        n = logits.shape[-2]
        log_p = _log_softmax(logits)
        p = anp.exp(log_p)
        row_mass = anp.sum(targets, axis=-1, keepdims=True)
        return -anp.sum(targets * log_p) / n, (p * row_mass - targets) / n, (p, row_mass, log_p)

    @staticmethod
    def target_grad(cache, grad_z):
        return -cache[2] / grad_z.shape[-2]

    @staticmethod
    def tangent(cache, targets, z_dot):
        p, row_mass, _ = cache
        n = z_dot.shape[-2]
        log_p_dot = z_dot - anp.sum(p * z_dot, axis=-1, keepdims=True)   # d log softmax
        return p * log_p_dot * row_mass / n, -log_p_dot / n


class SquaredError:
    """ℓ = ½ Σ (z − t)² / N,  ∂ℓ/∂z = (z − t) / N,  ∂ℓ/∂t = −(z − t) / N."""

    @staticmethod
    def forward(outputs, targets):
        n = outputs.shape[-2]
        residual = outputs - targets
        return 0.5 * anp.sum(residual ** 2) / n, residual / n, None

    @staticmethod
    def target_grad(cache, grad_z):
        return -grad_z

    @staticmethod
    def tangent(cache, targets, z_dot):
        n = z_dot.shape[-2]
        return z_dot / n, -z_dot / n


LOSSES = {losses.cross_entropy: CrossEntropy, losses.squared_error: SquaredError}


def _log_softmax(logits):
    """``losses.log_softmax`` along the last axis (the same operations for (N, K) logits)."""
    shifted = logits - anp.max(getval(logits), axis=-1, keepdims=True)
    return shifted - anp.log(anp.sum(anp.exp(shifted), axis=-1, keepdims=True))


# ---------------------------------------------------------------------------- layers
# Each layer, for parameters θ and a direction θ̇ in parameter space (Pearlmutter's R-operator):
#   forward(θ, h)                      -> (out, cache)
#   tangent(θ, θ̇, cache, ḣ)            -> (ouṫ, tcache)          ḣ None: the input does not move
#   backward(θ, cache, g, need)        -> (g_h, {name: ∂ℓ/∂param})
#   backward_tangent(θ, θ̇, cache, tcache, g, ġ, need) -> (g_h, ġ_h, grads, ġrads)


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
        z = nn.matmul(h, params[self.w]) + _row(params[self.b])
        if not self.relu:
            return z, (h, None)
        mask = _relu_mask(z)
        return z * mask, (h, mask)

    def tangent(self, params, dparams, cache, h_dot):
        h, mask = cache
        z_dot = nn.matmul(h, dparams[self.w]) + _row(dparams[self.b])
        if h_dot is not None:
            z_dot = z_dot + nn.matmul(h_dot, params[self.w])
        return (z_dot if mask is None else z_dot * mask), h_dot

    def backward(self, params, cache, g, need_input_grad):
        h, mask = cache
        if mask is not None:
            g = g * mask
        grads = {self.w: nn.matmul(_t(h), g), self.b: anp.sum(g, axis=-2)}
        g_h = nn.matmul(g, _t(params[self.w])) if need_input_grad else None
        return g_h, grads

    def backward_tangent(self, params, dparams, cache, h_dot, g, g_dot, need_input_grad):
        h, mask = cache
        if mask is not None:
            g, g_dot = g * mask, g_dot * mask
        g_h, grads = self.backward(params, (h, None), g, need_input_grad)
        dw = nn.matmul(_t(h), g_dot)
        if h_dot is not None:
            dw = dw + nn.matmul(_t(h_dot), g)
        dgrads = {self.w: dw, self.b: anp.sum(g_dot, axis=-2)}
        g_h_dot = None
        if need_input_grad:
            g_h_dot = nn.matmul(g_dot, _t(params[self.w])) + nn.matmul(g, _t(dparams[self.w]))
        return g_h, g_h_dot, grads, dgrads


# Convolutions run channel-major: activations (C, N, H, W) and a patch matrix (kh·kw·C, N·Ho·Wo)
# whose rows are contiguous shifted copies of the input.  Building it is kh·kw block copies,
# its adjoint kh·kw block additions, and the convolution one wide matrix product
# (O, kh·kw·C) @ (kh·kw·C, N·Ho·Wo) whose result is again channel-major.  (The plain
# ``nn.conv2d_nhwc`` builds (N·Ho·Wo, C·kh·kw) patches, whose copy and adjoint are strided.)


@primitive
def patches_cnhw(x, kh, kw, pad=0):
    """The stride-1 patch matrix of x (C, N, H, W): row (i, j, c), column (n, y, x) holds
    x_padded[c, n, y + i, x + j].  Linear in x; its adjoint is :func:`patches_cnhw_adjoint`."""
    xp = backend.xp()
    c, n, h, w = x.shape
    ho, wo = h + 2 * pad - kh + 1, w + 2 * pad - kw + 1
    if pad:
        x = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = xp.empty((kh, kw, c, n, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            out[i, j] = x[:, :, i: i + ho, j: j + wo]
    return out.reshape(kh * kw * c, n * ho * wo)


@primitive
def patches_cnhw_adjoint(cols, x_shape, kh, kw, pad=0):
    """Add the rows of a patch matrix back into an array of shape ``x_shape`` (C, N, H, W)."""
    xp = backend.xp()
    c, n, h, w = x_shape
    ho, wo = h + 2 * pad - kh + 1, w + 2 * pad - kw + 1
    cols = cols.reshape(kh, kw, c, n, ho, wo)
    out = xp.zeros((c, n, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i: i + ho, j: j + wo] += cols[i, j]
    return out[:, :, pad: pad + h, pad: pad + w] if pad else out


defvjp(patches_cnhw, lambda ans, x, kh, kw, pad=0: lambda g: patches_cnhw_adjoint(g, x.shape, kh, kw, pad))
defvjp(patches_cnhw_adjoint, lambda ans, cols, x_shape, kh, kw, pad=0: lambda g: patches_cnhw(g, kh, kw, pad))


class ToCNHW:
    """(N, C, H, W) images → channel-major (C, N, H, W)."""

    params = ()

    def forward(self, params, h):
        return anp.transpose(h, (1, 0, 2, 3)), None

    def tangent(self, params, dparams, cache, h_dot):
        return (None if h_dot is None else anp.transpose(h_dot, (1, 0, 2, 3))), None

    def backward(self, params, cache, g, need_input_grad):
        return (anp.transpose(g, (1, 0, 2, 3)) if need_input_grad else None), {}

    def backward_tangent(self, params, dparams, cache, tcache, g, g_dot, need_input_grad):
        return anp.transpose(g, (1, 0, 2, 3)), anp.transpose(g_dot, (1, 0, 2, 3)), {}, {}

    def __repr__(self):
        return "ToCNHW()"


class FlattenCNHW:
    """(C, N, H, W) → (N, H·W·C): the features in the order ``nn.flatten`` gives NHWC arrays."""

    params = ()

    @staticmethod
    def _flat(h):
        return nn.flatten(anp.transpose(h, (1, 2, 3, 0)))

    @staticmethod
    def _unflat(g, shape):
        c, n, h, w = shape
        return anp.transpose(anp.reshape(g, (n, h, w, c)), (3, 0, 1, 2))

    def forward(self, params, h):
        return self._flat(h), h.shape

    def tangent(self, params, dparams, shape, h_dot):
        return (None if h_dot is None else self._flat(h_dot)), None

    def backward(self, params, shape, g, need_input_grad):
        return (self._unflat(g, shape) if need_input_grad else None), {}

    def backward_tangent(self, params, dparams, shape, tcache, g, g_dot, need_input_grad):
        return self._unflat(g, shape), self._unflat(g_dot, shape), {}, {}

    def __repr__(self):
        return "FlattenCNHW()"


def _conv_matrix(w):
    """w (O, C, kh, kw) as the (O, kh·kw·C) matrix that multiplies :func:`patches_cnhw`."""
    return anp.reshape(anp.transpose(w, (0, 2, 3, 1)), (w.shape[0], -1))


def _conv_weight(m, shape):
    """The inverse of :func:`_conv_matrix`: (O, kh·kw·C) → (O, C, kh, kw)."""
    o, c, kh, kw = shape
    return anp.transpose(anp.reshape(m, (o, kh, kw, c)), (0, 3, 1, 2))


@dataclass(frozen=True)
class ConvReluPool:
    """max-pool 2×2 (relu (conv(h, w) + b)) on channel-major h (C, N, H, W), w (O, C, kh, kw),
    stride 1: the same numbers as ``nn.max_pool2x2_nhwc(relu(nn.conv2d_nhwc(...)))``.

    Computed as relu(max-pool(conv)), which is the same number (relu is monotone) on a
    quarter of the entries; the derivative routes each window's gradient to its maximum,
    split evenly between ties, exactly as ``nn.max_pool2x2_nhwc`` does."""

    w: str
    b: str
    pad: int = 0

    @property
    def params(self):
        return (self.w, self.b)

    def _conv(self, w, b, cols):
        return nn.matmul(_conv_matrix(w), cols) + anp.reshape(b, (-1, 1))      # (O, N·Ho·Wo)

    def _z_shape(self, h_shape, w_shape):
        (_, n, h, w), (o, _, kh, kw) = h_shape, w_shape
        return o, n, h + 2 * self.pad - kh + 1, w + 2 * self.pad - kw + 1

    @staticmethod
    def _windows(z, z_shape):
        """(O·N, Ho/2, 2, Wo/2, 2): the 2×2 windows of z (O, N·Ho·Wo)."""
        o, n, ho, wo = z_shape
        z = anp.reshape(z, z_shape)
        if ho % 2 or wo % 2:
            z = z[:, :, : ho // 2 * 2, : wo // 2 * 2]
        return anp.reshape(z, (o * n, ho // 2, 2, wo // 2, 2))

    def _unpool(self, g, cache):
        """∂ℓ/∂z (O, N·Ho·Wo) from ∂ℓ/∂out: through the relu, then to each window's maximum."""
        _, _, (o, n, ho, wo), hit, scale = cache
        g = anp.reshape(anp.reshape(g, scale.shape) * scale, (o * n, ho // 2, 1, wo // 2, 1)) * hit
        g = anp.reshape(g, (o, n, ho // 2 * 2, wo // 2 * 2))
        if ho % 2 or wo % 2:                                      # cropped rows get no gradient
            g = _pad_back(g, ho, wo)
        return anp.reshape(g, (o, n * ho * wo))

    def forward(self, params, h):
        w = params[self.w]
        kh, kw = w.shape[2:]
        cols = patches_cnhw(h, kh, kw, self.pad)
        z_shape = self._z_shape(h.shape, w.shape)
        o, n, ho, wo = z_shape
        windows = self._windows(self._conv(w, params[self.b], cols), z_shape)
        pooled = nn._max_over_windows(windows)                   # (O·N, Ho/2, Wo/2)
        hit, scale = _pool_routing(windows, pooled)
        out = anp.reshape(pooled * _relu_mask(pooled), (o, n, ho // 2, wo // 2))
        return out, (h.shape, cols, z_shape, hit, scale)

    def tangent(self, params, dparams, cache, h_dot):
        h_shape, cols, z_shape, hit, scale = cache
        o, n, ho, wo = z_shape
        w = params[self.w]
        z_dot = self._conv(dparams[self.w], dparams[self.b], cols)
        cols_dot = None
        if h_dot is not None:
            cols_dot = patches_cnhw(h_dot, *w.shape[2:], self.pad)
            z_dot = z_dot + nn.matmul(_conv_matrix(w), cols_dot)
        pooled_dot = anp.sum(self._windows(z_dot, z_shape) * hit, axis=(2, 4)) * scale
        return anp.reshape(pooled_dot, (o, n, ho // 2, wo // 2)), cols_dot

    def backward(self, params, cache, g, need_input_grad):
        return self._backward_z(params, cache, self._unpool(g, cache), need_input_grad)

    def _backward_z(self, params, cache, g_z, need_input_grad):
        h_shape, cols, _, _, _ = cache
        w = params[self.w]
        grads = {self.w: _conv_weight(nn.matmul(g_z, anp.transpose(cols)), w.shape),
                 self.b: anp.sum(g_z, axis=1)}
        g_h = None
        if need_input_grad:
            g_cols = nn.matmul(anp.transpose(_conv_matrix(w)), g_z)
            g_h = patches_cnhw_adjoint(g_cols, h_shape, *w.shape[2:], self.pad)
        return g_h, grads

    def backward_tangent(self, params, dparams, cache, cols_dot, g, g_dot, need_input_grad):
        h_shape, cols, _, _, _ = cache
        w, w_dot = params[self.w], dparams[self.w]
        g_z, g_z_dot = self._unpool(g, cache), self._unpool(g_dot, cache)
        g_h, grads = self._backward_z(params, cache, g_z, need_input_grad)
        dw = nn.matmul(g_z_dot, anp.transpose(cols))
        if cols_dot is not None:
            dw = dw + nn.matmul(g_z, anp.transpose(cols_dot))
        dgrads = {self.w: _conv_weight(dw, w.shape), self.b: anp.sum(g_z_dot, axis=1)}
        g_h_dot = None
        if need_input_grad:
            g_cols_dot = (nn.matmul(anp.transpose(_conv_matrix(w)), g_z_dot)
                          + nn.matmul(anp.transpose(_conv_matrix(w_dot)), g_z))
            g_h_dot = patches_cnhw_adjoint(g_cols_dot, h_shape, *w.shape[2:], self.pad)
        return g_h, g_h_dot, grads, dgrads


def _pool_routing(windows, pooled):
    """The derivative of relu(max-pool) as two constants: ``hit`` marks each window's maxima,
    and ``scale`` = [max > 0] / (number of maxima) splits the gradient evenly between ties —
    ``nn.window_routing`` times the relu mask, without forming their product."""
    windows, pooled = getval(windows), getval(pooled)
    hit = windows == pooled[:, :, None, :, None]
    count = (hit[:, :, 0, :, 0].astype(pooled.dtype) + hit[:, :, 0, :, 1]
             + hit[:, :, 1, :, 0] + hit[:, :, 1, :, 1])
    return hit, _relu_mask(pooled) / count


def _pad_back(g, ho, wo):
    """g (O, N, ho//2·2, wo//2·2) with zero rows / columns appended up to (O, N, ho, wo)."""
    o, n, h, w = g.shape
    if h < ho:
        g = anp.concatenate([g, backend.zeros((o, n, ho - h, w), dtype=g.dtype)], axis=2)
    if w < wo:
        g = anp.concatenate([g, backend.zeros((o, n, ho, wo - w), dtype=g.dtype)], axis=3)
    return g


# ---------------------------------------------------------------------------- the network


def _first_with_params(layers):
    return next(i for i, layer in enumerate(layers) if layer.params)


def _forward(layers, params, x):
    h, caches = x, []
    for layer in layers:
        h, cache = layer.forward(params, h)
        caches.append(cache)
    return h, caches


def network_value_and_grad(layers, loss, params, x, targets):
    """(ℓ(x, θ), ∇θ ℓ) by backpropagation through ``layers``: the forward pass keeps what
    each layer's derivative needs, then the layers are walked in reverse."""
    value, grads, _, _ = _backprop(layers, loss, params, x, targets, wrt_inputs=False)
    return value, traced_dict((k, grads[k]) for k in params)   # a dict autograd can trace


def _backprop(layers, loss, params, x, targets, wrt_inputs):
    """ℓ, ∇θ ℓ, and with ``wrt_inputs`` also ∇x ℓ and ∇t ℓ (else None, None)."""
    out, caches = _forward(layers, params, x)
    value, g, loss_cache = loss.forward(out, targets)
    grad_targets = loss.target_grad(loss_cache, g) if wrt_inputs else None
    last = 0 if wrt_inputs else _first_with_params(layers)
    grads = {}
    for i in range(len(layers) - 1, last - 1, -1):
        g, layer_grads = layers[i].backward(params, caches[i], g, need_input_grad=wrt_inputs or i > last)
        grads.update(layer_grads)
    if not wrt_inputs:
        return value, grads, None, None
    return value, grads, _shared(g, x), _shared(grad_targets, targets)


def _shared(g, like):
    """The gradient of an input shared by K stacked networks: the sum over the leading axis."""
    return anp.sum(g, axis=0) if len(g.shape) > len(like.shape) else g


def network_grad_and_hvp(layers, loss, params, x, targets, dparams):
    """∇θ ℓ and, along the parameter direction θ̇ = ``dparams``, the derivatives of
    (∇θ ℓ, ∇x ℓ, ∇t ℓ):  (Hθθ θ̇, Hxθ θ̇, Htθ θ̇) — forward-over-reverse (Pearlmutter 1994).

    Because second derivatives are symmetric, these are also the vector–Jacobian products of
    the map (θ, x, t) ↦ g = ∇θ ℓ at the cotangent θ̇: (∂g/∂θ)ᵀθ̇, (∂g/∂x)ᵀθ̇, (∂g/∂t)ᵀθ̇, which is
    what back-gradient needs.  Returns (g, Hθθ θ̇, Hxθ θ̇, Htθ θ̇)."""
    out, caches = _forward(layers, params, x)
    first = _first_with_params(layers)
    h_dot, tcaches = None, [None] * len(layers)
    for i in range(first, len(layers)):
        h_dot, tcaches[i] = layers[i].tangent(params, dparams, caches[i], h_dot)
    _, g, loss_cache = loss.forward(out, targets)
    g_dot, targets_dot = loss.tangent(loss_cache, targets, h_dot)
    grads, dgrads = {}, {}
    for i in range(len(layers) - 1, -1, -1):
        g, g_dot, layer_grads, layer_dgrads = layers[i].backward_tangent(
            params, dparams, caches[i], tcaches[i], g, g_dot, need_input_grad=True)
        grads.update(layer_grads)
        dgrads.update(layer_dgrads)
    return grads, dgrads, _shared(g_dot, x), _shared(targets_dot, targets)


@primitive
def _grads(spec, x, targets, *values):
    """∇θ ℓ as a tuple (the parameters in ``spec``'s key order), as one autograd primitive
    whose vector–Jacobian product is the hand-written :func:`network_grad_and_hvp`."""
    layers, loss, keys = spec
    _, grads = network_value_and_grad(layers, loss, dict(zip(keys, values)), x, targets)
    return tuple(grads[k] for k in keys)


def _grads_vjp(argnums, ans, args, kwargs):
    spec, x, targets, *values = args
    layers, loss, keys = spec

    def vjp(cotangent):
        _, hvp, x_part, t_part = network_grad_and_hvp(
            layers, loss, dict(zip(keys, values)), x, targets, dict(zip(keys, cotangent)))
        parts = {1: x_part, 2: t_part}
        return tuple(parts[a] if a in parts else hvp[keys[a - 3]] for a in argnums)

    return vjp


defvjp_argnums(_grads, _grads_vjp)


@primitive
def _loss(spec, x, targets, *values):
    """ℓ(x, θ) as one autograd primitive whose VJP is hand-written backpropagation."""
    layers, loss, keys = spec
    out, _ = _forward(layers, dict(zip(keys, values)), x)
    return loss.forward(out, targets)[0]


def _loss_vjp(argnums, ans, args, kwargs):
    spec, x, targets, *values = args
    layers, loss, keys = spec

    def vjp(g):
        _, grads, x_part, t_part = _backprop(layers, loss, dict(zip(keys, values)), x, targets,
                                             wrt_inputs=bool({1, 2} & set(argnums)))
        parts = {1: x_part, 2: t_part}
        return tuple(g * (parts[a] if a in parts else grads[keys[a - 3]]) for a in argnums)

    return vjp


defvjp_argnums(_loss, _loss_vjp)


@primitive
def _step(spec, x, targets, lr, *values):
    """One gradient-descent step θ − η ∇θ ℓ(x, θ) as one autograd primitive (a tuple in
    ``spec``'s key order), whose VJP is :func:`network_grad_and_hvp` — back-gradient's
    reverse step, so the naive engine traces one node per inner step."""
    layers, loss, keys = spec
    _, grads = network_value_and_grad(layers, loss, dict(zip(keys, values)), x, targets)
    return tuple(v - lr * grads[k] for k, v in zip(keys, values))


def _step_vjp(argnums, ans, args, kwargs):
    spec, x, targets, lr, *values = args
    layers, loss, keys = spec

    def vjp(cotangent):
        v = dict(zip(keys, cotangent))
        grads, hvp, x_part, t_part = network_grad_and_hvp(layers, loss, dict(zip(keys, values)), x,
                                                          targets, v)
        parts = {1: lambda: -lr * x_part, 2: lambda: -lr * t_part,
                 3: lambda: -sum(anp.sum(grads[k] * v[k]) for k in keys)}
        return tuple(parts[a]() if a in parts else v[keys[a - 4]] - lr * hvp[keys[a - 4]]
                     for a in argnums)

    return vjp


defvjp_argnums(_step, _step_vjp)


class FastGradient:
    """The hand-written gradient of one model and loss: ``value_and_grad``, ``grad`` (an
    autograd primitive, so tracing it costs one node) and ``grad_and_vjp`` (the gradient and
    its vector–Jacobian product, for back-gradient's reverse steps).

    ``stackable``: the layers also take K networks at once — every parameter with a leading
    axis K, the images shared (N, C, H, W) or per network (K, N, C, H, W); the loss is then
    the sum of the K networks' losses (dense layers only; used untraced by back-gradient)."""

    def __init__(self, layers, loss):
        self.layers, self.loss = layers, loss
        self.stackable = all(isinstance(layer, (Flatten, Dense)) for layer in layers)

    def value(self, params, x, targets):
        """ℓ(x, θ), one autograd node when traced."""
        keys = tuple(params)
        return _loss((self.layers, self.loss, keys), x, targets, *params.values())

    def value_and_grad(self, params, x, targets):
        return network_value_and_grad(self.layers, self.loss, params, x, targets)

    def grad(self, params, x, targets):
        keys = tuple(params)
        values = _grads((self.layers, self.loss, keys), x, targets, *params.values())
        return traced_dict((k, values[i]) for i, k in enumerate(keys))

    def step(self, params, x, targets, lr):
        """θ − η ∇θ ℓ(x, θ) as a dict, one autograd node when traced."""
        keys = tuple(params)
        values = _step((self.layers, self.loss, keys), x, targets, lr, *params.values())
        return traced_dict((k, values[i]) for i, k in enumerate(keys))

    def grad_and_vjp(self, params, x, targets, v):
        """(g, (∂g/∂θ)ᵀ v, (∂g/∂x)ᵀ v) for g = ∇θ ℓ(x, θ)."""
        grads, hvp, x_part, _ = network_grad_and_hvp(self.layers, self.loss, params, x, targets, v)
        return grads, hvp, x_part


def gradient_for(apply, loss):
    """The :class:`FastGradient` of a model (its ``apply``) and loss that have one, else None
    (then use autograd on the plain composition)."""
    if not _STATE["enabled"]:
        return None
    layers = getattr(apply, "layers", None)
    loss_rule = LOSSES.get(loss)
    if layers is None or loss_rule is None:
        return None
    return FastGradient(layers, loss_rule)
