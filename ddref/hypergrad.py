"""Meta-gradients: the derivative of the outer loss ℓ(x_real, θ_T) with respect to the
distilled images x̃ and the raw learning rates, computed two ways.

``naive``
    ``autograd`` differentiates straight through the whole unroll.  Simple and exact, but
    the tape keeps every step's activations, so memory grows with the number of steps.

``backgrad``  (the paper's back-gradient optimisation, after Domke 2012 / Maclaurin 2015)
    The forward pass keeps only the weights θ_0 … θ_T.  The backward pass walks the steps
    in reverse.  Step t is the map  θ_{t+1} = θ_t − η_t g(θ_t, x̃_s)  with g = ∇θ ℓ, so with
    v = ∂L/∂θ_{t+1} its vector–Jacobian product is

        ∂L/∂θ_t  = v − η_t · (∂g/∂θ)ᵀ v        (a Hessian-vector product)
        ∂L/∂x̃_s += −η_t · (∂g/∂x̃_s)ᵀ v       (summed over the epochs that reuse x̃_s)
        ∂L/∂η_t  = −⟨g(θ_t, x̃_s), v⟩

    Both products come from one reverse pass through g.  Memory holds T+1 copies of θ and
    one step's activations at a time.

Both return the same numbers (tests check 1e-10 agreement in float64 and finite
differences).

Speed.  For models described as layers (mlp, lenet, convnet) with cross-entropy or squared
error, g, the step θ − η g and the products above come from the hand-written passes of
:mod:`ddref.fused` instead of autograd tracing ``apply`` twice: the same numbers (to
rounding; tests/test_fused.py), several times faster.  The equations here are unchanged;
``with fused.plain():`` runs the plain path.

The engines are chosen by name in :mod:`ddref.engines`, the one registry, which runs these
plain paths for β = 0 without truncation.
"""

from __future__ import annotations

from dataclasses import dataclass

import autograd.numpy as anp
from autograd import make_vjp, value_and_grad

from ddref import fused
from ddref.losses import cross_entropy
from ddref.unroll import (check_schedule, inner_grad, loss_and_grad, softplus,
                          step_schedule, step_targets, unroll)


@dataclass(frozen=True)
class MetaGradient:
    """The outer loss and its gradients with respect to x̃ and the raw learning rates."""

    loss: float
    grad_x: object          # shaped like x_distilled
    grad_raw_lrs: object    # shaped like raw_lrs, (E, S)
    grad_targets: object = None   # shaped like targets, when asked for (learned labels)


def outer_loss_of_params(apply, params, x_real, real_targets, loss=cross_entropy):
    """ℓ_obj(x, θ_T): the loss of the trained network on a real batch.  The targets are the
    true labels (classification) or the attack labels (poisoning, §3.5)."""
    fast = fused.gradient_for(apply, loss)
    if fast is not None:                       # the same number, one autograd node (ddref.fused)
        return fast.value(params, x_real, real_targets)
    return loss(apply(params, x_real), real_targets)


def stacks(apply, loss=cross_entropy) -> bool:
    """Whether the model's fast gradient can train several networks as one computation."""
    fast = fused.gradient_for(apply, loss)
    return fast is not None and fast.stackable


def stacked_backgrad(apply, theta0s, x_distilled, targets, raw_lrs, x_reals, real_targets,
                     loss=cross_entropy):
    """Back-gradient averaged over K networks trained side by side as one computation: every
    parameter gets a leading axis K, the distilled images are shared, each inner step's matrix
    products become batched products, and the meta-gradient of the summed outer loss divided by
    K is the mean (the K networks are independent, so ∂/∂θ_k of the sum is network k's own
    gradient).  For models whose fast path stacks (:func:`stacks`, the MLP)."""
    k = len(theta0s)
    stacked = {name: anp.stack([theta0[name] for theta0 in theta0s]) for name in theta0s[0]}
    mg = backgrad(apply, stacked, x_distilled, targets, raw_lrs, anp.stack(x_reals),
                  anp.stack(real_targets), loss)
    return MetaGradient(mg.loss / k, mg.grad_x / k, mg.grad_raw_lrs / k)


def naive(apply, theta0, x_distilled, targets, raw_lrs, x_real, real_targets, loss=cross_entropy,
          wrt_targets=False):
    """Autograd through the whole unroll."""

    def outer(x_distilled, raw_lrs, targets):
        params = unroll(apply, theta0, x_distilled, targets, softplus(raw_lrs), loss=loss)
        return outer_loss_of_params(apply, params, x_real, real_targets, loss)

    argnums = (0, 1, 2) if wrt_targets else (0, 1)
    loss, grads = value_and_grad(outer, argnums)(x_distilled, raw_lrs, targets)
    return MetaGradient(float(loss), *grads)


def backgrad(apply, theta0, x_distilled, targets, raw_lrs, x_real, real_targets,
             loss=cross_entropy, wrt_targets=False):
    """Back-gradient: store θ_t on the way forward, then one VJP of the step map per step."""
    lrs = softplus(raw_lrs)
    schedule = step_schedule(*check_schedule(x_distilled, raw_lrs))
    thetas = train_keeping_weights(apply, theta0, x_distilled, targets, lrs, schedule, loss)
    outer_loss, v = loss_and_grad(apply, thetas[-1], x_real, real_targets, loss)   # v = ∂L/∂θ_T
    if wrt_targets:
        grad_x, grad_lrs, grad_targets = reverse_pass_with_targets(
            apply, thetas, x_distilled, targets, lrs, schedule, v, loss)
    else:
        grad_x, grad_lrs = reverse_pass(apply, thetas, x_distilled, targets, lrs, schedule, v, loss)
        grad_targets = None
    return MetaGradient(float(outer_loss), grad_x, grad_lrs * _softplus_derivative(raw_lrs),
                        grad_targets)


def train_keeping_weights(apply, theta0, x_distilled, targets, lrs, schedule, loss=cross_entropy):
    """Forward: plain gradient descent along ``schedule``, keeping only θ_0 … θ_T."""
    thetas = [theta0]
    for e, s in schedule:
        grads = inner_grad(apply, thetas[-1], x_distilled[s], step_targets(targets, s), loss)
        thetas.append(fused.descend(thetas[-1], grads, lrs[e, s]))
    return thetas


def reverse_pass(apply, thetas, x_distilled, targets, lrs, schedule, v, loss=cross_entropy):
    """Backward: v holds ∂L/∂θ_{t+1}; turn it into ∂L/∂θ_t step by step, collecting
    ∂L/∂x̃ and ∂L/∂η̃ on the way.  Returns (∂L/∂x̃, ∂L/∂η̃)."""
    grad_x_steps = [anp.zeros_like(x_distilled[0]) for _ in range(x_distilled.shape[0])]
    grad_lrs = anp.zeros_like(lrs)
    for t in reversed(range(len(schedule))):
        e, s = schedule[t]
        v, h_images, grad_lrs[e, s] = reverse_step(apply, thetas[t], x_distilled[s],
                                                   step_targets(targets, s), lrs[e, s], v, loss)
        grad_x_steps[s] = grad_x_steps[s] + h_images
    return anp.stack(grad_x_steps), grad_lrs


def reverse_step(apply, theta, images, targets, lr, v, loss=cross_entropy):
    """The VJP of one step θ' = θ − η g(θ, x̃) with g = ∇θ ℓ, at v = ∂L/∂θ':
    returns (∂L/∂θ, this step's ∂L/∂x̃, ∂L/∂η) = (v − η Hθ v, −η (∂g/∂x̃)ᵀ v, −⟨g, v⟩)."""
    fast = fused.gradient_for(apply, loss)
    if fast is not None:                       # the same products, written out (ddref.fused)
        g, h_params, h_images = fast.grad_and_vjp(theta, images, targets, v)
    else:
        pull_back, g = make_vjp(_grad_wrt_params_and_images, 0)((theta, images), apply, targets, loss)
        h_params, h_images = pull_back(v)
    return fused.descend(v, h_params, lr), -lr * h_images, fused.neg_inner(g, v)


def reverse_pass_with_targets(apply, thetas, x_distilled, targets, lrs, schedule, v,
                              loss=cross_entropy):
    """:func:`reverse_pass` that also collects ∂L/∂t, the gradient w.r.t. the inner targets:
    step t adds −η_t (∂g/∂t)ᵀ v to its step's targets (summed over the steps when they are
    shared).  Returns (∂L/∂x̃, ∂L/∂η̃, ∂L/∂t)."""
    steps = x_distilled.shape[0]
    grad_x_steps = [anp.zeros_like(x_distilled[0]) for _ in range(steps)]
    grad_t_steps = [anp.zeros_like(step_targets(targets, 0)) for _ in range(steps)]
    grad_lrs = anp.zeros_like(lrs)
    for t in reversed(range(len(schedule))):
        e, s = schedule[t]
        v, h_images, grad_lrs[e, s], h_targets = reverse_step_with_targets(
            apply, thetas[t], x_distilled[s], step_targets(targets, s), lrs[e, s], v, loss)
        grad_x_steps[s] = grad_x_steps[s] + h_images
        grad_t_steps[s] = grad_t_steps[s] + h_targets
    grad_targets = anp.stack(grad_t_steps)
    if len(targets.shape) == 2:
        grad_targets = anp.sum(grad_targets, axis=0)
    return anp.stack(grad_x_steps), grad_lrs, grad_targets


def reverse_step_with_targets(apply, theta, images, targets, lr, v, loss=cross_entropy):
    """:func:`reverse_step` plus this step's ∂L/∂t = −η (∂g/∂t)ᵀ v.  The fast path's
    forward-over-reverse pass computes (∂g/∂t)ᵀ v with the other products
    (:func:`ddref.fused.network_grad_and_hvp`)."""
    fast = fused.gradient_for(apply, loss)
    if fast is not None:
        g, h_params, h_images, h_targets = fused.network_grad_and_hvp(
            fast.layers, fast.loss, theta, images, targets, v)
    else:
        pull_back, g = make_vjp(_grad_wrt_params_images_and_targets, 0)(
            (theta, images, targets), apply, loss)
        h_params, h_images, h_targets = pull_back(v)
    grad_lr = -sum(anp.vdot(g[k], v[k]) for k in v)
    return ({k: v[k] - lr * h_params[k] for k in v}, -lr * h_images, grad_lr,
            -lr * h_targets)


def _grad_wrt_params_images_and_targets(params_images_targets, apply, loss):
    params, images, targets = params_images_targets
    return inner_grad(apply, params, images, targets, loss)


def _grad_wrt_params_and_images(params_and_images, apply, targets, loss):
    params, images = params_and_images
    return inner_grad(apply, params, images, targets, loss)


def _softplus_derivative(raw):
    """d softplus / d raw = sigmoid(raw)."""
    return 0.5 * (anp.tanh(0.5 * raw) + 1.0)
