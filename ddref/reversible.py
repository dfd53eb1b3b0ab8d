"""Meta-gradients in constant memory: momentum, checkpointing, exact reversal, truncation.

The inner loop with momentum β (β = 0 is the paper's plain gradient descent, bit for bit):

    v_{t+1} = β v_t − η̃_t ∇θ ℓ(x̃_s, θ_t),      θ_{t+1} = θ_t + v_{t+1},      v_0 = 0

Its meta-gradient walks the steps backwards.  With a_θ = ∂L/∂θ_{t+1}, a_v = ∂L/∂v_{t+1}
and w = a_θ + a_v (v_{t+1} reaches L directly and through θ_{t+1}):

    ∂L/∂θ_t  = a_θ − η̃_t Hᵀw          ∂L/∂v_t = β w
    ∂L/∂η̃_t = −⟨g_t, w⟩               ∂L/∂x̃_s += −η̃_t (∂g/∂x̃_s)ᵀ w

so each backward step needs θ_t.  The four engines differ only in how they get it back:

``naive``       autograd through the unroll: every step's activations stay on the tape.
``backgrad``    keeps θ_0 … θ_T:                             memory ~ T copies of θ.
``checkpoint``  keeps (θ, v) every k ≈ √T steps and re-runs each segment on the way
                back:                                          memory ~ 3√T copies, time +1 forward.
``reverse``     keeps nothing: runs training *backwards*, θ_t = θ_{t+1} − v_{t+1} and
                v_t = (v_{t+1} + η̃_t g_t) / β, exactly (Maclaurin, Duvenaud & Adams 2015).

Exact reversal (θ and v on a fixed-point grid, the remainders of each product by β kept
in an exact buffer) lives in :mod:`ddref.fixed_point`.

Truncation (``truncate=K``): back-propagate through the last K steps only (the steps
before are run forward and treated as constants); ``window="random"`` instead ends the
unroll at a random step N ∈ [K, T] and back-propagates through steps N−K … N−1, the outer
loss taken at θ_N, as RaT-BPTT does (Feng, Vedantam & Kempe 2024).  Either is biased;
:func:`compare` measures by how much.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

import autograd.numpy as anp
import numpy as np
from autograd import make_vjp, value_and_grad

from ddref import backend
from ddref.fixed_point import ExactMomentum, RemainderBuffer, ReversalError  # noqa: F401
from ddref.hypergrad import MetaGradient, outer_loss_of_params
from ddref.losses import cross_entropy
from ddref.unroll import check_schedule, inner_grad, softplus, step_schedule

WINDOWS = ("last", "random")
MAX_DENOMINATOR = 1024            # reverse: β = n/d with d ≤ this (the product is exact to n grid points)


# ---------------------------------------------------------------------------- the momentum unroll


def momentum_step(apply, params, velocity, images, targets, lr, momentum, loss=cross_entropy):
    """One step: v ← βv − η g,  θ ← θ + v.  With β = 0 this is θ − η g, bit for bit."""
    g = inner_grad(apply, params, images, targets, loss)
    velocity = {k: momentum * velocity[k] - lr * g[k] for k in params}
    return {k: params[k] + velocity[k] for k in params}, velocity


def zero_velocity(params):
    return {k: anp.zeros_like(p) for k, p in params.items()}


def train(apply, params, velocity, x_distilled, targets, lrs, schedule, momentum, loss=cross_entropy):
    """Run the (epoch, step) pairs of ``schedule`` from (θ, v); returns (θ, v).  Pure, so
    autograd can differentiate it."""
    for e, s in schedule:
        params, velocity = momentum_step(apply, params, velocity, x_distilled[s], targets,
                                         lrs[e, s], momentum, loss)
    return params, velocity


def momentum_unroll(apply, theta0, x_distilled, targets, lrs, momentum=0.0, loss=cross_entropy,
                    return_all=False):
    """Like :func:`ddref.unroll.unroll`, with momentum β; β = 0 gives the same bits."""
    check_momentum(momentum)
    schedule = step_schedule(*check_schedule(x_distilled, lrs))
    params, velocity = theta0, zero_velocity(theta0)
    trajectory = [params]
    for e, s in schedule:
        params, velocity = momentum_step(apply, params, velocity, x_distilled[s], targets,
                                         lrs[e, s], momentum, loss)
        if return_all:
            trajectory.append(params)
    return trajectory if return_all else params


# ---------------------------------------------------------------------------- options


def check_momentum(momentum):
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}; 0 is plain gradient descent, "
                         f"0.9 is usual.")


def momentum_fraction(momentum):
    """β as the exact fraction n/d the reverse engine multiplies by (d ≤ 1024)."""
    if momentum <= 0:
        raise ReversalError(
            "the reverse engine needs momentum > 0: with β = 0 the velocity is forgotten at every "
            "step and training cannot be run backwards; give --momentum 0.9, or use the checkpoint "
            "(or backgrad) engine for plain gradient descent.")
    fraction = Fraction(momentum).limit_denominator(MAX_DENOMINATOR)
    if abs(float(fraction) - momentum) > 1e-12 * momentum:
        raise ReversalError(
            f"momentum {momentum} is not a fraction n/d with d ≤ {MAX_DENOMINATOR}, which the reverse "
            f"engine needs to multiply exactly; round it (e.g. 0.9 = 9/10, 0.95 = 19/20).")
    return fraction.numerator, fraction.denominator


def check_options(engine, momentum, truncate, window, num_steps, segment=None, rng=None):
    """One clear ValueError for inner-loop options that cannot work with ``engine`` (a name of
    :data:`ddref.engines.ENGINES`), before anything is computed."""
    check_momentum(momentum)
    if engine == "reverse":
        momentum_fraction(momentum)
    if truncate is not None and truncate != 0 and not 1 <= truncate <= num_steps:
        raise ValueError(f"truncate must be between 1 and the number of inner steps T = {num_steps} "
                         f"(0: no truncation), got {truncate}.")
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}.")
    if window == "random" and rng is None:
        raise ValueError("window='random' draws the window's end: give rng=numpy.random.default_rng(seed).")
    if segment is not None and segment < 1:
        raise ValueError(f"segment (steps between checkpoints) must be at least 1, got {segment}.")


# ---------------------------------------------------------------------------- the entry point


def meta_gradient(engine, apply, theta0, x_distilled, targets, raw_lrs, x_real, real_targets,
                  loss=cross_entropy, momentum=0.0, truncate=None, window="last", rng=None,
                  segment=None):
    """Outer loss and its gradient w.r.t. (x̃, raw η̃) for the momentum unroll, with
    ``engine`` — one of :func:`naive`, :func:`backgrad`, :func:`checkpoint`, :func:`reverse`
    (chosen by name in :mod:`ddref.engines`) — optionally truncated to ``truncate`` steps.

    segment : checkpoint engine, steps between stored states (default round(√T)).
    Returns :class:`ddref.hypergrad.MetaGradient`; with truncation, the raw learning rates
    outside the window get gradient 0.
    """
    schedule = step_schedule(*check_schedule(x_distilled, raw_lrs))
    check_options(engine.__name__, momentum, truncate, window, len(schedule), segment, rng)
    start, stop = window_bounds(len(schedule), truncate, window, rng)
    lrs = softplus(raw_lrs)
    params, velocity = train(apply, theta0, zero_velocity(theta0), x_distilled, targets, lrs,
                             schedule[:start], momentum, loss)
    problem = Window(apply, x_distilled, targets, lrs, schedule[start:stop], momentum, loss,
                     x_real, real_targets)
    options = {"segment": segment} if engine is checkpoint else {}
    outer_loss, grad_x, grad_lrs = engine(problem, params, velocity, **options)
    return MetaGradient(float(outer_loss), grad_x, grad_lrs * _sigmoid(raw_lrs))


def window_bounds(num_steps, truncate, window="last", rng=None):
    """[start, stop): the steps the meta-gradient goes through.  No truncation: all T;
    'last': the last K; 'random': K steps ending at N drawn uniformly from {K, …, T}."""
    if not truncate:
        return 0, num_steps
    stop = num_steps if window == "last" else int(rng.integers(truncate, num_steps + 1))
    return stop - truncate, stop


@dataclass(frozen=True)
class Window:
    """The steps an engine differentiates through, and everything they need."""

    apply: object
    x_distilled: object
    targets: object
    lrs: object                  # η̃ (E, S), positive
    schedule: list               # the (epoch, step) pairs, in order
    momentum: float
    loss: object
    x_real: object
    real_targets: object

    def step(self, t, params, velocity):
        e, s = self.schedule[t]
        return momentum_step(self.apply, params, velocity, self.x_distilled[s], self.targets,
                             self.lrs[e, s], self.momentum, self.loss)

    def outer(self, params):
        """ℓ_obj at the window's end and its gradient a_θ = ∂L/∂θ_end."""
        return value_and_grad(outer_loss_of_params, 1)(self.apply, params, self.x_real,
                                                        self.real_targets, self.loss)


# ---------------------------------------------------------------------------- the engines


def naive(problem, params, velocity):
    """Autograd through the window's steps."""
    p = problem

    def outer(x_distilled, lrs):
        end, _ = train(p.apply, params, velocity, x_distilled, p.targets, lrs, p.schedule,
                       p.momentum, p.loss)
        return outer_loss_of_params(p.apply, end, p.x_real, p.real_targets, p.loss)

    outer_loss, (grad_x, grad_lrs) = value_and_grad(outer, (0, 1))(p.x_distilled, p.lrs)
    return outer_loss, grad_x, grad_lrs


class Adjoint:
    """The backward pass, one step at a time: a_θ, a_v and the gradients collected so far."""

    def __init__(self, problem, a_theta):
        self.p = problem
        self.a_theta, self.a_v = a_theta, zero_velocity(a_theta)
        self.grad_x_steps = [anp.zeros_like(problem.x_distilled[0])
                             for _ in range(problem.x_distilled.shape[0])]
        self.grad_lrs = anp.zeros_like(problem.lrs)

    def back_through(self, t, params_t):
        """Turn ∂L/∂(θ_{t+1}, v_{t+1}) into ∂L/∂(θ_t, v_t), given θ_t (the module docstring's
        formulas)."""
        p = self.p
        e, s = p.schedule[t]
        lr = p.lrs[e, s]
        w = {k: self.a_theta[k] + self.a_v[k] for k in self.a_theta}
        pull_back, g = make_vjp(_grad_wrt_params_and_images, 0)(
            (params_t, p.x_distilled[s]), p.apply, p.targets, p.loss)
        h_params, h_images = pull_back(w)
        self.grad_lrs[e, s] = -sum(anp.vdot(g[k], w[k]) for k in w)
        self.grad_x_steps[s] = self.grad_x_steps[s] - lr * h_images
        self.a_theta = {k: self.a_theta[k] - lr * h_params[k] for k in w}
        self.a_v = {k: p.momentum * w[k] for k in w}

    def result(self):
        return anp.stack(self.grad_x_steps), self.grad_lrs


def backgrad(problem, params, velocity):
    """Keep θ_t for every step of the window, then one backward step per step."""
    thetas = [params]
    for t in range(len(problem.schedule)):
        params, velocity = problem.step(t, params, velocity)
        thetas.append(params)
    outer_loss, a_theta = problem.outer(thetas.pop())
    adjoint = Adjoint(problem, a_theta)
    for t in reversed(range(len(problem.schedule))):
        adjoint.back_through(t, thetas.pop())
    return (outer_loss, *adjoint.result())


def default_segment(num_steps):
    """k ≈ √T: T/k stored (θ, v) pairs plus k recomputed θ's, ~3√T copies of θ in all."""
    return max(1, round(math.sqrt(num_steps)))


def checkpoint(problem, params, velocity, segment=None):
    """Keep (θ, v) at the start of every segment of k steps; on the way back, re-run each
    segment from its stored state (the same arithmetic, so the same bits) and go back
    through it as backgrad does."""
    num_steps = len(problem.schedule)
    k = segment or default_segment(num_steps)
    stored = []
    for t in range(num_steps):
        if t % k == 0:
            stored.append((params, velocity))
        params, velocity = problem.step(t, params, velocity)
    outer_loss, a_theta = problem.outer(params)
    adjoint = Adjoint(problem, a_theta)
    for first in reversed(range(0, num_steps, k)):
        params, velocity = stored.pop()
        thetas = [params]
        for t in range(first, min(first + k, num_steps) - 1):
            params, velocity = problem.step(t, params, velocity)
            thetas.append(params)
        for t in reversed(range(first, first + len(thetas))):
            adjoint.back_through(t, thetas.pop())
    return (outer_loss, *adjoint.result())


def reverse(problem, params, velocity, trace=None):
    """Train forward on the fixed-point grid, then run training backwards exactly, taking
    each backward step at the recovered θ_t.  ``trace``, when a list, receives the
    :class:`ExactMomentum` state (for inspection: ``recovered_start()``)."""
    p = problem
    n, d = momentum_fraction(p.momentum)
    state = ExactMomentum(params, velocity, n, d)
    for t, (e, s) in enumerate(p.schedule):
        g = inner_grad(p.apply, state.params(), p.x_distilled[s], p.targets, p.loss)
        state.forward(g, p.lrs[e, s], t)
    outer_loss, a_theta = p.outer(state.params())
    adjoint = Adjoint(dataclasses.replace(p, momentum=n / d), a_theta)
    for t in reversed(range(len(p.schedule))):
        e, s = p.schedule[t]
        params_t = state.undo_position()
        g = inner_grad(p.apply, params_t, p.x_distilled[s], p.targets, p.loss)
        state.undo_velocity(g, p.lrs[e, s])
        adjoint.back_through(t, params_t)
    if not state.recovered_start():
        raise ReversalError(
            "the reverse engine did not come back to θ_0 bit for bit: a step's gradient was not "
            "reproducible on the way back (a nondeterministic BLAS or GPU kernel?), so its "
            "meta-gradient cannot be trusted; use --engine checkpoint.")
    if trace is not None:
        trace.append(state)
    return (outer_loss, *adjoint.result())


def _grad_wrt_params_and_images(params_and_images, apply, targets, loss):
    params, images = params_and_images
    return inner_grad(apply, params, images, targets, loss)


def _sigmoid(raw):
    """d softplus / d raw."""
    return 0.5 * (anp.tanh(0.5 * raw) + 1.0)


# ---------------------------------------------------------------------------- measuring truncation


def compare(approx: MetaGradient, exact: MetaGradient):
    """How far a (truncated) meta-gradient is from the exact one: cosine similarity and
    relative error ‖a − e‖ / ‖e‖, for the images, the raw learning rates, and both."""
    def numbers(a, b):
        a = np.ravel(backend.to_numpy(a)).astype(np.float64)
        b = np.ravel(backend.to_numpy(b)).astype(np.float64)
        norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
        cosine = float(a @ b / (norm_a * norm_b)) if norm_a > 0 and norm_b > 0 else 0.0
        return cosine, float(np.linalg.norm(a - b) / max(norm_b, 1e-300))

    both_a = np.concatenate([np.ravel(backend.to_numpy(approx.grad_x)),
                             np.ravel(backend.to_numpy(approx.grad_raw_lrs))])
    both_e = np.concatenate([np.ravel(backend.to_numpy(exact.grad_x)),
                             np.ravel(backend.to_numpy(exact.grad_raw_lrs))])
    out = {}
    for name, a, b in (("images", approx.grad_x, exact.grad_x),
                       ("lrs", approx.grad_raw_lrs, exact.grad_raw_lrs), ("all", both_a, both_e)):
        out[f"cosine_{name}"], out[f"rel_err_{name}"] = numbers(a, b)
    return out
