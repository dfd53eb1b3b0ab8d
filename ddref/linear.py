"""The linear case of §3.4: one step from every θ0 needs d̃ᵀd̃ = (M/η̃)·I, hence M ≥ D.

Linear regression with quadratic loss on real data d (N × D, D = feature dimension)
and targets t (N, or N × K for K outputs):

    ℓ(θ) = 1/(2N) ‖d θ − t‖²,        θ* = (dᵀd)⁻¹ dᵀ t   (the least-squares optimum).

One gradient step on M distilled points d̃ (M × D), t̃, with learning rate η̃:

    θ1 = θ0 − η̃ ∇ℓ̃(θ0) = θ0 − (η̃/M) d̃ᵀ(d̃ θ0 − t̃).

Subtracting θ* from both sides gives an affine map of the initial error

    θ1 − θ* = A (θ0 − θ*) + b,     A = I − (η̃/M) d̃ᵀd̃,     b = (η̃/M) d̃ᵀ(t̃ − d̃ θ*).

θ1 = θ* for *every* θ0 iff A = 0 and b = 0, i.e. d̃ᵀd̃ = (M/η̃)·I (so d̃ᵀd̃ has full
rank D, which needs M ≥ D) and d̃ᵀt̃ = d̃ᵀd̃ θ*.  When M < D, A v = v for every v in
the null space of d̃ (dimension ≥ D − M), and b has no component there (b lies in the
row space of d̃): those directions of θ0 − θ* are never corrected, whatever d̃, t̃, η̃.

The module also covers T steps of M points each (beyond the paper): every θ0 reaches
θ* when T·M ≥ D, and cannot when T·M < D, because every residual map leaves the
intersection of the null spaces of d̃_1 … d̃_T (dimension ≥ D − T·M) untouched.

Shapes: one step takes ``d_distilled`` (M, D), ``t_distilled`` (M,) or (M, K) and a
scalar ``lr``; T steps take (T, M, D), (T, M) or (T, M, K) and ``lrs`` of shape (T,).
Everything is float64; every random choice takes a ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import autograd.numpy as anp
import numpy as np
from autograd import value_and_grad

from ddref import backend, engines, nn
from ddref.optim import Adam
from ddref.losses import squared_error
from ddref.unroll import softplus  # log(1 + eˣ): keeps learning rates positive

# ---------------------------------------------------------------------------------
# Input checks: one clear sentence naming the fix.
# ---------------------------------------------------------------------------------


def _finite_float64(name, x):
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values; pass finite numbers.")
    return x


def _check_data(d, t, names=("d", "t")):
    """Validate a design matrix (N, D) and its targets (N,) or (N, K)."""
    d = _finite_float64(names[0], d)
    t = _finite_float64(names[1], t)
    if d.ndim != 2:
        raise ValueError(
            f"{names[0]} must be a 2-D array of shape (points, features); got shape {d.shape}."
        )
    if t.ndim not in (1, 2) or t.shape[0] != d.shape[0]:
        raise ValueError(
            f"{names[1]} must have shape ({d.shape[0]},) or ({d.shape[0]}, K) to match "
            f"{names[0]} of shape {d.shape}; got shape {t.shape}."
        )
    return d, t


def _check_lr(lr, name="lr"):
    lr = np.asarray(lr, dtype=np.float64)
    if lr.ndim != 0:
        raise ValueError(f"{name} must be a scalar; got shape {lr.shape}.")
    if not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"{name} must be a finite positive number; got {float(lr)}.")
    return float(lr)


def _check_theta(theta, dim, t, name):
    """θ must have shape (D,) for vector targets t, (D, K) for matrix targets."""
    theta = _finite_float64(name, theta)
    expected = (dim,) + tuple(np.shape(t)[1:])
    if theta.shape != expected:
        raise ValueError(f"{name} must have shape {expected}; got shape {theta.shape}.")
    return theta


def _check_steps(d_steps, t_steps, lrs):
    """Validate T steps: d̃ (T, M, D), t̃ (T, M) or (T, M, K), η̃ (T,) all positive."""
    d_steps = _finite_float64("d_distilled", d_steps)
    t_steps = _finite_float64("t_distilled", t_steps)
    lrs = _finite_float64("lrs", lrs)
    if d_steps.ndim != 3:
        raise ValueError(
            f"d_distilled for T steps must have shape (T, M, D); got shape {d_steps.shape}."
        )
    n_steps, n_distilled, _ = d_steps.shape
    if t_steps.ndim not in (2, 3) or t_steps.shape[:2] != (n_steps, n_distilled):
        raise ValueError(
            f"t_distilled must have shape ({n_steps}, {n_distilled}) or ({n_steps}, "
            f"{n_distilled}, K) to match d_distilled of shape {d_steps.shape}; got shape "
            f"{t_steps.shape}."
        )
    if lrs.shape != (n_steps,):
        raise ValueError(f"lrs must have shape ({n_steps},), one per step; got shape {lrs.shape}.")
    if np.any(lrs <= 0):
        raise ValueError(f"every learning rate must be positive; got {lrs.tolist()}.")
    return d_steps, t_steps, lrs


def _as_steps(d_distilled, t_distilled, lr):
    """Lift one step (M, D), (M[, K]), scalar to the T = 1 multi-step form."""
    d_distilled, t_distilled = _check_data(d_distilled, t_distilled, ("d_distilled", "t_distilled"))
    lr = _check_lr(lr)
    return d_distilled[None], t_distilled[None], np.array([lr])


def _steps_from_args(d_distilled, t_distilled, lr_or_lrs):
    """Accept either one step (2-D d̃) or T steps (3-D d̃)."""
    if np.ndim(d_distilled) == 2:
        return _as_steps(d_distilled, t_distilled, lr_or_lrs)
    return _check_steps(d_distilled, t_distilled, lr_or_lrs)


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


# ---------------------------------------------------------------------------------
# Worst case over a sphere of initialisations: max ‖A e + b‖ over ‖e‖ = r.
# ---------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------
# Rank and the uncorrected directions.
# ---------------------------------------------------------------------------------


def uncorrected_directions(d_distilled):
    """An orthonormal basis (D, k) of the directions no step can correct.

    For one step (d̃ of shape (M, D)) this is the null space of d̃; for T steps
    ((T, M, D)) the intersection of the null spaces of d̃_1 … d̃_T, i.e. the null space
    of the stacked (T·M, D) matrix.  Its dimension k is at least D − M (resp. D − T·M).
    On it every residual map is the identity and every offset vanishes, so the
    component of θ0 − θ* there is carried unchanged to θ_T − θ*, whatever t̃ and η̃.
    """
    d_distilled = _finite_float64("d_distilled", d_distilled)
    if d_distilled.ndim not in (2, 3):
        raise ValueError(
            f"d_distilled must have shape (M, D) or (T, M, D); got shape {d_distilled.shape}."
        )
    stacked = d_distilled.reshape(-1, d_distilled.shape[-1])
    rank = np.linalg.matrix_rank(stacked)
    _, _, right_t = np.linalg.svd(stacked, full_matrices=True)
    return right_t[rank:].T


def unit_eigenvalues(d_distilled, lr):
    """The number of eigenvalues of A = I − (η̃/M) d̃ᵀd̃ equal to 1, and their eigenvectors.

    Since η̃ > 0 and d̃ᵀd̃ ⪰ 0, A v = v exactly when d̃ v = 0: the count equals
    D − rank(d̃ᵀd̃) ≥ D − M.  Counted from the eigenvalues of A (tolerance scaled to
    the rounding error of forming A), independently of :func:`uncorrected_directions`.
    """
    d_distilled = _finite_float64("d_distilled", d_distilled)
    if d_distilled.ndim != 2:
        raise ValueError(f"d_distilled must have shape (M, D); got shape {d_distilled.shape}.")
    lr = _check_lr(lr)
    n_distilled, dim = d_distilled.shape
    gram = (lr / n_distilled) * d_distilled.T @ d_distilled
    eigenvalues, eigenvectors = np.linalg.eigh(np.eye(dim) - gram)
    tolerance = 100 * dim * np.finfo(np.float64).eps * max(1.0, np.linalg.norm(gram, 2))
    is_one = np.abs(eigenvalues - 1) <= tolerance
    return int(is_one.sum()), eigenvectors[:, is_one]


@dataclass
class OneStepCheck:
    """What one (or T) distilled step(s) do to every initialisation at distance r of θ*.

    ``exact`` is True when the worst-case error is below ``tolerance`` (relative to r
    and ‖θ*‖): then every θ0 lands on θ*.
    """

    dim: int  # D, the feature dimension
    n_distilled: int  # M points per step
    n_steps: int  # T
    gram_rank: int  # rank of d̃ᵀd̃ (one step) / of the stacked d̃ (T steps)
    residual_norm: float  # ‖A‖₂, spectral norm of the residual map
    offset_norm: float  # ‖b‖, the error left when θ0 = θ*
    uncorrected: int  # dimension of the never-corrected subspace (≥ D − T·M)
    radius: float  # r = ‖θ0 − θ*‖
    worst_case_error: float  # exact max ‖θ_T − θ*‖ over ‖θ0 − θ*‖ = r
    worst_case_bound: float  # r ‖A‖₂ + ‖b‖ ≥ worst_case_error
    expected_error: float  # E‖θ_T − θ*‖² for θ0 ~ N(θ*, I)
    tolerance: float = 1e-10
    exact: bool = field(init=False)

    def __post_init__(self):
        self.exact = self.worst_case_error <= self.tolerance * max(1.0, self.radius)


def check_distilled(d_distilled, t_distilled, lr, theta_star, radius=1.0, tolerance=1e-10):
    """Check whether (d̃, t̃, η̃) send every θ0 to θ*; see :class:`OneStepCheck`.

    One step: d̃ (M, D), t̃ (M,) or (M, K), scalar η̃.  T steps: (T, M, D), (T, M[, K]), (T,).
    """
    d_steps, t_steps, lrs = _steps_from_args(d_distilled, t_distilled, lr)
    theta_star = _check_theta(theta_star, d_steps.shape[2], t_steps[0], "theta_star")
    residual_map, offset = _affine_error_map(d_steps, t_steps, lrs, theta_star)
    worst, _ = max_error_on_sphere(residual_map, offset, radius)
    n_steps, n_distilled, dim = d_steps.shape
    stacked = d_steps.reshape(-1, dim)
    return OneStepCheck(
        dim=dim,
        n_distilled=n_distilled,
        n_steps=n_steps,
        gram_rank=int(np.linalg.matrix_rank(stacked)),
        residual_norm=float(np.linalg.norm(residual_map, 2)),
        offset_norm=float(np.linalg.norm(offset)),
        uncorrected=uncorrected_directions(d_steps).shape[1],
        radius=float(radius),
        worst_case_error=worst,
        worst_case_bound=float(radius * np.linalg.norm(residual_map, 2) + np.linalg.norm(offset)),
        expected_error=float(_expected_error(d_steps, t_steps, lrs, theta_star)),
        tolerance=tolerance,
    )


# ---------------------------------------------------------------------------------
# Constructions.
# ---------------------------------------------------------------------------------


def random_orthonormal(rng, rows, cols):
    """A (rows, cols) matrix with orthonormal columns (rows ≥ cols) or rows (rows < cols)."""
    tall = rows >= cols
    gaussian = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(gaussian)
    q = q * np.sign(np.diag(r))  # Haar-distributed, not biased by the QR sign convention
    return q if tall else q.T


def construct_distilled(theta_star, n_distilled, lr, rng):
    """d̃ = √(M/η̃) Q,  t̃ = d̃ θ*  with Q an (M, D) random matrix of orthonormal columns or rows.

    M ≥ D: QᵀQ = I, so d̃ᵀd̃ = (M/η̃)·I and b = 0: A = 0, every θ0 lands on θ* in one step.
    M < D: QᵀQ = V Vᵀ, the projector onto M orthonormal directions, so A = I − VVᵀ is the
    projector onto the other D − M: the best one step can do (expected error D − M, the
    floor; worst-case error exactly r).
    """
    theta_star = _finite_float64("theta_star", theta_star)
    lr = _check_lr(lr)
    if int(n_distilled) != n_distilled or n_distilled < 1:
        raise ValueError(f"n_distilled must be a positive integer; got {n_distilled}.")
    dim = theta_star.shape[0]
    d_distilled = np.sqrt(n_distilled / lr) * random_orthonormal(rng, int(n_distilled), dim)
    return d_distilled, d_distilled @ theta_star


def construct_multistep(theta_star, n_steps, n_distilled, lr, rng):
    """T steps of M points whose composition sends θ0 to θ* iff T·M ≥ D.

    Draw one random orthonormal basis q_1 … q_D of ℝ^D.  Step i uses the M directions
    q_{iM+1} … q_{iM+M} (indices mod D, so a block never repeats a direction when M ≤ D):
        d̃_i = √(M/η̃) [q_j]ᵀ,  t̃_i = d̃_i θ*,  so  A_i = I − Σ_j q_j q_jᵀ,
    the projector onto the complement of the block, and b_i = 0.  The product A_T ⋯ A_1
    is the projector onto the directions no block touched: zero when T·M ≥ D, rank
    D − T·M otherwise.  For M ≥ D every step is the one-step exact construction.
    Returns d̃ (T, M, D), t̃ (T, M[, K]) and η̃ (T,).
    """
    theta_star = _finite_float64("theta_star", theta_star)
    lr = _check_lr(lr)
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer; got {n_steps}.")
    if int(n_distilled) != n_distilled or n_distilled < 1:
        raise ValueError(f"n_distilled must be a positive integer; got {n_distilled}.")
    n_steps, n_distilled, dim = int(n_steps), int(n_distilled), theta_star.shape[0]
    if n_distilled >= dim:
        steps = [construct_distilled(theta_star, n_distilled, lr, rng)[0] for _ in range(n_steps)]
        d_steps = np.stack(steps)
    else:
        basis = random_orthonormal(rng, dim, dim)
        blocks = [np.arange(i * n_distilled, (i + 1) * n_distilled) % dim for i in range(n_steps)]
        d_steps = np.stack([np.sqrt(n_distilled / lr) * basis[:, block].T for block in blocks])
    t_steps = np.einsum("tmd,d...->tm...", d_steps, theta_star)
    return d_steps, t_steps, np.full(n_steps, lr)


# ---------------------------------------------------------------------------------
# Learning d̃, t̃, η̃ by gradient descent on the expected error.
# ---------------------------------------------------------------------------------


def inverse_softplus(y):
    """x with softplus(x) = y > 0, elementwise (``ddref.unroll.inverse_softplus`` takes one lr)."""
    y = np.asarray(y, dtype=np.float64)
    return y + np.log(-np.expm1(-y))


def learning_objective(params, theta_star, init_std=1.0):
    """E‖θ_T − θ*‖² as a function of the raw parameters (differentiable with autograd).

    ``params`` is a dict: ``d`` (T, M, D), ``t`` (T, M[, K]) and ``raw_lrs`` (T,) with
    η̃ = softplus(raw_lrs) > 0.
    """
    lrs = softplus(params["raw_lrs"])
    return _expected_error(params["d"], params["t"], lrs, theta_star, init_std)


@dataclass
class LearnedDistillation:
    """d̃ (T, M, D), t̃ (T, M[, K]), η̃ (T,) learned by Adam, and the objective per iteration."""

    d_distilled: np.ndarray
    t_distilled: np.ndarray
    lrs: np.ndarray
    history: np.ndarray  # E‖θ_T − θ*‖² before each Adam step, then after the last one
    floor: float  # the proven lower bound σ² K max(0, D − T·M)

    @property
    def final_error(self):
        return float(self.history[-1])


def initial_params(theta_star, n_distilled, n_steps, rng):
    """Random d̃ ~ N(0, 1), t̃ ~ N(0, 1), and η̃_i = M / (2‖d̃_i‖₂²) so that ‖A_i‖₂ ≤ 1."""
    dim, output_shape = theta_star.shape[0], theta_star.shape[1:]
    d = rng.standard_normal((n_steps, n_distilled, dim))
    t = rng.standard_normal((n_steps, n_distilled) + output_shape)
    lrs = np.array([n_distilled / (2 * np.linalg.norm(d_step, 2) ** 2) for d_step in d])
    return {"d": d, "t": t, "raw_lrs": inverse_softplus(lrs)}


def adam(value_and_gradient, params, n_iters, step_size, final_step_size=None, betas=(0.9, 0.999), eps=1e-12):
    """Minimise with Adam; the step size decays geometrically to ``final_step_size``.

    Returns the final params and the objective before each step and after the last.
    """
    final_step_size = step_size if final_step_size is None else final_step_size
    decay = (final_step_size / step_size) ** (1.0 / max(n_iters - 1, 1))
    first = {k: np.zeros_like(v) for k, v in params.items()}
    second = {k: np.zeros_like(v) for k, v in params.items()}
    history = []
    for it in range(n_iters):
        value, grads = value_and_gradient(params)
        history.append(float(value))
        lr_now = step_size * decay**it
        for k in params:
            first[k] = betas[0] * first[k] + (1 - betas[0]) * grads[k]
            second[k] = betas[1] * second[k] + (1 - betas[1]) * grads[k] ** 2
            m_hat = first[k] / (1 - betas[0] ** (it + 1))
            v_hat = second[k] / (1 - betas[1] ** (it + 1))
            params[k] = params[k] - lr_now * m_hat / (np.sqrt(v_hat) + eps)
    history.append(float(value_and_gradient(params)[0]))
    return params, np.array(history)


def learn_distilled(
    theta_star, n_distilled, rng, n_steps=1, n_iters=1500, step_size=0.1, final_step_size=1e-3, init_std=1.0
):
    """Learn d̃, t̃, η̃ by Adam on E_{θ0 ~ N(θ*, σ²I)} ‖θ_T − θ*‖² = σ²K‖A‖_F² + ‖b‖².

    The objective can never go below σ²K·max(0, D − T·M) (see :func:`expected_error`);
    with T·M ≥ D it can reach 0.
    """
    theta_star = _finite_float64("theta_star", theta_star)
    if theta_star.ndim not in (1, 2):
        raise ValueError(f"theta_star must have shape (D,) or (D, K); got shape {theta_star.shape}.")
    for name, value in (("n_distilled", n_distilled), ("n_steps", n_steps), ("n_iters", n_iters)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value}.")
    params = initial_params(theta_star, int(n_distilled), int(n_steps), rng)
    objective = value_and_grad(lambda p: learning_objective(p, theta_star, init_std))
    params, history = adam(objective, params, int(n_iters), step_size, final_step_size)
    dim = theta_star.shape[0]
    n_outputs = 1 if theta_star.ndim == 1 else theta_star.shape[1]
    return LearnedDistillation(
        d_distilled=params["d"],
        t_distilled=params["t"],
        lrs=np.asarray(softplus(params["raw_lrs"])),
        history=history,
        floor=init_std**2 * n_outputs * max(0, dim - n_steps * n_distilled),
    )


@dataclass
class ErrorCurve:
    """What the learned optimum leaves, for one D and T and each M (the §3.4 transition)."""

    dim: int
    n_steps: int
    n_distilled: np.ndarray  # M values
    expected_error: np.ndarray  # learned E‖θ_T − θ*‖², θ0 ~ N(θ*, I)
    worst_case_error: np.ndarray  # exact max ‖θ_T − θ*‖ over ‖θ0 − θ*‖ = radius
    floor: np.ndarray  # max(0, D − T·M), the proven lower bound on expected_error
    radius: float


def learned_error_curve(dim, n_distilled_values, rng, n_steps=1, radius=1.0, **learn_kwargs):
    """Learn (d̃, t̃, η̃) for each M in ``n_distilled_values`` (θ* ~ N(0, I) drawn from ``rng``)
    and record the expected and worst-case errors after T steps; see :class:`ErrorCurve`.

    ``learn_kwargs`` go to :func:`learn_distilled` (``n_iters``, ``step_size``, ...).
    """
    theta_star = rng.standard_normal(dim)
    expected, worst = [], []
    for n_distilled in n_distilled_values:
        learned = learn_distilled(theta_star, n_distilled, rng, n_steps=n_steps, **learn_kwargs)
        expected.append(learned.final_error)
        worst.append(worst_case_error(learned.d_distilled, learned.t_distilled, learned.lrs, theta_star, radius)[0])
    n_distilled_values = np.asarray(n_distilled_values)
    return ErrorCurve(
        dim=dim,
        n_steps=n_steps,
        n_distilled=n_distilled_values,
        expected_error=np.array(expected),
        worst_case_error=np.array(worst),
        floor=np.maximum(0, dim - n_steps * n_distilled_values).astype(np.float64),
        radius=float(radius),
    )


# ---------------------------------------------------------------------------------
# The same story told by the general machinery of Algorithm 1.
# ---------------------------------------------------------------------------------


@dataclass
class Algorithm1Result:
    """Distilled points learned by :mod:`ddref.engines` (not by the closed forms above),
    as host float64 arrays."""

    d_distilled: np.ndarray   # (M, D)
    t_distilled: np.ndarray   # (M, K), fixed labels as in Algorithm 1
    lr: float
    losses: list = field(default_factory=list)  # E_θ0 ℓ(θ1) on the real data, before each Adam step

    def scaled_singular_values(self):
        """The min(M, D) singular values of √(η̃/M)·d̃.

        All equal 1 exactly when A = I − (η̃/M) d̃ᵀd̃ is the orthogonal projector onto
        null(d̃): for M ≥ D that is A = 0, i.e. d̃ᵀd̃ = (M/η̃)·I; for M < D it is the best a
        step can do — the M directions of d̃'s row space are corrected exactly, the other
        D − M are left alone (A keeps eigenvalue 1 there, whatever d̃).
        """
        n_distilled = self.d_distilled.shape[0]
        return np.linalg.svd(np.sqrt(self.lr / n_distilled) * self.d_distilled, compute_uv=False)

    def residual_norm(self):
        """‖I − (η̃/M) d̃ᵀd̃‖₂: zero exactly when d̃ᵀd̃ = (M/η̃)·I (possible only for M ≥ D)."""
        m, dim = self.d_distilled.shape
        residual = np.eye(dim) - self.lr / m * self.d_distilled.T @ self.d_distilled
        return float(np.linalg.norm(residual, 2))


def expected_one_step_loss(d, t, d_distilled, t_distilled, lr):
    """E_{θ0 ~ N(0, I)} ℓ(θ1) on the real data (d, t): what Algorithm 1 minimises, in closed form.

    θ1 = A θ0 + c with A = I − (η̃/M) d̃ᵀd̃ and c = (η̃/M) d̃ᵀt̃, so for K outputs
        E ‖d θ1 − t‖² = K tr(Aᵀ dᵀd A) + ‖d c − t‖²      (the cross term has mean zero),
    divided by 2N.  d̃ is (M, D); t̃ has the shape of t's rows, (M,) or (M, K).
    """
    d, t = _check_data(d, t)
    d_distilled, t_distilled = _check_data(d_distilled, t_distilled, ("d_distilled", "t_distilled"))
    lr = _check_lr(lr)
    if d_distilled.shape[1] != d.shape[1] or t_distilled.shape[1:] != t.shape[1:]:
        raise ValueError(
            f"d_distilled {d_distilled.shape} and t_distilled {t_distilled.shape} must match the "
            f"features and outputs of d {d.shape} and t {t.shape}."
        )
    n_outputs = 1 if t.ndim == 1 else t.shape[1]
    residual_map = np.eye(d.shape[1]) - lr / len(d_distilled) * d_distilled.T @ d_distilled
    offset = lr / len(d_distilled) * d_distilled.T @ t_distilled
    spread = n_outputs * np.trace(residual_map.T @ d.T @ d @ residual_map)
    return float((spread + np.sum((d @ offset - t) ** 2)) / (2 * len(d)))


def one_step_loss_floor(d, t, n_distilled):
    """The least :func:`expected_one_step_loss` any one step on M points can reach, or a
    lower bound on it for M < D.

    A is the identity on null(d̃), of dimension at least D − M, and leaves the rest of ℝᴰ
    alone, so tr(Aᵀ dᵀd A) ≥ the sum of the D − M smallest eigenvalues of dᵀd; and
    ‖d c − t‖² is at least the least-squares residual ‖d θ* − t‖².  For M ≥ D both terms
    can be met at once (A = 0, c = θ*), and the floor is the least-squares loss itself.
    """
    d, t = _check_data(d, t)
    if int(n_distilled) != n_distilled or n_distilled < 1:
        raise ValueError(f"n_distilled must be a positive integer; got {n_distilled}.")
    n_outputs = 1 if t.ndim == 1 else t.shape[1]
    eigenvalues = np.linalg.eigvalsh(d.T @ d)                  # ascending
    uncorrected = max(0, d.shape[1] - int(n_distilled))
    theta_star, *_ = np.linalg.lstsq(d, t, rcond=None)
    fit = np.sum((d @ theta_star - t) ** 2)
    return float((n_outputs * np.sum(eigenvalues[:uncorrected]) + fit) / (2 * len(d)))


def cubature_inits(dim, n_outputs):
    """The 2·D·K points ±√(D·K)·e_i, as θ0 = {"w": (D, K)} on the selected backend.

    Their mean of any quadratic function of θ0 equals its expectation over θ0 ~ N(0, I)
    exactly.  After one step θ1 is affine in θ0 and the loss quadratic in θ1, so averaging
    the meta-gradient over these points gives the expected meta-gradient over random
    initialisations, without sampling noise.
    """
    size = dim * n_outputs
    eye = backend.xp().eye(size, dtype="float64")
    points = math.sqrt(size) * backend.xp().concatenate([eye, -eye])
    return [{"w": point.reshape(dim, n_outputs)} for point in points]


def side_by_side(inits):
    """P initialisations {"w": (D, K)} as one {"w": (D, P·K)}.

    The columns of a linear model's weights never interact: its squared-error loss is the
    sum of the losses of its column blocks, and so is its gradient (block by block).  Trained
    on targets repeated P times, the wide model *is* P independent models trained side by
    side, and one meta-gradient of it is the sum of their P meta-gradients.
    """
    return {"w": backend.xp().concatenate([theta0["w"] for theta0 in inits], axis=1)}


def fixed_labels(rng, t, n_distilled):
    """Fixed distilled targets t̃ (M, K): N(0, 1) draws, each column rescaled to the
    root-mean-square of the real targets' column (Algorithm 1 keeps labels fixed; one-hot
    labels too share the scale of the real ones).

    The scale matters for M ≥ D: one step is exact only if (η̃/M) d̃ᵀt̃ = θ* with
    d̃ = √(M/η̃)·Q, so the fixed ‖t̃‖ dictates η̃* = M‖θ*‖²/‖t̃‖².  At the real targets'
    scale η̃* ≈ ‖θ*‖² / mean(t²), which is of order one for whitened features; a unit-variance
    draw can ask for η̃* ≈ 40, which Adam approaches only slowly.
    """
    draw = rng.standard_normal((n_distilled, t.shape[1]))
    rms = np.sqrt(np.mean(t**2, axis=0))
    return draw / np.linalg.norm(draw, axis=0) * math.sqrt(n_distilled) * rms


def _check_algorithm1_options(n_distilled, iterations, inits, n_nets, initial_lr, step_size, engine):
    for name, value in (("n_distilled", n_distilled), ("iterations", iterations), ("n_nets", n_nets)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    if inits not in ("cubature", "random"):
        raise ValueError(f"inits must be 'cubature' or 'random'; got {inits!r}.")
    _check_lr(initial_lr, "initial_lr")
    _check_lr(step_size, "step_size")
    if engine not in engines.ENGINES:
        raise ValueError(f"engine must be one of {', '.join(engines.ENGINES)}; got {engine!r}.")


def distill_with_algorithm1(d, t, n_distilled, rng, iterations=1500, inits="cubature", n_nets=4,
                            initial_lr=0.02, step_size=0.03, engine="backgrad"):
    """Distil linear regression with the general code: the ``linear`` model of :mod:`ddref.nn`,
    the squared error as ℓ, one step of :func:`ddref.unroll.unroll`, meta-gradients from
    :func:`ddref.engines.meta_gradient` averaged over initialisations θ0 ~ N(0, I), and
    Adam on (d̃, raw η̃) with step size ``step_size`` and t̃ fixed (:func:`fixed_labels`), as
    Algorithm 1 keeps labels fixed.

    ``inits='cubature'`` averages over :func:`cubature_inits` (the exact expectation);
    ``inits='random'`` draws ``n_nets`` fresh θ0 each iteration, as ``ddref distill`` does.
    The initialisations are trained side by side (:func:`side_by_side`), so each
    iteration takes one meta-gradient.  Arrays live on the selected backend; the result
    comes back to the host.

    For K = 1 output a fixed t̃ is no restriction (η̃ can rescale it), so when M ≥ D the
    learned d̃ reaches d̃ᵀd̃ = (M/η̃)·I; when M < D, A keeps D − M unit eigenvalues on the
    null space of d̃, and the best Algorithm 1 can do is make A the projector onto it.  (With
    a single point, M = 1, the sign of its fixed label can trap Adam in a valley where η̃ → 0;
    two or more points leave d̃ room to turn.)
    """
    _check_algorithm1_options(n_distilled, iterations, inits, n_nets, initial_lr, step_size, engine)
    d, t = _check_data(d, t)
    t = t.reshape(len(t), -1)
    dim, n_outputs = d.shape[1], t.shape[1]
    n_inits = 2 * dim * n_outputs if inits == "cubature" else n_nets
    model = nn.linear((1, 1, dim), n_outputs * n_inits)
    theta0 = side_by_side(cubature_inits(dim, n_outputs)) if inits == "cubature" else None

    x_real = backend.asarray(d.reshape(len(d), 1, 1, dim))
    real_targets = backend.asarray(np.tile(t, (1, n_inits)))
    x = backend.normal(rng, (1, n_distilled, 1, 1, dim))
    t_distilled = fixed_labels(rng, t, n_distilled)
    targets = backend.asarray(np.tile(t_distilled, (1, n_inits)))
    raw_lr = backend.asarray(np.full((1, 1), inverse_softplus(initial_lr)))

    adam = Adam({"x": x, "raw_lr": raw_lr}, lr=step_size, betas=(0.9, 0.999))
    losses = []
    for _ in range(iterations):
        if inits == "random":
            theta0 = model.init(rng, scheme="normal")  # n_nets draws of N(0, I), side by side
        meta = engines.meta_gradient(engine, model.apply, theta0, x, targets, raw_lr,
                                       x_real, real_targets, loss=squared_error)
        updated = adam.step({"x": x, "raw_lr": raw_lr},
                            {"x": meta.grad_x / n_inits, "raw_lr": meta.grad_raw_lrs / n_inits})
        x, raw_lr = updated["x"], updated["raw_lr"]
        losses.append(meta.loss / n_inits)
    return Algorithm1Result(
        backend.to_numpy(x).reshape(n_distilled, dim),
        t_distilled,
        float(backend.to_numpy(softplus(raw_lr))[0, 0]),
        losses,
    )
