"""The array namespace: numpy by default, CuPy optionally.

Model code never calls ``np.zeros(shape)`` directly: it creates arrays through this
module (or with ``*_like`` inside differentiated code), so that the same code runs on
whichever array library is selected.  Randomness always comes from a host
``numpy.random.Generator`` (seeded, so two runs are identical on every backend) and
the values are then moved to the selected device with :func:`asarray`.

    >>> from ddref import backend
    >>> backend.name()
    'numpy'
    >>> x = backend.zeros((2, 3))

Select CuPy with ``backend.use("cupy")`` or the environment variable
``DDREF_BACKEND=cupy`` (needs ``pip install "ddref[gpu]"`` and an NVIDIA GPU); select for a
block only with ``with backend.using("cupy"): ...``.  Nothing here imports CuPy, or the
autograd patches in ``ddref._cupy``, unless CuPy is selected.
"""

from __future__ import annotations

import contextlib
import os

import numpy

from ddref.errors import BackendUnavailable, CupyNotInstalled  # re-exported: backend.BackendUnavailable

_STATE = {"name": "numpy", "xp": numpy}

BACKENDS = ("numpy", "cupy")


def name() -> str:
    """The name of the selected backend: ``'numpy'`` or ``'cupy'``."""
    return _STATE["name"]


def xp():
    """The array namespace of the selected backend (the ``numpy`` or ``cupy`` module)."""
    return _STATE["xp"]


def use(backend_name: str):
    """Select the array backend by name (``'numpy'`` or ``'cupy'``) and return its namespace."""
    if backend_name == "numpy":
        _STATE.update(name="numpy", xp=numpy)
    elif backend_name == "cupy":
        from ddref import _cupy  # imported only here: numpy needs nothing from it

        _STATE.update(name="cupy", xp=_cupy.load())
    else:
        raise ValueError(
            f"unknown backend {backend_name!r}: choose 'numpy' or 'cupy'."
        )
    return _STATE["xp"]


@contextlib.contextmanager
def using(backend_name: str):
    """Select a backend for the duration of a ``with`` block, then restore the previous one."""
    saved = dict(_STATE)
    try:
        yield use(backend_name)
    finally:
        _STATE.clear()
        _STATE.update(saved)


@contextlib.contextmanager
def _using_namespace(backend_name: str, namespace):
    """Testing hook: select an arbitrary array namespace (e.g. the fake device of the tests)
    under ``backend_name`` for a ``with`` block, then restore the previous backend."""
    saved = dict(_STATE)
    try:
        _STATE.update(name=backend_name, xp=namespace)
        yield namespace
    finally:
        _STATE.clear()
        _STATE.update(saved)


def rng(seed) -> numpy.random.Generator:
    """A host random generator. ``seed`` may be an int, None or an existing Generator."""
    if isinstance(seed, numpy.random.Generator):
        return seed
    return numpy.random.default_rng(seed)


def asarray(x, dtype=None):
    """Move ``x`` (host or device) onto the selected backend."""
    return _STATE["xp"].asarray(x, dtype=dtype)


def to_numpy(x) -> numpy.ndarray:
    """A host numpy copy of ``x`` (a no-op for numpy arrays)."""
    if isinstance(x, numpy.ndarray):
        return x
    get = getattr(x, "get", None)  # cupy.ndarray.get() copies device -> host
    return numpy.asarray(get() if get is not None else x)


def zeros(shape, dtype="float64"):
    return _STATE["xp"].zeros(shape, dtype=dtype)


def ones(shape, dtype="float64"):
    return _STATE["xp"].ones(shape, dtype=dtype)


def normal(generator, shape, scale=1.0, dtype="float64"):
    """Samples of N(0, scale²) drawn on the host from ``generator`` then moved to the device."""
    return asarray(generator.normal(0.0, scale, size=shape), dtype=dtype)


def _select_from_environment():
    requested = os.environ.get("DDREF_BACKEND", "numpy").strip().lower()
    if requested and requested != "numpy":
        use(requested)


_select_from_environment()
