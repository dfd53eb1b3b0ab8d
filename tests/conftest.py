"""Shared fixtures for the gradient checks: a seeded RNG, a robust relative error and a
central finite difference that notices when its step crosses a jump.

Why the jump check: the networks use ReLU and max-pool, so a loss is only piecewise
smooth, and anything built from a *gradient* (the inner SGD step, hence the whole
unrolled meta-loss, or a gradient compared by finite differences in a Hessian check) is
even discontinuous where a unit switches on/off.  A central difference whose ±eps step
straddles such a switching surface measures the jump, not the derivative.  The helper
therefore walks down a ladder eps, eps/2, eps/4, … and returns the first estimate that
agrees with the next rung (on a smooth piece they agree to ~1e-8; across a jump they
differ wildly), or None when none does.
"""

import os

import numpy as np
import pytest


def _rel_err(a, b, tiny=1e-300):
    """|a − b| / max(|a|, |b|, tiny) for scalars; the same with 2-norms for arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = np.linalg.norm((a - b).ravel())
    den = max(np.linalg.norm(a.ravel()), np.linalg.norm(b.ravel()), tiny)
    return float(num / den)


def _central_fd(g, eps=1e-6, halvings=3, consistency=3e-7):
    """d/dt g(t) at t = 0 by (g(h) − g(−h)) / 2h, for a scalar function g.

    Tries h = eps, eps/2, …, eps/2**halvings and returns the estimate at the largest h whose
    value agrees with the next smaller step to ``consistency`` (relative); ``None`` when no
    such pair exists (the point is too close to a ReLU / max-pool switch to be checked by
    finite differences).  Start with a large eps where rounding matters (a derivative much
    smaller than g itself): a jump only makes the ladder step down.
    """
    def central(h):
        return (float(g(h)) - float(g(-h))) / (2.0 * h)

    previous = central(eps)
    for k in range(1, halvings + 1):
        current = central(eps / 2 ** k)
        if _rel_err(previous, current) < consistency:
            return previous
        previous = current
    return None


@pytest.fixture
def rng():
    """A fresh, seeded host RNG (every test sees the same numbers; DDREF_TEST_SEED=n
    reruns the suite on other numbers)."""
    return np.random.default_rng(int(os.environ.get("DDREF_TEST_SEED", 20181127)))


@pytest.fixture
def rel_err():
    return _rel_err


@pytest.fixture
def central_fd():
    return _central_fd


def _random_directions_check(loss, g, x, rng, tol, eps=1e-5, tries=4, at_least=2):
    """⟨g, v⟩ against a central difference of ``loss`` along random directions v; a direction
    whose step crosses a ReLU switch is skipped, and at least ``at_least`` must be checked."""
    checked = 0
    for _ in range(tries):
        v = rng.normal(size=x.shape)
        fd = _central_fd(lambda t: loss(x + t * v), eps=eps)
        if fd is None:                                    # the step crossed a ReLU switch
            continue
        assert _rel_err(np.sum(g * v), fd) < tol
        checked += 1
    assert checked >= at_least


@pytest.fixture
def directional_check():
    return _random_directions_check


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """A data and pool cache shared by the tests of one module (pools are trained once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cache(shared_cache, monkeypatch):
    """$DDREF_DATA pointing at the module's shared cache."""
    monkeypatch.setenv("DDREF_DATA", str(shared_cache))
    return shared_cache
