"""Kernel Inducing Points (KIP; Nguyen, Chen & Lee, ICLR 2021, "Dataset Meta-Learning from
Kernel Ridge-Regression").

An infinitely wide network trained to convergence on a support set (X_s, y_s) predicts by
kernel ridge regression with its NTK (or, as a Bayesian posterior mean, its NNGP kernel).
KIP learns the support set so that this regression fits a real target batch (X_t, y_t):

    L_KIP(X_s, y_s) = ½ · mean( ( y_t − K_ts (K_ss + λ · tr(K_ss)/n · I)⁻¹ y_s )² )     (paper eq. 5)

with K_ts = K(X_t, X_s), K_ss = K(X_s, X_s), n = |X_s|.  No network is ever sampled or trained:
the kernel is in closed form, and autograd differentiates the loss through the linear solve to
the support images and, optionally, the support labels ("KIP" and "label solve / LS").

The kernel is that of a fully connected ReLU network of ``depth`` hidden layers in the NTK
parameterisation, weights ~ N(0, σ_w²/fan_in), biases ~ N(0, σ_b²), on flattened inputs of
dimension d (Cho & Saul's arc-cosine kernel of degree 1, in the recursion of Lee et al. 2018
and Jacot et al. 2018 / Arora et al. 2019):

    K¹(x, y) = Θ¹(x, y) = σ_w² ⟨x, y⟩ / d + σ_b²
    cos θ = Kˡ(x, y) / √(Kˡ(x, x) Kˡ(y, y))
    Kˡ⁺¹ = σ_w² · √(Kˡ(x, x) Kˡ(y, y)) / (2π) · (sin θ + (π − θ) cos θ) + σ_b²          (NNGP)
    Θˡ⁺¹ = Kˡ⁺¹ + σ_w² · Θˡ · (π − θ) / (2π)                                           (NTK)

and the network's output kernel is K^{depth+1} (NNGP) or Θ^{depth+1} (NTK).

Numerics: arccos has an infinite slope at ±1, which every diagonal entry (θ = 0) sits on.
J(c) = sin θ + (π − θ) c = √(1 − c²) + (π − arccos c) c has the finite derivative π − arccos c,
so it is one primitive with that derivative; arccos itself (in the NTK's factor) is clipped to
[−1, 1] and given derivative 0 where |c| = 1, the right value on the diagonal (where c ≡ 1
whatever x is) and a subgradient for two coincident points (where θ behaves like |x − y|).
On K(X, X) the diagonal's cosine is set to exactly 1.

The official code (google-research/kip, KIP.ipynb, with neural_tangents.stax) and the choices
here:
- Regularisation λ · tr(K_ss)/n · I, λ = ``reg`` = 1e-6 by default, as the code's
  ``k_ss + |reg| · trace(k_ss) · I / n`` (scale-free: λ is relative to the mean eigenvalue).
- The loss is ½ of the *mean* over target entries (N_t × K) of the squared error, as the code
  (``0.5 * mean((pred − y_target)²)``), not the sum: only the scale of the gradient differs.
- Labels are one-hot rows centred by subtracting 1/K (:func:`one_hot_labels`), as the code's
  ``one_hot(..., center=True)``; ``center=False`` gives plain one-hot.
- Defaults σ_w² = 2, σ_b² = 0.01 (W_std = √2, b_std = 0.1), depth 1, NTK: the code's defaults
  (FC1).  The code standardises images per channel first; that is the data's business here.
- Closed form written out in autograd numpy, instead of neural_tangents' kernel_fn; a dense
  ``solve`` instead of a Cholesky solve (assume_a='pos'); no augmentation.
"""

from __future__ import annotations

import math
import numbers

import autograd.numpy as anp
import numpy as np
from autograd.extend import defvjp, primitive
from autograd.tracer import getval

from ddref import backend

KERNELS = ("ntk", "nngp")

PAPER = {
    "kernel": "ntk",
    "depth": 1,             # FC1: one hidden layer
    "sigma_w2": 2.0,        # W_std = √2
    "sigma_b2": 0.01,       # b_std = 0.1
    "reg": 1e-6,            # λ, relative to tr(K_ss)/n
    "lr": 0.04,             # Adam on the support images (and labels)
    "target_batch": 5000,   # real images per step (class balanced)
    "center_labels": True,
}


# ---------------------------------------------------------------------------- arc-cosine pieces


@primitive
def safe_arccos(c):
    """arccos(c) for c clipped to [−1, 1] (rounding can push a cosine just past ±1)."""
    xp = backend.xp()
    return xp.arccos(xp.clip(c, -1.0, 1.0))


def _safe_arccos_vjp(ans, c):
    inside = anp.abs(c) < 1.0
    slope = 1.0 / anp.sqrt(anp.where(inside, 1.0 - c * c, 1.0))
    return lambda g: anp.where(inside, -g * slope, 0.0)


defvjp(safe_arccos, _safe_arccos_vjp)


@primitive
def arc_cosine_j1(c):
    """J(c) = sin θ + (π − θ) cos θ with θ = arccos c, i.e. √(1 − c²) + (π − arccos c) c:
    Cho & Saul's angular factor of the degree-1 arc-cosine kernel, E[relu(u) relu(v)] =
    √(Kuu Kvv)/(2π) · J(c) for (u, v) Gaussian with correlation c."""
    xp = backend.xp()
    c = xp.clip(c, -1.0, 1.0)
    return xp.sqrt(1.0 - c * c) + (math.pi - xp.arccos(c)) * c


# dJ/dc = −c/√(1−c²) + c/√(1−c²) + (π − arccos c) = π − θ: finite on all of [−1, 1]
defvjp(arc_cosine_j1, lambda ans, c: lambda g: g * (math.pi - safe_arccos(c)))


# ---------------------------------------------------------------------------- the kernels


def _check_kernel_options(depth, sigma_w2, sigma_b2):
    if not isinstance(depth, numbers.Integral) or depth < 1:
        raise ValueError(f"depth={depth!r} must be an integer ≥ 1 (the number of hidden ReLU layers).")
    if not sigma_w2 > 0:
        raise ValueError(f"sigma_w2={sigma_w2!r} (the weight variance σ_w²) must be > 0.")
    if not sigma_b2 >= 0:
        raise ValueError(f"sigma_b2={sigma_b2!r} (the bias variance σ_b²) must be ≥ 0.")


def _flat(x):
    return anp.reshape(x, (x.shape[0], -1))


def nngp_and_ntk(x1, x2=None, depth=PAPER["depth"], sigma_w2=PAPER["sigma_w2"],
                 sigma_b2=PAPER["sigma_b2"]):
    """(K, Θ): the NNGP and NTK matrices (N1, N2) of the infinitely wide fully connected ReLU
    network with ``depth`` hidden layers, between the rows of x1 (N1, …) and x2 (N2, …) (each
    flattened to d features).  ``x2=None`` means x2 = x1 (the symmetric Gram matrix, whose
    diagonal has cos θ = 1 exactly).  Differentiable w.r.t. both inputs."""
    _check_kernel_options(depth, sigma_w2, sigma_b2)
    same = x2 is None
    a = _flat(x1)
    b = a if same else _flat(x2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two sets of inputs have {a.shape[1]} and {b.shape[1]} features; "
                         f"pass images of the same shape.")
    d = a.shape[1]
    k12 = sigma_w2 * (a @ anp.transpose(b)) / d + sigma_b2      # K¹ = Θ¹
    k1 = sigma_w2 * anp.sum(a * a, axis=1) / d + sigma_b2       # K¹(x, x)
    k2 = k1 if same else sigma_w2 * anp.sum(b * b, axis=1) / d + sigma_b2
    if np.any(backend.to_numpy(getval(k1)) <= 0) or np.any(backend.to_numpy(getval(k2)) <= 0):
        raise ValueError("an all-zero input has zero variance under sigma_b2=0, so its angle to "
                         "other inputs is undefined; use sigma_b2 > 0 or drop the zero input.")
    theta_ntk = k12
    eye = backend.xp().eye(k12.shape[0], dtype=getval(k12).dtype) if same else None
    for _ in range(depth):
        scale = anp.sqrt(anp.reshape(k1, (-1, 1)) * anp.reshape(k2, (1, -1)))
        cosine = k12 / scale
        if same:
            cosine = cosine * (1.0 - eye) + eye                  # cos θ(x, x) = 1, no gradient
        k12 = sigma_w2 * scale / (2 * math.pi) * arc_cosine_j1(cosine) + sigma_b2
        theta_ntk = k12 + sigma_w2 * theta_ntk * (math.pi - safe_arccos(cosine)) / (2 * math.pi)
        k1 = sigma_w2 * k1 / 2 + sigma_b2                         # J(1) = π: the diagonal
        k2 = k1 if same else sigma_w2 * k2 / 2 + sigma_b2
    return k12, theta_ntk


def kernel(x1, x2=None, kind=PAPER["kernel"], depth=PAPER["depth"], sigma_w2=PAPER["sigma_w2"],
           sigma_b2=PAPER["sigma_b2"]):
    """The NTK (``kind='ntk'``) or NNGP (``kind='nngp'``) matrix of :func:`nngp_and_ntk`."""
    if kind not in KERNELS:
        raise ValueError(f"unknown kernel {kind!r}: choose one of {', '.join(KERNELS)}.")
    nngp, ntk = nngp_and_ntk(x1, x2, depth, sigma_w2, sigma_b2)
    return ntk if kind == "ntk" else nngp


# ---------------------------------------------------------------------------- regression and loss


def one_hot_labels(labels, num_classes, center=PAPER["center_labels"], dtype="float64"):
    """Integer labels (N,) → one-hot rows (N, K), centred (each entry − 1/K) by default, as KIP."""
    labels = backend.to_numpy(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices of shape (N,), got dtype "
                         f"{labels.dtype} and shape {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}; got {labels.min()}..{labels.max()}.")
    rows = (labels[:, None] == np.arange(num_classes)[None, :]).astype(dtype)
    return backend.asarray(rows - 1.0 / num_classes if center else rows)


def regularised(k_ss, reg=PAPER["reg"]):
    """K_ss + λ · tr(K_ss)/n · I (KIP's scale-free ridge)."""
    if not reg >= 0:
        raise ValueError(f"reg={reg!r} (the ridge λ, relative to tr(K_ss)/n) must be ≥ 0.")
    n = k_ss.shape[0]
    eye = backend.xp().eye(n, dtype=getval(k_ss).dtype)
    return k_ss + reg * anp.trace(k_ss) / n * eye


def _check_support(x_support, y_support, x_other, name):
    if y_support.ndim != 2 or y_support.shape[0] != x_support.shape[0]:
        raise ValueError(f"y_support must be label rows (n, K) for the n = {x_support.shape[0]} "
                         f"support images, got shape {tuple(y_support.shape)}; use one_hot_labels.")
    if tuple(x_other.shape[1:]) != tuple(x_support.shape[1:]):
        raise ValueError(f"{name} images have shape {tuple(x_other.shape[1:])} but the support "
                         f"images {tuple(x_support.shape[1:])}; pass images of one data set.")


def predict(x_support, y_support, x_test, kind=PAPER["kernel"], depth=PAPER["depth"],
            sigma_w2=PAPER["sigma_w2"], sigma_b2=PAPER["sigma_b2"], reg=PAPER["reg"]):
    """Kernel ridge regression from the support set: K_ts (K_ss + λ tr(K_ss)/n I)⁻¹ y_s, (N_t, K).
    The prediction of the infinitely wide network trained to convergence on the support set
    (NTK) or of its Gaussian-process posterior mean (NNGP); arg-max for a class."""
    _check_support(x_support, y_support, x_test, "x_test")
    options = dict(kind=kind, depth=depth, sigma_w2=sigma_w2, sigma_b2=sigma_b2)
    k_ss = kernel(x_support, None, **options)
    k_ts = kernel(x_test, x_support, **options)
    return k_ts @ anp.linalg.solve(regularised(k_ss, reg), y_support)


def kip_loss(x_support, y_support, x_target, y_target, kind=PAPER["kernel"], depth=PAPER["depth"],
             sigma_w2=PAPER["sigma_w2"], sigma_b2=PAPER["sigma_b2"], reg=PAPER["reg"]):
    """L_KIP = ½ · mean((y_t − K_ts (K_ss + λ tr(K_ss)/n I)⁻¹ y_s)²) over the N_t × K entries.

    x_support (n, C, H, W) and y_support (n, K) (rows of :func:`one_hot_labels`, or learned):
    the support set; x_target, y_target (N_t, K): a real batch.  Differentiate w.r.t. x_support
    and y_support with autograd."""
    if y_target.shape[1:] != y_support.shape[1:]:
        raise ValueError(f"y_target has {y_target.shape[1:]} label columns but y_support "
                         f"{y_support.shape[1:]}; build both with one_hot_labels(…, num_classes).")
    residual = y_target - predict(x_support, y_support, x_target, kind, depth, sigma_w2, sigma_b2, reg)
    return 0.5 * anp.sum(residual ** 2) / residual.size
