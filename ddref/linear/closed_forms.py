"""Linear regression, its optimum, and the error after T distilled steps in closed form.

    ℓ(θ) = 1/(2N) ‖d θ − t‖²,        θ* = (dᵀd)⁻¹ dᵀ t,
    θ1 = θ0 − (η̃/M) d̃ᵀ(d̃ θ0 − t̃),
    θ1 − θ* = A (θ0 − θ*) + b,     A = I − (η̃/M) d̃ᵀd̃,     b = (η̃/M) d̃ᵀ(t̃ − d̃ θ*),
    E_{θ0 ~ N(θ*, σ²I)} ‖θ_T − θ*‖² = σ² K ‖A‖_F² + ‖b‖².

The private ``_affine_error_map`` and ``_expected_error`` skip the input checks and are
written with autograd.numpy, so the expected error can be differentiated with respect to
d̃, t̃ and η̃ (:mod:`ddref.linear.learned`).
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np

from ddref.linear._checks import _check_data, _check_lr, _check_steps, _check_theta, _steps_from_args


# ---------------------------------------------------------------------------------
# The model: loss, optimum, one gradient step.
# ---------------------------------------------------------------------------------


def loss(theta, d, t):
    """ℓ(θ) = 1/(2N) ‖d θ − t‖²  (differentiable with autograd)."""
    residual = anp.dot(d, theta) - t
    return 0.5 * anp.sum(residual**2) / d.shape[0]


def least_squares_optimum(d, t, min_norm=False):
    """θ* = argmin ℓ(θ) = (dᵀd)⁻¹ dᵀ t.

    θ* is unique only when dᵀd has full rank D.  Otherwise this raises a ValueError,
    unless ``min_norm=True``: then it returns the minimum-norm minimiser d⁺ t (the
    pseudo-inverse solution, which is the least-squares optimum of smallest ‖θ‖).
    """
    d, t = _check_data(d, t)
    rank = np.linalg.matrix_rank(d)
    if rank < d.shape[1] and not min_norm:
        raise ValueError(
            f"dᵀd has rank {rank} < D = {d.shape[1]}, so the least-squares optimum is not "
            "unique; pass min_norm=True to use the minimum-norm solution."
        )
    theta_star, *_ = np.linalg.lstsq(d, t, rcond=None)
    return theta_star


def gradient_step(theta0, d_distilled, t_distilled, lr):
    """θ1 = θ0 − (η̃/M) d̃ᵀ(d̃ θ0 − t̃): one step of gradient descent on ℓ̃ = 1/(2M)‖d̃θ − t̃‖²."""
    d_distilled, t_distilled = _check_data(d_distilled, t_distilled, ("d_distilled", "t_distilled"))
    lr = _check_lr(lr)
    theta0 = _check_theta(theta0, d_distilled.shape[1], t_distilled, "theta0")
    n_distilled = d_distilled.shape[0]
    return theta0 - (lr / n_distilled) * d_distilled.T @ (d_distilled @ theta0 - t_distilled)


def gradient_steps(theta0, d_steps, t_steps, lrs):
    """θ_T after T steps, step i on its own M points: θ_i = θ_{i−1} − (η̃_i/M) d̃_iᵀ(d̃_i θ_{i−1} − t̃_i)."""
    d_steps, t_steps, lrs = _check_steps(d_steps, t_steps, lrs)
    theta = _check_theta(theta0, d_steps.shape[2], t_steps[0], "theta0")
    for d_step, t_step, lr in zip(d_steps, t_steps, lrs):
        theta = gradient_step(theta, d_step, t_step, lr)
    return theta


# ---------------------------------------------------------------------------------
# The error map θ_T − θ* = A (θ0 − θ*) + b, written with autograd.numpy so that the
# expected error below can be differentiated with respect to d̃, t̃ and η̃.
# ---------------------------------------------------------------------------------


def _affine_error_map(d_steps, t_steps, lrs, theta_star):
    """(A, b) with θ_T − θ* = A(θ0 − θ*) + b, for T steps (no input checks; differentiable).

    One step: A_i = I − (η̃_i/M) d̃_iᵀd̃_i,  b_i = (η̃_i/M) d̃_iᵀ(t̃_i − d̃_i θ*).
    Composition: A = A_T ⋯ A_1,  b ← A_i b + b_i.
    """
    n_steps, n_distilled, dim = d_steps.shape
    residual_map = anp.eye(dim)
    offset = anp.zeros(anp.shape(theta_star))
    for i in range(n_steps):
        d_step, scale = d_steps[i], lrs[i] / n_distilled
        step_map = anp.eye(dim) - scale * anp.dot(d_step.T, d_step)
        step_offset = scale * anp.dot(d_step.T, t_steps[i] - anp.dot(d_step, theta_star))
        residual_map = anp.dot(step_map, residual_map)
        offset = anp.dot(step_map, offset) + step_offset
    return residual_map, offset


def affine_error_map(d_distilled, t_distilled, lr, theta_star):
    """(A, b) such that θ_T − θ* = A (θ0 − θ*) + b for every θ0.

    One step (d̃ of shape (M, D), scalar η̃):
        A = I − (η̃/M) d̃ᵀd̃,   b = (η̃/M) d̃ᵀ(t̃ − d̃ θ*).
    T steps (d̃ of shape (T, M, D), η̃ of shape (T,)): A = A_T ⋯ A_1 and b the composed offset.
    b has the shape of θ*: (D,) or (D, K).
    """
    d_steps, t_steps, lrs = _steps_from_args(d_distilled, t_distilled, lr)
    theta_star = _check_theta(theta_star, d_steps.shape[2], t_steps[0], "theta_star")
    return _affine_error_map(d_steps, t_steps, lrs, theta_star)


def _expected_error(d_steps, t_steps, lrs, theta_star, init_std=1.0):
    """E ‖θ_T − θ*‖² over θ0 ~ N(θ*, σ²I), in closed form (differentiable).

    With e = θ0 − θ* ~ N(0, σ²I) (each of the K columns independently),
        E‖A e + b‖² = σ² K ‖A‖_F² + ‖b‖²   (the cross term has mean zero),
    exact, with no sampling noise.
    """
    residual_map, offset = _affine_error_map(d_steps, t_steps, lrs, theta_star)
    n_outputs = 1 if anp.ndim(theta_star) == 1 else anp.shape(theta_star)[1]
    return init_std**2 * n_outputs * anp.sum(residual_map**2) + anp.sum(offset**2)


def expected_error(d_distilled, t_distilled, lr, theta_star, init_std=1.0):
    """E_{θ0 ~ N(θ*, σ²I)} ‖θ_T − θ*‖² = σ² K ‖A‖_F² + ‖b‖² (exact closed form).

    For M < D (or T·M < D) this is at least σ² K (D − M) (resp. σ² K (D − T·M)):
    A is the identity on the common null space of the d̃_i.
    """
    d_steps, t_steps, lrs = _steps_from_args(d_distilled, t_distilled, lr)
    theta_star = _check_theta(theta_star, d_steps.shape[2], t_steps[0], "theta_star")
    return float(_expected_error(d_steps, t_steps, lrs, theta_star, init_std))
