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

Every pass is built from differentiable primitives (``matmul``, the patch matrices
and their adjoints, constant relu masks and max-pool routings), so tracing through
them again — a third derivative — is still exact.  :func:`gradient_for` returns the fast
gradient of a model and loss (cross-entropy, squared error) or ``None``, and
:mod:`ddref.unroll` / :mod:`ddref.hypergrad` then use the plain path; ``with fused.plain():``
switches the fast path off.  tests/test_fused.py checks that both paths agree in value,
first and second derivatives to 1e-10 in float64.

The layers (``Flatten``, ``Dense``, ``ToCHWN``, ``ConvReluPool``, ``FlattenCHWN``, with
``forward`` / ``backward`` and ``tangent`` / ``backward_tangent``) live in
:mod:`ddref.fused_layers`, the device kernels of the convolution and pooling in
:mod:`ddref.kernels`; both are re-exported here.  The import order is
backend → kernels → fused_layers → nn and fused (neither of which imports the other).
"""

from __future__ import annotations

import contextlib

import autograd.numpy as anp
import numpy
from autograd.builtins import dict as traced_dict
from autograd.extend import defvjp_argnums, primitive
from autograd.tracer import getval

from ddref import backend, kernels, losses
from ddref.fused_layers import (ConvReluPool, Dense, Flatten, FlattenCHWN, ToCHWN,  # noqa: F401
                                _conv_matrix, _relu_mask, matmul)
from ddref.kernels import patches_chwn, patches_chwn_adjoint  # noqa: F401  (re-exported)

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
        if kernels.fusable(logits, targets):                      # one kernel on a device
            return kernels.softmax_cross_entropy(logits, targets)
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
        if kernels.fusable(z_dot, p):
            return kernels.softmax_cross_entropy_tangent(p, row_mass, z_dot)
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


# ---------------------------------------------------------------------------- parameter updates


def descend(params, grads, lr):
    """θ − η g, parameter by parameter (``unroll.descend``); on a device, one kernel each."""
    if kernels.fusable(lr, *params.values(), *grads.values()):
        return {k: kernels.step(params[k], grads[k], lr) for k in params}
    return {k: params[k] - lr * grads[k] for k in params}


def neg_inner(g, v):
    """−Σ_k ⟨g_k, v_k⟩ over the parameters; on a device as one product of the concatenated
    parameters (4 operations instead of 2 per parameter)."""
    if kernels.fusable(*g.values(), *v.values()):
        xp = backend.xp()
        flat_g = xp.concatenate([anp.ravel(g[k]) for k in v])
        return -xp.dot(flat_g, xp.concatenate([anp.ravel(v[k]) for k in v]))
    return -sum(anp.vdot(g[k], v[k]) for k in v)


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


# A large batch through a convolutional network (the outer loss on the real batch) goes
# through backpropagation in slices of this many images: a convolution's patch matrix grows
# with the batch (80 MB for LeNet's first layer on 1,024 images), and a slice's stays in cache.
SLICE = 128


def _backprop(layers, loss, params, x, targets, wrt_inputs):
    """ℓ, ∇θ ℓ, and with ``wrt_inputs`` also ∇x ℓ and ∇t ℓ (else None, None).

    On the host, untraced, a convolutional network takes a batch of more than ``SLICE``
    images in slices: ℓ is the mean over the N rows, so ℓ = Σ_s (N_s / N) ℓ_s and each
    gradient is the same weighted sum of the slices' (the numbers differ only in the order of
    the float sums)."""
    if not _sliced(layers, params, x):
        return _backprop_whole(layers, loss, params, x, targets, wrt_inputs)
    value, grads, x_parts, t_parts = 0.0, {}, [], []
    for rows, weight in _slices(x):
        v, g, g_x, g_t = _backprop_whole(layers, loss, params, x[rows], targets[rows], wrt_inputs)
        value = value + weight * v
        grads = {k: grads[k] + weight * g[k] if k in grads else weight * g[k] for k in g}
        if wrt_inputs:
            x_parts.append(weight * g_x)
            t_parts.append(weight * g_t)
    if not wrt_inputs:
        return value, grads, None, None
    return value, grads, numpy.concatenate(x_parts), numpy.concatenate(t_parts)


def _sliced(layers, params, x):
    """True when :func:`_backprop` should go slice by slice (see ``SLICE``)."""
    return (x.shape[0] > SLICE and len(x.shape) == 4 and backend.xp() is numpy
            and any(isinstance(layer, ConvReluPool) for layer in layers)
            and all(getval(v) is v for v in (x, *params.values())))


def _slices(x):
    """(rows, N_s / N) of each slice of ``SLICE`` images."""
    n = x.shape[0]
    return [(slice(start, start + SLICE), (min(n, start + SLICE) - start) / n)
            for start in range(0, n, SLICE)]


def _backprop_whole(layers, loss, params, x, targets, wrt_inputs):
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
    params = dict(zip(keys, values))
    if _sliced(layers, params, x):                                   # as _backprop does
        return sum(weight * loss.forward(_forward(layers, params, x[rows])[0], targets[rows])[0]
                   for rows, weight in _slices(x))
    out, _ = _forward(layers, params, x)
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

