"""When one step sends every θ0 to θ*: the M ≥ D theorem, checked and constructed.

θ1 = θ* for every θ0 iff A = 0 and b = 0, i.e. d̃ᵀd̃ = (M/η̃)·I (full rank D, so M ≥ D)
and d̃ᵀt̃ = d̃ᵀd̃ θ*.  For M < D (or T·M < D over T steps) the null space of d̃ (of the
stacked d̃_1 … d̃_T) is never corrected.  :func:`check_distilled` measures all of this for
given (d̃, t̃, η̃); :func:`construct_distilled` and :func:`construct_multistep` build the
exact (or best possible) ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ddref.linear._checks import _check_lr, _check_theta, _finite_float64, _steps_from_args
from ddref.linear.closed_forms import _affine_error_map, _expected_error
from ddref.linear.worst_case import max_error_on_sphere


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
