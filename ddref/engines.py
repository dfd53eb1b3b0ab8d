"""The meta-gradient engines: one registry, one signature.

Every engine computes the same thing — the outer loss L = ℓ_obj(x_real, θ_T) after the inner
loop, and its gradient with respect to the distilled images x̃ and the raw learning rates —
and differs only in what it keeps in memory to walk the inner loop backwards:

    naive       autograd through the whole unroll (the tape keeps every step)
    backgrad    keeps θ_0 … θ_T and goes back with one Hessian-vector product per step
    checkpoint  keeps (θ, v) every ≈ √T steps and re-runs each segment on the way back
    reverse     keeps nothing: runs training backwards exactly (needs momentum > 0)

The inner loop's options are options of the unroll that every engine sees: momentum β
(v ← βv − η̃ g, θ ← θ + v; β = 0 is the paper's gradient descent) and truncation (go back
through the last K steps only, or K steps ending at a random step).

With β = 0 and no truncation, ``naive`` and ``backgrad`` run the plain paths of
:mod:`ddref.hypergrad` (the paper's equations, with the hand-written passes of
:mod:`ddref.fused`, and several networks stacked into one computation for back-gradient):
the same maths as :mod:`ddref.reversible`'s momentum paths at β = 0, which the tests check to
1e-10.  ``specialise=False`` forces the momentum path.
"""

from __future__ import annotations

from dataclasses import dataclass

import autograd.numpy as anp

from ddref import hypergrad, reversible
from ddref.hypergrad import MetaGradient
from ddref.losses import cross_entropy
from ddref.unroll import check_finite, check_schedule


@dataclass(frozen=True)
class Engine:
    """A registry entry: the engine's momentum/truncation path (a function of a
    :class:`ddref.reversible.Window`) and, where it has one, its plain β = 0 path."""

    name: str
    general: object                 # reversible.naive | backgrad | checkpoint | reverse
    plain: object = None            # hypergrad.naive | backgrad, or None
    summary: str = ""


ENGINES = {
    "naive": Engine("naive", reversible.naive, hypergrad.naive,
                    "autograd through the unroll; memory grows with the steps"),
    "backgrad": Engine("backgrad", reversible.backgrad, hypergrad.backgrad,
                       "keeps θ_0 … θ_T, one Hessian-vector product per step back"),
    "checkpoint": Engine("checkpoint", reversible.checkpoint, None,
                         "keeps (θ, v) every ≈ √T steps, re-runs segments on the way back"),
    "reverse": Engine("reverse", reversible.reverse, None,
                      "runs training backwards exactly; needs --momentum > 0"),
}


def check_options(engine, momentum=0.0, truncate=0, window="last", num_steps=None, segment=None,
                  rng=None, wrt_targets=False):
    """One clear ValueError for an engine and inner-loop options that cannot work together,
    before anything is computed.  Returns the registry entry."""
    if engine not in ENGINES:
        raise ValueError(f"unknown meta-gradient engine {engine!r}: choose one of {', '.join(ENGINES)}.")
    reversible.check_options(engine, momentum, truncate, window, num_steps, segment, rng)
    if wrt_targets and not _plain(ENGINES[engine], momentum, truncate, True):
        raise ValueError("the gradient w.r.t. the labels comes from the naive and backgrad engines "
                         "of the plain inner loop: use engine naive or backgrad, without momentum "
                         "or truncation.")
    return ENGINES[engine]


def _plain(spec, momentum, truncate, specialise):
    return specialise and spec.plain is not None and not momentum and not truncate


def meta_gradient(engine, apply, theta0, x_distilled, targets, raw_lrs, x_real, real_targets,
                  loss=cross_entropy, momentum=0.0, truncate=0, window="last", rng=None,
                  segment=None, wrt_targets=False, specialise=True) -> MetaGradient:
    """The outer loss and its gradient w.r.t. (x̃, raw η̃) for one network starting at θ0,
    judged on (x_real, real_targets).  ``loss`` is used inside (training on x̃) and outside.
    ``wrt_targets`` also returns the gradient w.r.t. the inner targets (learned labels);
    with truncation the raw rates outside the window get gradient 0."""
    num_steps = _check_arrays(x_distilled, raw_lrs)
    spec = check_options(engine, momentum, truncate, window, num_steps, segment, rng, wrt_targets)
    if _plain(spec, momentum, truncate, specialise):
        return spec.plain(apply, theta0, x_distilled, targets, raw_lrs, x_real, real_targets, loss,
                          wrt_targets)
    return reversible.meta_gradient(spec.general, apply, theta0, x_distilled, targets, raw_lrs,
                                    x_real, real_targets, loss, momentum, truncate, window, rng,
                                    segment)


def mean_meta_gradient(engine, apply, theta0s, x_distilled, targets, raw_lrs, x_reals, real_targets,
                       loss=cross_entropy, momentum=0.0, truncate=0, window="last", rng=None,
                       segment=None, wrt_targets=False, specialise=True) -> MetaGradient:
    """The meta-gradient averaged over networks: network k starts from ``theta0s[k]`` and is
    judged on ``x_reals[k]`` against ``real_targets[k]`` (random init, §3.3).  Mathematically
    the mean of :func:`meta_gradient` over k; plain back-gradient trains the networks side by
    side as one stacked computation where the model allows it."""
    num_steps = _check_arrays(x_distilled, raw_lrs)
    spec = check_options(engine, momentum, truncate, window, num_steps, segment, rng, wrt_targets)
    if (_plain(spec, momentum, truncate, specialise) and engine == "backgrad" and not wrt_targets
            and len(theta0s) > 1 and hypergrad.stacks(apply, loss)):
        return hypergrad.stacked_backgrad(apply, theta0s, x_distilled, targets, raw_lrs, x_reals,
                                          real_targets, loss)
    meta = [meta_gradient(engine, apply, theta0, x_distilled, targets, raw_lrs, x_real, target,
                          loss, momentum, truncate, window, rng, segment, wrt_targets, specialise)
            for theta0, x_real, target in zip(theta0s, x_reals, real_targets)]
    return mean_of(meta)


def mean_of(meta) -> MetaGradient:
    """The mean of several :class:`MetaGradient` (loss and every gradient)."""
    k = len(meta)
    total_loss, grad_x, grad_raw = 0.0, 0.0, 0.0
    for m in meta:
        total_loss, grad_x, grad_raw = total_loss + m.loss, grad_x + m.grad_x, grad_raw + m.grad_raw_lrs
    grad_targets = None
    if meta[0].grad_targets is not None:
        grad_targets = sum(m.grad_targets for m in meta) / k
    return MetaGradient(total_loss / k, grad_x / k, grad_raw / k, grad_targets)


def _check_arrays(x_distilled, raw_lrs):
    epochs, steps = check_schedule(x_distilled, raw_lrs)
    if not bool(anp.isfinite(x_distilled).all() & anp.isfinite(raw_lrs).all()):   # one host read
        check_finite("the distilled images", x_distilled)
        check_finite("the raw learning rates", raw_lrs)
    return epochs * steps


__all__ = ["ENGINES", "Engine", "MetaGradient", "check_options", "meta_gradient",
           "mean_meta_gradient", "mean_of"]
