"""The same story told by the general machinery of Algorithm 1.

:func:`distill_with_algorithm1` distils linear regression with the code every network
uses (:mod:`ddref.nn`, :mod:`ddref.unroll`, :mod:`ddref.engines`, Adam), and
:func:`expected_one_step_loss` / :func:`one_step_loss_floor` give, in closed form, what
it minimises and the least it can reach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ddref import backend, engines, nn
from ddref.linear._checks import _check_data, _check_lr
from ddref.linear.learned import inverse_softplus
from ddref.losses import squared_error
from ddref.optim import Adam
from ddref.unroll import softplus  # log(1 + eˣ): keeps learning rates positive



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
