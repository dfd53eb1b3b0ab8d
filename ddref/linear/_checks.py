"""Input checks for :mod:`ddref.linear`: each refusal is one sentence naming the fix.

One step takes ``d_distilled`` (M, D), ``t_distilled`` (M,) or (M, K) and a scalar ``lr``;
T steps take (T, M, D), (T, M) or (T, M, K) and ``lrs`` of shape (T,).  Everything comes
back as float64.
"""

from __future__ import annotations

import numpy as np


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
