"""Learning d̃, t̃, η̃ by Adam on the closed-form expected error E‖θ_T − θ*‖².

The objective σ²K‖A‖_F² + ‖b‖² is exact (no sampling) and differentiated by autograd;
it can never go below σ²K·max(0, D − T·M), and :func:`learned_error_curve` records how
close the learned optimum comes, for each M (the §3.4 transition).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from autograd import value_and_grad

from ddref.linear._checks import _finite_float64
from ddref.linear.closed_forms import _expected_error
from ddref.linear.worst_case import worst_case_error
from ddref.unroll import softplus  # log(1 + eˣ): keeps learning rates positive



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
