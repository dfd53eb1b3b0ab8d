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
# Each returns (ℓ(z, t), ∂ℓ/∂z) for outputs z (N, K).  The plain compositions are
# losses.cross_entropy and losses.squared_error.


def cross_entropy_and_logit_grad(logits, targets):
    """ℓ = −Σ t · log softmax(z) / N  and  ∂ℓ/∂z = (softmax(z) · Σ_k t − t) / N.

    (Σ_k t is 1 for one-hot or probability targets; kept so that any targets are exact.)"""
    n = logits.shape[0]
    log_p = losses.log_softmax(logits)
    value = -anp.sum(targets * log_p) / n
    row_mass = anp.sum(targets, axis=1, keepdims=True)
    return value, (anp.exp(log_p) * row_mass - targets) / n


def squared_error_and_output_grad(outputs, targets):
    """ℓ = ½ Σ (z − t)² / N  and  ∂ℓ/∂z = (z − t) / N."""
    n = outputs.shape[0]
    residual = outputs - targets
    return 0.5 * anp.sum(residual ** 2) / n, residual / n


LOSS_GRADIENTS = {
    losses.cross_entropy: cross_entropy_and_logit_grad,
    losses.squared_error: squared_error_and_output_grad,
}


# ---------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class ToNHWC:
    params = ()

    def forward(self, params, h):
        return nn.to_nhwc(h), None

    def backward(self, params, cache, g, need_input_grad):
        return (nn.to_nchw(g) if need_input_grad else None), {}


@dataclass(frozen=True)
class Flatten:
    params = ()

    def forward(self, params, h):
        return nn.flatten(h), h.shape

    def backward(self, params, shape, g, need_input_grad):
        return (anp.reshape(g, shape) if need_input_grad else None), {}


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

    def backward(self, params, cache, g, need_input_grad):
        h, mask = cache
        if mask is not None:
            g = g * mask
        grads = {self.w: nn.matmul(anp.transpose(h), g), self.b: anp.sum(g, axis=0)}
        g_h = nn.matmul(g, anp.transpose(params[self.w])) if need_input_grad else None
        return g_h, grads


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

    def forward(self, params, h):
        w = params[self.w]
        o, c, kh, kw = w.shape
        cols = nn.im2col(h, kh, kw, 1, self.pad)                   # (N, Ho, Wo, C, kh, kw)
        n, ho, wo = cols.shape[:3]
        cols = anp.reshape(cols, (n * ho * wo, c * kh * kw))
        w2 = anp.reshape(w, (o, c * kh * kw))
        z = anp.reshape(nn.matmul(cols, anp.transpose(w2)) + params[self.b], (n, ho, wo, o))
        if ho % 2 or wo % 2:
            z = z[:, : ho // 2 * 2, : wo // 2 * 2, :]
        windows = anp.reshape(z, (n, ho // 2, 2, wo // 2, 2, o))
        pooled = nn._max_over_windows(windows)
        route = _routing(windows, pooled)
        mask = _relu_mask(pooled)
        return pooled * mask, (h.shape, cols, (n, ho, wo, o), route, mask)

    def backward(self, params, cache, g, need_input_grad):
        h_shape, cols, z_shape, route, mask = cache
        n, ho, wo, o = z_shape
        w = params[self.w]
        g = anp.reshape(g * mask, (n, ho // 2, 1, wo // 2, 1, o)) * route
        g = anp.reshape(g, (n, ho // 2 * 2, wo // 2 * 2, o))
        if ho % 2 or wo % 2:                                      # cropped rows get no gradient
            g = _pad_back(g, ho, wo)
        g = anp.reshape(g, (n * ho * wo, o))
        grads = {self.w: anp.reshape(nn.matmul(anp.transpose(g), cols), w.shape),
                 self.b: anp.sum(g, axis=0)}
        g_h = None
        if need_input_grad:
            kh, kw = w.shape[2:]
            g_cols = nn.matmul(g, anp.reshape(w, (o, -1)))
            g_h = nn.col2im(anp.reshape(g_cols, (n, ho, wo, *w.shape[1:])), h_shape, kh, kw, 1, self.pad)
        return g_h, grads


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


def network_value_and_grad(layers, loss_and_output_grad, params, x, targets):
    """(ℓ(x, θ), ∇θ ℓ) by backpropagation through ``layers``: the forward pass keeps what
    each layer's derivative needs, then the layers are walked in reverse."""
    h, caches = x, []
    for layer in layers:
        h, cache = layer.forward(params, h)
        caches.append(cache)
    value, g = loss_and_output_grad(h, targets)
    first = next(i for i, layer in enumerate(layers) if layer.params)
    grads = {}
    for i in range(len(layers) - 1, first - 1, -1):
        g, layer_grads = layers[i].backward(params, caches[i], g, need_input_grad=i > first)
        grads.update(layer_grads)
    return value, traced_dict((k, grads[k]) for k in params)  # a dict autograd can trace through


def value_and_grad_for(apply, loss):
    """The hand-written ``(params, x, targets) -> (ℓ, ∇θ ℓ)`` for a model and loss that
    have one, else None (then use autograd on the plain composition)."""
    if not _STATE["enabled"]:
        return None
    layers = getattr(apply, "layers", None)
    loss_and_output_grad = LOSS_GRADIENTS.get(loss)
    if layers is None or loss_and_output_grad is None:
        return None
    return lambda params, x, targets: network_value_and_grad(
        layers, loss_and_output_grad, params, x, targets)
