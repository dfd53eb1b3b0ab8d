"""CuPy support: teach HIPS autograd (pinned) to differentiate through device arrays.

Imported only by ``ddref.backend.use("cupy")``; the numpy backend never loads this module.

Why anything is needed.  numpy functions called on a CuPy array already dispatch to CuPy
(``__array_function__`` / ``__array_ufunc__``), so ``autograd.numpy`` mostly works on device
arrays unchanged.  What breaks is the handful of places inside autograd that build *host*
arrays or convert to them, which CuPy refuses (no implicit device→host conversion, no host
arrays mixed into device operations, and ``numpy.zeros(shape)`` always makes a host array).

What :func:`install` does, for one device array type and its namespace ``xp``:

1. registers autograd's ``ArrayBox`` for the type, so device arrays can be traced;
2. registers a vector space whose ``zeros``/``ones`` use ``xp`` (autograd's calls ``np.asarray``);
3. replaces the gradient rules that build host arrays or refuse device ones:

   * ``repeat_to_match_shape`` — the helper behind the gradients of sum, mean, max, min,
     prod, var, std — adds ``numpy.zeros(shape)``;
   * the ``dot`` adjoints end with ``numpy.asarray(out, dtype)``, and ``dot`` itself with a
     scalar operand (``anp.dot(x, 3.0)``, also inside its own second-order rules) is a
     TypeError on CuPy, whose ``dot`` takes arrays only: on the device a scalar factor is a
     product ``x * 3.0``;
   * ``where`` builds ``anp.zeros(g.shape)`` on the host;
   * ``concatenate`` views its result as ``numpy.ndarray`` and ``stack`` converts its
     inputs with ``numpy.array``;
   * the ``reshape``/``ravel`` gradients pass ``order=None``, which CuPy's reshape rejects;
   * the indexing gradient (``untake``) accumulates with ``numpy.add.at(A, index, x)``, which
     CuPy's ``__array_ufunc__`` declines for a tuple index (every slice ``x[:, :2]``).

Every replaced rule keeps autograd's own code for host arrays and switches to the device
version only when the value is an array of a registered device type, so numpy results are
bit-for-bit unchanged after :func:`install` (a test checks this).

These are autograd's private internals: the code was written and verified against autograd
``AUTOGRAD_VERSION`` and :func:`install` refuses any other version.  Before bumping the pin,
re-read autograd/numpy/numpy_vjps.py, numpy_wrapper.py and numpy_vspaces.py for rules that
create host arrays and rerun tests/test_backend.py (the fake device catches host arrays).

The same code is applied to the strict fake device of the tests
(``install(fake_xp, FakeArray)``), which is how it is checked without a GPU.
"""

from __future__ import annotations

import importlib.metadata
import math

import autograd.numpy as autograd_numpy
import numpy as onp
from autograd.core import (SparseObject, VSpace, def_linear, defjvp, defvjp, defvjp_argnum,
                           primitive_vjps, vspace)
from autograd.extend import primitive
from autograd.numpy import numpy_vjps, numpy_wrapper as anp
from autograd.numpy.numpy_boxes import ArrayBox
from autograd.numpy.numpy_vspaces import ArrayVSpace, ComplexArrayVSpace
from autograd.tracer import getval
from autograd.util import func

from ddref.errors import BackendUnavailable, CupyNotInstalled

AUTOGRAD_VERSION = "1.9.1"

_DEVICES: dict = {}          # device array type -> its namespace (the cupy module, or a fake)
_PATCHED = False


# ---------------------------------------------------------------------------- entry points


def load():
    """Import CuPy, check that a GPU is there, patch autograd for ``cupy.ndarray``; return cupy."""
    try:
        import cupy
    except ImportError as err:
        raise CupyNotInstalled(
            f'the cupy backend needs CuPy, which could not be imported ({_first_line(err)}); '
            f'install it with `pip install "ddref[gpu]"` or use the numpy backend.') from err
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:                      # CUDARuntimeError without a driver or device
        raise BackendUnavailable(
            f"CuPy is installed but found no usable CUDA GPU ({_first_line(err)}); run on a machine with an "
            f"NVIDIA GPU or use the numpy backend.") from err
    if devices < 1:
        raise BackendUnavailable(
            "CuPy is installed but found no CUDA GPU; run on a machine with an NVIDIA GPU or use "
            "the numpy backend.")
    install(cupy, cupy.ndarray)
    return cupy


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def autograd_version() -> str:
    return importlib.metadata.version("autograd")


def install(xp, ndarray_type):
    """Let autograd trace and differentiate arrays of ``ndarray_type`` whose functions live in
    the namespace ``xp`` (``install(cupy, cupy.ndarray)``).  Idempotent."""
    found = autograd_version()
    if found != AUTOGRAD_VERSION:
        raise BackendUnavailable(
            f"the cupy backend patches autograd {AUTOGRAD_VERSION} internals but autograd {found} "
            f"is installed; install autograd=={AUTOGRAD_VERSION} (or re-verify ddref/_cupy.py "
            f"against {found} before changing the pin).")
    _DEVICES[ndarray_type] = xp
    ArrayBox.register(ndarray_type)
    VSpace.register(ndarray_type, _device_vspace)
    global _PATCHED
    if not _PATCHED:
        _patch_autograd()
        _PATCHED = True


def installed_types():
    """The device array types autograd has been taught so far."""
    return tuple(_DEVICES)


def _namespace(*values):
    """The namespace of the first value (boxed or not) that is a device array, else None."""
    for value in values:
        xp = _DEVICES.get(type(getval(value)))
        if xp is not None:
            return xp
    return None


# ---------------------------------------------------------------------------- vector spaces


class _DeviceVSpace(ArrayVSpace):
    """autograd's ArrayVSpace with zeros and ones made on the device."""

    def __init__(self, value, xp):
        self.shape = value.shape
        self.dtype = value.dtype
        self.xp = xp

    @property
    def size(self):
        return math.prod(self.shape)

    def zeros(self):
        return self.xp.zeros(self.shape, dtype=self.dtype)

    def ones(self):
        return self.xp.ones(self.shape, dtype=self.dtype)

    def standard_basis(self):
        for index in onp.ndindex(*self.shape):
            vector = self.zeros()
            vector[index] = 1
            yield vector

    def randn(self):
        return self.xp.asarray(onp.random.randn(*self.shape)).astype(self.dtype)

    def _inner_prod(self, x, y):
        return self.xp.dot(self.xp.ravel(x), self.xp.ravel(y))


class _DeviceComplexVSpace(_DeviceVSpace, ComplexArrayVSpace):
    iscomplex = True

    @property
    def size(self):
        return 2 * math.prod(self.shape)

    def ones(self):
        return self.xp.ones(self.shape, dtype=self.dtype) * (1 + 1j)

    def standard_basis(self):
        for index in onp.ndindex(*self.shape):
            for unit in (1.0, 1.0j):
                vector = self.zeros()
                vector[index] = unit
                yield vector

    def randn(self):
        real = self.xp.asarray(onp.random.randn(*self.shape))
        imag = self.xp.asarray(onp.random.randn(*self.shape))
        return (real + 1j * imag).astype(self.dtype)

    def _inner_prod(self, x, y):
        return self.xp.real(self.xp.dot(self.xp.conj(self.xp.ravel(x)), self.xp.ravel(y)))

    def _covector(self, x):
        return self.xp.conj(x)


def _device_vspace(value):
    xp = _DEVICES[type(value)]
    space = _DeviceComplexVSpace if value.dtype.kind == "c" else _DeviceVSpace
    return space(value, xp)


# ---------------------------------------------------------------------------- gradient rules


_HOST_VJPS: dict = {}         # primitive -> autograd's own VJP rule, kept for host arrays


def _on_device(fun, *vjpmakers, **kwargs):
    """Give primitive ``fun`` the VJPs ``vjpmakers`` (as in ``defvjp``) when its output or an
    argument is a device array; autograd's own rule stays in charge of host arrays."""
    host = _HOST_VJPS[fun] = primitive_vjps[fun]
    defvjp(fun, *vjpmakers, **kwargs)
    device = primitive_vjps[fun]

    def vjp_argnums(argnums, ans, args, kw):
        rule = device if _namespace(ans, *args) is not None else host
        return rule(argnums, ans, args, kw)

    primitive_vjps[fun] = vjp_argnums


# -- sum, mean, max, min, prod, var, std: autograd adds host zeros to broadcast g back


_host_repeat_to_match_shape = numpy_vjps.repeat_to_match_shape


def _repeat_to_match_shape(g, shape, dtype, axis, keepdims):
    xp = _namespace(g)
    if xp is None or shape == ():
        return _host_repeat_to_match_shape(g, shape, dtype, axis, keepdims)
    axis = list(axis) if isinstance(axis, tuple) else axis
    new_shape = onp.array(shape)
    new_shape[axis] = 1
    num_reps = onp.prod(onp.array(shape)[axis])
    kept = tuple(int(n) for n in new_shape)
    return anp.reshape(g, kept) + xp.zeros(shape, dtype=dtype), num_reps


# -- dot: the adjoints finish with numpy.asarray(out, dtype)


@primitive
def _dot_adjoint_0(B, G, A_meta, B_meta):
    """The adjoint of A ↦ dot(A, B), as autograd's dot_adjoint_0 but on the device."""
    xp = _namespace(B, G)
    _, A_ndim, A_dtype, _ = A_meta
    _, B_ndim, _, _ = B_meta
    if B_ndim == 0:
        out = G * B
    elif B_ndim == 1 or A_ndim == 0:
        out = xp.tensordot(G, B, max(0, B_ndim - (A_ndim != 0)))
    else:
        out = xp.tensordot(G, xp.swapaxes(B, -1, -2), B_ndim - 1)
    return xp.asarray(out, dtype=A_dtype)


@primitive
def _dot_adjoint_1(A, G, A_meta, B_meta):
    """The adjoint of B ↦ dot(A, B), as autograd's dot_adjoint_1 but on the device."""
    xp = _namespace(A, G)
    _, A_ndim, _, _ = A_meta
    _, B_ndim, B_dtype, _ = B_meta
    if A_ndim == 0:
        out = G * A
    else:
        swap = (lambda x: xp.swapaxes(x, -1, -2)) if B_ndim > 1 else (lambda x: x)
        if A_ndim == 1 or B_ndim == 0:
            out = swap(xp.tensordot(G, A, max(0, A_ndim - (B_ndim != 0))))
        else:
            axes = [list(range(-A_ndim - B_ndim + 2, -B_ndim + 1)), list(range(A_ndim - 1))]
            out = swap(xp.tensordot(G, A, axes))
    return xp.asarray(out, dtype=B_dtype)


_host_dot = anp.dot


def _dot(a, b):
    """anp.dot; on the device a scalar operand makes it the product a · b (CuPy's dot refuses it)."""
    if _namespace(a, b) is not None and (anp.ndim(a) == 0 or anp.ndim(b) == 0):
        return anp.multiply(a, b)
    return _host_dot(a, b)


def _dot_vjp_0(ans, A, B):
    A_meta, B_meta = anp.metadata(A), anp.metadata(B)
    return lambda g: numpy_vjps.match_complex(A, _dot_adjoint_0(B, g, A_meta, B_meta))


def _dot_vjp_1(ans, A, B):
    A_meta, B_meta = anp.metadata(A), anp.metadata(B)
    return lambda g: numpy_vjps.match_complex(B, _dot_adjoint_1(A, g, A_meta, B_meta))


# -- reshape / ravel: autograd passes order=None, CuPy's reshape wants a string


def _reshape_like(x, order):
    x_shape = anp.shape(x)
    if order is None:
        return lambda g: anp.reshape(g, x_shape)
    return lambda g: anp.reshape(g, x_shape, order=order)


# -- indexing: autograd accumulates with numpy.add.at, which CuPy declines for tuple indices


def _is_basic_index(index):
    items = index if isinstance(index, tuple) else (index,)
    return all(item is None or item is Ellipsis or isinstance(item, slice)
               or (isinstance(item, (int, onp.integer)) and not isinstance(item, (bool, onp.bool_)))
               for item in items)


@primitive
def _untake(x, index, vs):
    """The adjoint of A ↦ A[index] on the device: a sparse 'add x at index' into zeros."""

    def mut_add(A):
        if _is_basic_index(index):     # a view: no repeated positions, plain in-place add
            A[index] += x
        else:
            vs.xp.add.at(A, index, x)
        return A

    return SparseObject(vs, mut_add)


# -- concatenate / stack


_host_concatenate = anp.concatenate
_host_stack = anp.stack


@primitive
def _concatenate_on_device(axis, *arrays):
    return _namespace(*arrays).concatenate(arrays, axis)


def _concatenate(arr_list, axis=0):
    """anp.concatenate, with device arrays joined by the device namespace."""
    arrays = tuple(arr_list)
    if _namespace(*arrays) is None:
        return _host_concatenate(arrays, axis)
    return _concatenate_on_device(axis, *arrays)


def _stack(arrays, axis=0):
    """anp.stack (autograd's own code, built on concatenate), without its numpy.array
    conversion of the inputs, for device arrays."""
    arrays = list(arrays)
    if _namespace(*arrays) is None:
        return _host_stack(arrays, axis)
    if len({anp.shape(a) for a in arrays}) != 1:
        raise ValueError("all input arrays must have the same shape")
    result_ndim = anp.ndim(arrays[0]) + 1
    if not -result_ndim <= axis < result_ndim:
        raise IndexError(f"axis {axis} out of bounds [-{result_ndim}, {result_ndim})")
    if axis < 0:
        axis += result_ndim
    index = (slice(None),) * axis + (None,)
    return _concatenate([a[index] for a in arrays], axis=axis)


# ---------------------------------------------------------------------------- installing


def _patch_autograd():
    numpy_vjps.repeat_to_match_shape = _repeat_to_match_shape

    defvjp(_dot_adjoint_0,
           lambda ans, B, g, An, Bn: lambda A: numpy_vjps.match_complex(B, _dot_adjoint_1(A, g, An, Bn)),
           lambda ans, B, g, An, Bn: lambda A: numpy_vjps.match_complex(g, anp.dot(A, B)))
    defvjp(_dot_adjoint_1,
           lambda ans, A, g, An, Bn: lambda B: numpy_vjps.match_complex(A, _dot_adjoint_0(B, g, An, Bn)),
           lambda ans, A, g, An, Bn: lambda B: numpy_vjps.match_complex(g, anp.dot(A, B)))
    def_linear(_dot_adjoint_0)
    def_linear(_dot_adjoint_1)
    _on_device(anp.dot, _dot_vjp_0, _dot_vjp_1)
    for module in (anp, autograd_numpy):
        module.dot = _dot

    # the where primitive (autograd.numpy wraps it in custom_where after registering its VJP)
    _on_device(autograd_numpy._original_where, None,
               lambda ans, c, x=None, y=None: lambda g: anp.where(c, g, _namespace(ans).zeros(anp.shape(g))),
               lambda ans, c, x=None, y=None: lambda g: anp.where(c, _namespace(ans).zeros(anp.shape(g)), g))

    _on_device(anp.reshape, lambda ans, x, shape, order=None: _reshape_like(x, order))
    _on_device(anp.ravel, lambda ans, x, order=None: _reshape_like(x, order))

    defvjp(_untake, lambda ans, x, index, _: lambda g: g[index])
    defjvp(_untake, "same")
    _on_device(func(ArrayBox.__getitem__), lambda ans, A, index: lambda g: _untake(g, index, vspace(A)))

    defvjp_argnum(_concatenate_on_device, numpy_vjps.grad_concatenate_args)
    for module in (anp, autograd_numpy):
        module.concatenate = _concatenate
        module.stack = _stack
