"""The fast path: the inner gradient ∇θ ℓ written out by hand, beside the plain composition.

The plain path (what a reader should read first) is ``autograd.grad`` of
``loss(model.apply(θ, x), targets)``: autograd records every small operation of the
forward pass and walks the record backwards.  The meta-gradient then differentiates that
gradient again, so each inner step is traced at two levels, dozens of Python-level nodes
per layer.

Here the same gradient is written as ordinary backpropagation, layer by layer, from the
same differentiable primitives (``nn.matmul``, ``nn.im2col`` / ``nn.col2im``, constant
masks).  So:

* evaluating it traces nothing: the forward pass of back-gradient is plain numpy;
* differentiating it — the Hessian-vector products of back-gradient, the naive engine —
  is one level of tracing, and exact to every order, because every piece is built from
  primitives whose derivatives are exact.

A model opts in by describing itself as a sequence of layers (``apply.layers``, set in
:mod:`ddref.nn`); :func:`value_and_grad_for` then returns the hand-written gradient for a
loss it knows (cross-entropy, squared error), and ``None`` otherwise, in which case
:mod:`ddref.unroll` uses the plain path.  ``with fused.plain(): ...`` switches the fast
path off.  tests/test_fused.py checks that both paths agree in value, first and second
derivatives to 1e-10 in float64.

Layers (each ``forward(params, h) -> (out, cache)`` and ``backward(params, cache, g,
need_input_grad) -> (g_h, {name: ∂ℓ/∂param})``):

=================  ===========================================================
``ToNHWC``         channels last, as the models' ``apply`` does
``Flatten``        (N, …) → (N, features)
``Dense``          h w + b, optionally followed by relu
``ConvReluPool``   conv (im2col + one matrix product) → relu → 2×2 max-pool, NHWC
=================  ===========================================================
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import autograd.numpy as anp
from autograd.builtins import dict as traced_dict
from autograd.extend import defvjp_argnums, primitive
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
        n = logits.shape[0]
        log_p = losses.log_softmax(logits)
        p = anp.exp(log_p)
        row_mass = anp.sum(targets, axis=1, keepdims=True)
        return -anp.sum(targets * log_p) / n, (p * row_mass - targets) / n, (p, row_mass)

    @staticmethod
    def tangent(cache, targets, z_dot):
        p, row_mass = cache
        n = z_dot.shape[0]
        log_p_dot = z_dot - anp.sum(p * z_dot, axis=1, keepdims=True)    # d log softmax
        return p * log_p_dot * row_mass / n, -log_p_dot / n


class SquaredError:
    """ℓ = ½ Σ (z − t)² / N,  ∂ℓ/∂z = (z − t) / N,  ∂ℓ/∂t = −(z − t) / N."""

    @staticmethod
    def forward(outputs, targets):
        n = outputs.shape[0]
        residual = outputs - targets
        return 0.5 * anp.sum(residual ** 2) / n, residual / n, None

    @staticmethod
    def tangent(cache, targets, z_dot):
        n = z_dot.shape[0]
        return z_dot / n, -z_dot / n


LOSSES = {losses.cross_entropy: CrossEntropy, losses.squared_error: SquaredError}


# ---------------------------------------------------------------------------- layers
# Each layer, for parameters θ and a direction θ̇ in parameter space (Pearlmutter's R-operator):
#   forward(θ, h)                      -> (out, cache)
#   tangent(θ, θ̇, cache, ḣ)            -> (ouṫ, tcache)          ḣ None: the input does not move
#   backward(θ, cache, g, need)        -> (g_h, {name: ∂ℓ/∂param})
#   backward_tangent(θ, θ̇, cache, tcache, g, ġ, need) -> (g_h, ġ_h, grads, ġrads)


class ToNHWC:
    params = ()

    def forward(self, params, h):
        return nn.to_nhwc(h), None

    def tangent(self, params, dparams, cache, h_dot):
        return (None if h_dot is None else nn.to_nhwc(h_dot)), None

    def backward(self, params, cache, g, need_input_grad):
        return (nn.to_nchw(g) if need_input_grad else None), {}

    def backward_tangent(self, params, dparams, cache, tcache, g, g_dot, need_input_grad):
        return nn.to_nchw(g), nn.to_nchw(g_dot), {}, {}

    def __repr__(self):
        return "ToNHWC()"


class Flatten:
    params = ()

    def forward(self, params, h):
        return nn.flatten(h), h.shape

    def tangent(self, params, dparams, shape, h_dot):
        return (None if h_dot is None else nn.flatten(h_dot)), None

    def backward(self, params, shape, g, need_input_grad):
        return (anp.reshape(g, shape) if need_input_grad else None), {}

    def backward_tangent(self, params, dparams, shape, tcache, g, g_dot, need_input_grad):
        return anp.reshape(g, shape), anp.reshape(g_dot, shape), {}, {}

    def __repr__(self):
        return "Flatten()"


def _relu_mask(z):
    """[z > 0] as a constant of z's dtype (the derivative of relu; piecewise constant)."""
    z = getval(z)
    return (z > 0).astype(z.dtype)


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
        z = nn.matmul(h, params[self.w]) + params[self.b]
        if not self.relu:
            return z, (h, None)
        mask = _relu_mask(z)
        return z * mask, (h, mask)

    def tangent(self, params, dparams, cache, h_dot):
        h, mask = cache
        z_dot = nn.matmul(h, dparams[self.w]) + dparams[self.b]
        if h_dot is not None:
            z_dot = z_dot + nn.matmul(h_dot, params[self.w])
        return (z_dot if mask is None else z_dot * mask), h_dot

    def backward(self, params, cache, g, need_input_grad):
        h, mask = cache
        if mask is not None:
            g = g * mask
        grads = {self.w: nn.matmul(anp.transpose(h), g), self.b: anp.sum(g, axis=0)}
        g_h = nn.matmul(g, anp.transpose(params[self.w])) if need_input_grad else None
        return g_h, grads

    def backward_tangent(self, params, dparams, cache, h_dot, g, g_dot, need_input_grad):
        h, mask = cache
        if mask is not None:
            g, g_dot = g * mask, g_dot * mask
        g_h, grads = self.backward(params, (h, None), g, need_input_grad)
        dw = nn.matmul(anp.transpose(h), g_dot)
        if h_dot is not None:
            dw = dw + nn.matmul(anp.transpose(h_dot), g)
        dgrads = {self.w: dw, self.b: anp.sum(g_dot, axis=0)}
        g_h_dot = None
        if need_input_grad:
            g_h_dot = (nn.matmul(g_dot, anp.transpose(params[self.w]))
                       + nn.matmul(g, anp.transpose(dparams[self.w])))
        return g_h, g_h_dot, grads, dgrads


@dataclass(frozen=True)
class ConvReluPool:
    """max-pool 2×2 (relu (conv(h, w) + b)) on NHWC h, w (O, C, kh, kw), stride 1.

    Computed as relu(max-pool(conv)), which is the same number (relu is monotone) on a
    quarter of the entries; the derivative routes each window's gradient to its maximum,
    split evenly between ties, exactly as ``nn.max_pool2x2_nhwc`` does."""

    w: str
    b: str
    pad: int = 0

    @property
    def params(self):
        return (self.w, self.b)

    def _patches(self, h, w):
        o, c, kh, kw = w.shape
        cols = nn.im2col(h, kh, kw, 1, self.pad)                   # (N, Ho, Wo, C, kh, kw)
        n, ho, wo = cols.shape[:3]
        return anp.reshape(cols, (n * ho * wo, c * kh * kw)), (n, ho, wo, o)

    def _pool(self, z2, z_shape, route=None):
        """2×2 max-pool of the conv output z2 (N·Ho·Wo, O); with ``route``, the linear map
        that the pool's derivative is (for tangents)."""
        n, ho, wo, o = z_shape
        z = anp.reshape(z2, z_shape)
        if ho % 2 or wo % 2:
            z = z[:, : ho // 2 * 2, : wo // 2 * 2, :]
        windows = anp.reshape(z, (n, ho // 2, 2, wo // 2, 2, o))
        if route is not None:
            return anp.sum(windows * route, axis=(2, 4))
        pooled = nn._max_over_windows(windows)
        return pooled, _routing(windows, pooled)

    def _unpool(self, g, cache):
        """∂ℓ/∂z (N·Ho·Wo, O) from ∂ℓ/∂out: through the relu mask, then to each window's maximum."""
        _, _, (n, ho, wo, o), route, mask = cache
        g = anp.reshape(g * mask, (n, ho // 2, 1, wo // 2, 1, o)) * route
        g = anp.reshape(g, (n, ho // 2 * 2, wo // 2 * 2, o))
        if ho % 2 or wo % 2:                                      # cropped rows get no gradient
            g = _pad_back(g, ho, wo)
        return anp.reshape(g, (n * ho * wo, o))

    def forward(self, params, h):
        w = params[self.w]
        cols, z_shape = self._patches(h, w)
        z2 = nn.matmul(cols, anp.transpose(anp.reshape(w, (w.shape[0], -1)))) + params[self.b]
        pooled, route = self._pool(z2, z_shape)
        mask = _relu_mask(pooled)
        return pooled * mask, (h.shape, cols, z_shape, route, mask)

    def tangent(self, params, dparams, cache, h_dot):
        h_shape, cols, z_shape, route, mask = cache
        w, w_dot = params[self.w], dparams[self.w]
        o = w.shape[0]
        z2_dot = nn.matmul(cols, anp.transpose(anp.reshape(w_dot, (o, -1)))) + dparams[self.b]
        cols_dot = None
        if h_dot is not None:
            cols_dot, _ = self._patches(h_dot, w)
            z2_dot = z2_dot + nn.matmul(cols_dot, anp.transpose(anp.reshape(w, (o, -1))))
        return self._pool(z2_dot, z_shape, route) * mask, cols_dot

    def backward(self, params, cache, g, need_input_grad):
        return self._backward_z(params, cache, self._unpool(g, cache), need_input_grad)

    def _backward_z(self, params, cache, g_z, need_input_grad):
        h_shape, cols, (n, ho, wo, o), _, _ = cache
        w = params[self.w]
        grads = {self.w: anp.reshape(nn.matmul(anp.transpose(g_z), cols), w.shape),
                 self.b: anp.sum(g_z, axis=0)}
        g_h = None
        if need_input_grad:
            g_h = self._col2im(nn.matmul(g_z, anp.reshape(w, (o, -1))), h_shape, w.shape, (n, ho, wo))
        return g_h, grads

    def _col2im(self, g_cols, h_shape, w_shape, nhw):
        kh, kw = w_shape[2:]
        return nn.col2im(anp.reshape(g_cols, (*nhw, *w_shape[1:])), h_shape, kh, kw, 1, self.pad)

    def backward_tangent(self, params, dparams, cache, cols_dot, g, g_dot, need_input_grad):
        h_shape, cols, (n, ho, wo, o), _, _ = cache
        w, w_dot = params[self.w], dparams[self.w]
        g_z, g_z_dot = self._unpool(g, cache), self._unpool(g_dot, cache)
        g_h, grads = self._backward_z(params, cache, g_z, need_input_grad)
        dw = nn.matmul(anp.transpose(g_z_dot), cols)
        if cols_dot is not None:
            dw = dw + nn.matmul(anp.transpose(g_z), cols_dot)
        dgrads = {self.w: anp.reshape(dw, w.shape), self.b: anp.sum(g_z_dot, axis=0)}
        g_h_dot = None
        if need_input_grad:
            g_cols_dot = (nn.matmul(g_z_dot, anp.reshape(w, (o, -1)))
                          + nn.matmul(g_z, anp.reshape(w_dot, (o, -1))))
            g_h_dot = self._col2im(g_cols_dot, h_shape, w.shape, (n, ho, wo))
        return g_h, g_h_dot, grads, dgrads


def _routing(windows, pooled):
    """Where each window's gradient goes: 1 at its maximum (1/k for k tied maxima), a constant."""
    windows, pooled = getval(windows), getval(pooled)
    n, h, _, w, _, c = windows.shape
    hit = windows == pooled.reshape(n, h, 1, w, 1, c)
    return (hit / hit.sum(axis=(2, 4), keepdims=True)).astype(windows.dtype)


def _pad_back(g, ho, wo):
    """g (N, ho//2·2, wo//2·2, O) with zero rows / columns appended up to (N, ho, wo, O)."""
    n, h, w, o = g.shape
    if h < ho:
        g = anp.concatenate([g, backend.zeros((n, ho - h, w, o), dtype=g.dtype)], axis=1)
    if w < wo:
        g = anp.concatenate([g, backend.zeros((n, ho, wo - w, o), dtype=g.dtype)], axis=2)
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
    out, caches = _forward(layers, params, x)
    value, g, _ = loss.forward(out, targets)
    first = _first_with_params(layers)
    grads = {}
    for i in range(len(layers) - 1, first - 1, -1):
        g, layer_grads = layers[i].backward(params, caches[i], g, need_input_grad=i > first)
        grads.update(layer_grads)
    return value, traced_dict((k, grads[k]) for k in params)   # a dict autograd can trace


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
    return grads, dgrads, g_dot, targets_dot


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


class FastGradient:
    """The hand-written gradient of one model and loss: ``value_and_grad``, ``grad`` (an
    autograd primitive, so tracing it costs one node) and ``grad_and_vjp`` (the gradient and
    its vector–Jacobian product, for back-gradient's reverse steps)."""

    def __init__(self, layers, loss):
        self.layers, self.loss = layers, loss

    def value_and_grad(self, params, x, targets):
        return network_value_and_grad(self.layers, self.loss, params, x, targets)

    def grad(self, params, x, targets):
        keys = tuple(params)
        values = _grads((self.layers, self.loss, keys), x, targets, *params.values())
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
