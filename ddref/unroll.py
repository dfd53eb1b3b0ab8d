"""The inner loop of Algorithm 1: plain gradient descent on the distilled images.

For epoch e = 0..E-1 and step s = 0..S-1:

    θ ← θ − η̃[e, s] · ∇θ ℓ(x̃[s], θ)

The same S groups of images x̃[s] are reused in every epoch; each (epoch, step) pair has
its own learning rate η̃[e, s].  Learning rates are stored *raw* and made positive with
softplus, η̃ = log(1 + exp(raw)), as in the original code.

Every function here is pure, so autograd can differentiate the whole unroll with respect
to x̃ and the raw learning rates (the 'naive' meta-gradient in :mod:`ddref.hypergrad`).
"""

from __future__ import annotations

import math

import autograd.numpy as anp
from autograd import grad, value_and_grad
from autograd.tracer import getval

from ddref import fused
from ddref.losses import cross_entropy


def softplus(raw):
    """η̃ = log(1 + e^raw), computed stably; always positive."""
    return anp.logaddexp(0.0, raw)


def inverse_softplus(lr: float) -> float:
    """The raw value whose softplus is exactly ``lr`` (> 0)."""
    if not lr > 0:
        raise ValueError(f"a learning rate must be positive, got {lr}.")
    return lr + math.log(-math.expm1(-lr))  # = log(e^lr − 1), without overflow for large lr


def inner_loss(apply, params, x, targets, loss=cross_entropy):
    """ℓ(x, θ): the training loss of the network on one step's images (cross-entropy unless
    another ``loss(outputs, targets)`` is given, e.g. the squared error of §3.4)."""
    return loss(apply(params, x), targets)


_inner_grad = grad(inner_loss, 1)
_inner_value_and_grad = value_and_grad(inner_loss, 1)


def inner_grad(apply, params, x, targets, loss=cross_entropy):
    """∇θ ℓ(x, θ) as a dict shaped like ``params``.

    Plainly, autograd's gradient of :func:`inner_loss`.  When the model describes itself as
    layers (:mod:`ddref.fused`), the same gradient written out as backpropagation: the same
    numbers, much less autograd bookkeeping (tests/test_fused.py)."""
    fast = fused.gradient_for(apply, loss)
    if fast is not None:
        return fast.grad(params, x, targets)
    return _inner_grad(apply, params, x, targets, loss)


def loss_and_grad(apply, params, x, targets, loss=cross_entropy):
    """(ℓ(x, θ), ∇θ ℓ(x, θ)): :func:`inner_loss` and :func:`inner_grad` in one pass."""
    fast = fused.gradient_for(apply, loss)
    if fast is not None:
        return fast.value_and_grad(params, x, targets)
    return _inner_value_and_grad(apply, params, x, targets, loss)


def descend(params, grads, lr):
    """θ − η g, parameter by parameter."""
    return {k: params[k] - lr * grads[k] for k in params}


def sgd_step(apply, params, x, targets, lr, loss=cross_entropy):
    """One step of gradient descent: θ − η ∇θ ℓ(x, θ)."""
    fast = fused.gradient_for(apply, loss)
    if fast is not None:                       # the same step as one primitive (ddref.fused)
        return fast.step(params, x, targets, lr)
    return descend(params, inner_grad(apply, params, x, targets, loss), lr)


def step_schedule(epochs, steps):
    """The (epoch, step) pairs in the order the inner loop visits them."""
    return [(e, s) for e in range(epochs) for s in range(steps)]


def check_schedule(x_distilled, lrs):
    """(epochs, steps) of a learning-rate table that fits the distilled images, else one clear
    ValueError: lrs must be (E, S) for x_distilled of shape (S, n, C, H, W)."""
    if len(x_distilled.shape) != 5:
        raise ValueError(
            f"distilled images of shape {tuple(x_distilled.shape)} lack the step axis: give them "
            f"the shape (steps, n, C, H, W), e.g. x[None] for a single step.")
    steps = x_distilled.shape[0]
    if len(lrs.shape) != 2 or lrs.shape[1] != steps:
        raise ValueError(
            f"learning rates of shape {tuple(lrs.shape)} do not fit {steps} groups of distilled "
            f"images; give them the shape (epochs, steps) = (E, {steps}).")
    return lrs.shape


def check_finite(name, array):
    """One clear ValueError if ``array`` holds NaN or inf (checked once, before training)."""
    if not bool(anp.isfinite(array).all()):
        raise ValueError(f"{name} contain NaN or inf; check how they were made (a diverged run?) "
                         f"and start from finite values.")


def check_nonnegative_lrs(lrs):
    """One clear ValueError if a learning rate is negative (a negative rate climbs the loss
    instead of descending it; 0 leaves a step out)."""
    if bool((lrs < 0).any()):
        raise ValueError(f"learning rates must be 0 or more (a negative rate climbs the loss); "
                         f"the smallest given is {float(lrs.min()):.3g}.")


def step_targets(targets, s):
    """The targets of step s: ``targets`` itself when shared by every step (n, K), else its
    row s (per-step targets (S, n, K), e.g. learned soft labels, :mod:`ddref.labels`)."""
    return targets[s] if len(targets.shape) == 3 else targets


def unroll(apply, theta0, x_distilled, targets, lrs, return_all=False, loss=cross_entropy):
    """Train from ``theta0`` on the distilled images.

    x_distilled : (S, n_per_step, C, H, W) images, one group per step
    targets     : (n_per_step, K) one-hot (or soft) labels shared by every step, or
                  (S, n_per_step, K) labels of their own for each step
    lrs         : (E, S) positive learning rates η̃ — E epochs of S steps
    Returns θ_T, or the list [θ_0, …, θ_T] when ``return_all``.
    """
    epochs, steps = check_schedule(x_distilled, lrs)
    check_finite("the distilled images", getval(x_distilled))
    check_finite("the learning rates", getval(lrs))
    check_nonnegative_lrs(getval(lrs))
    params = theta0
    trajectory = [params]
    for e, s in step_schedule(epochs, steps):
        params = sgd_step(apply, params, x_distilled[s], step_targets(targets, s), lrs[e, s], loss)
        if return_all:
            trajectory.append(params)
    return trajectory if return_all else params
