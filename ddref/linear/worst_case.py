"""The worst case over a sphere of initialisations: max ‖A e + b‖ over ‖e‖ = r, exactly.

A trust-region problem on the SVD of the residual map A, solved by bisection; the
triangle inequality r ‖A‖₂ + ‖b‖ bounds it from above.
"""

from __future__ import annotations

import numpy as np

from ddref.linear._checks import _finite_float64
from ddref.linear.closed_forms import affine_error_map



def max_error_on_sphere(residual_map, offset, radius):
    """The exact worst case  max_{‖e‖_F = r} ‖A e + b‖_F  and an e that attains it.

    e and b may be vectors (D,) or matrices (D, K) (then A acts on each column).
    With the SVD A = U Σ Vᵀ, y = Vᵀe and c = Uᵀb, we maximise Σ_i (σ_i y_i + c_i)² on
    ‖y‖ = r: a trust-region problem whose global maximiser is
        y_i = σ_i c_i / (μ − σ_i²),   μ ≥ σ_max²,   with μ fixed by ‖y‖ = r,
    found by bisection (‖y(μ)‖ decreases in μ).  In the "hard case" (c has no component
    on the top singular directions) μ = σ_max² and the rest of the norm goes there.
    The triangle inequality gives the simpler bound r ‖A‖₂ + ‖b‖ (see
    :func:`worst_case_bound`), equal to this value when b = 0 or b is aligned with
    the top singular direction.
    """
    residual_map = _finite_float64("residual_map", residual_map)
    offset = _finite_float64("offset", offset)
    dim = offset.shape[0] if offset.ndim else 0
    if residual_map.shape != (dim, dim) or offset.ndim not in (1, 2):
        raise ValueError(
            f"residual_map must be square and match offset of shape (D,) or (D, K); got "
            f"{residual_map.shape} and {offset.shape}."
        )
    radius = float(radius)
    if radius < 0:
        raise ValueError(f"radius must be non-negative; got {radius}.")
    left, singular_values, right_t = np.linalg.svd(residual_map)
    offset_matrix = offset.reshape(offset.shape[0], -1)  # (D, K)
    # Each output column shares the same singular values: flatten to one problem.
    sigma = np.repeat(singular_values[:, None], offset_matrix.shape[1], axis=1).ravel()
    rotated_offset = (left.T @ offset_matrix).ravel()

    y = _trust_region_maximiser(sigma, rotated_offset, radius)
    worst_error = right_t.T @ y.reshape(offset_matrix.shape)
    worst_error = worst_error.reshape(offset.shape)
    value = np.linalg.norm(residual_map @ worst_error.reshape(offset_matrix.shape) + offset_matrix)
    return float(value), worst_error


def _trust_region_maximiser(sigma, c, radius):
    """argmax_{‖y‖ = r} Σ (σ_i y_i + c_i)²  for σ_i ≥ 0 (see :func:`max_error_on_sphere`).

    Writing μ = σ_max² + δ (δ ≥ 0) and g_i = (σ_max − σ_i)(σ_max + σ_i), the maximiser is
    y_i = σ_i c_i / (δ + g_i): computing δ + g_i, not μ − σ_i², keeps full precision when
    δ is tiny.  On the top singular directions (g_i = 0) y is parallel to c, and its
    length is whatever ‖y‖ = r leaves over; with c = 0 there (the hard case) any
    direction in the top subspace will do and δ → 0.
    """
    if radius == 0:
        return np.zeros_like(c)
    sigma_max = sigma.max()
    gap = (sigma_max - sigma) * (sigma_max + sigma)
    top = sigma >= sigma_max * (1 - 1e-12)
    rest = ~top

    def rest_norm2(delta):
        return np.sum((sigma[rest] * c[rest] / (delta + gap[rest])) ** 2)

    def norm2(delta):
        return rest_norm2(delta) + (sigma_max / delta) ** 2 * np.sum(c[top] ** 2)

    # ‖y(δ)‖² ≤ σ_max² ‖c‖² / δ², so ‖y‖ ≤ r once δ ≥ σ_max ‖c‖ / r; ‖y(δ)‖ decreases in δ.
    low, high = 0.0, sigma_max * np.linalg.norm(c) / radius
    for _ in range(400):
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        if norm2(mid) > radius**2:
            low = mid
        else:
            high = mid
    y = np.zeros_like(c)
    y[rest] = sigma[rest] * c[rest] / (high + gap[rest])
    fill = np.sqrt(max(radius**2 - np.sum(y[rest] ** 2), 0.0))
    c_top = c[top]
    if np.any(c_top != 0):
        y[top] = fill * c_top / np.linalg.norm(c_top)
    else:
        y[np.flatnonzero(top)[0]] = fill
    return y * (radius / np.linalg.norm(y))


def worst_case_error(d_distilled, t_distilled, lr, theta_star, radius=1.0):
    """max over ‖θ0 − θ*‖ = r of ‖θ_T − θ*‖: the exact worst case after the step(s).

    Returns ``(error, theta0)`` with θ0 an initialisation attaining it.  Accepts one
    step (d̃ of shape (M, D), scalar η̃) or T steps ((T, M, D), η̃ of shape (T,)).
    """
    theta_star = _finite_float64("theta_star", theta_star)
    residual_map, offset = affine_error_map(d_distilled, t_distilled, lr, theta_star)
    value, worst_error = max_error_on_sphere(residual_map, offset, radius)
    return value, theta_star + worst_error


def worst_case_bound(d_distilled, t_distilled, lr, theta_star, radius=1.0):
    """The triangle-inequality bound r ‖A‖₂ + ‖b‖ ≥ worst-case error (equal when b = 0)."""
    residual_map, offset = affine_error_map(d_distilled, t_distilled, lr, theta_star)
    return float(radius * np.linalg.norm(residual_map, 2) + np.linalg.norm(offset))
