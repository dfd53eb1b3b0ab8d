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

The package in layers, each module importing only those above it in this list:

    _checks       the input checks (one sentence naming the fix)
    closed_forms  loss, θ*, gradient steps, the error map (A, b), the expected error
    worst_case    the exact worst case over a sphere of initialisations
    exactness     rank, the uncorrected directions, check_distilled, the constructions
    learned       d̃, t̃, η̃ learned by Adam on the closed-form expected error
    algorithm1    the same distillation by the general code of Algorithm 1
"""

from __future__ import annotations

from ddref.linear.closed_forms import (  # noqa: F401
    loss, least_squares_optimum, gradient_step, gradient_steps, affine_error_map, expected_error,
)
from ddref.linear.worst_case import (  # noqa: F401
    max_error_on_sphere, worst_case_error, worst_case_bound,
)
from ddref.linear.exactness import (  # noqa: F401
    uncorrected_directions, unit_eigenvalues, OneStepCheck, check_distilled, random_orthonormal,
    construct_distilled, construct_multistep,
)
from ddref.linear.learned import (  # noqa: F401
    inverse_softplus, learning_objective, LearnedDistillation, initial_params, adam,
    learn_distilled, ErrorCurve, learned_error_curve,
)
from ddref.linear.algorithm1 import (  # noqa: F401
    Algorithm1Result, expected_one_step_loss, one_step_loss_floor, cubature_inits, side_by_side,
    fixed_labels, distill_with_algorithm1,
)
from ddref.unroll import softplus  # noqa: F401  (log(1 + eˣ): keeps learning rates positive)

__all__ = [
    "Algorithm1Result",
    "ErrorCurve",
    "LearnedDistillation",
    "OneStepCheck",
    "adam",
    "affine_error_map",
    "check_distilled",
    "construct_distilled",
    "construct_multistep",
    "cubature_inits",
    "distill_with_algorithm1",
    "expected_error",
    "expected_one_step_loss",
    "fixed_labels",
    "gradient_step",
    "gradient_steps",
    "initial_params",
    "inverse_softplus",
    "learn_distilled",
    "learned_error_curve",
    "learning_objective",
    "least_squares_optimum",
    "loss",
    "max_error_on_sphere",
    "one_step_loss_floor",
    "random_orthonormal",
    "side_by_side",
    "uncorrected_directions",
    "unit_eigenvalues",
    "worst_case_bound",
    "worst_case_error",
]
