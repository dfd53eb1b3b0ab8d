"""A strict stand-in for a GPU array library, so the CuPy backend is tested without a GPU.

:class:`FakeArray` wraps a host numpy array and behaves like ``cupy.ndarray`` where it
matters for ddref:

* numpy functions and ufuncs called on it dispatch to it (``__array_function__`` /
  ``__array_ufunc__``) and return FakeArrays, as numpy calls on CuPy arrays return CuPy arrays;
* reductions and scalar indexing give 0-d FakeArrays, never numpy scalars (as CuPy does);
* it refuses implicit conversion to numpy: ``numpy.asarray(fake)`` raises TypeError;
* it refuses host numpy arrays mixed into its operations (TypeError, like CuPy's
  "Unsupported type <class 'numpy.ndarray'>"), so model code that builds a host array with
  ``numpy.zeros(shape)`` fails here as it would on a GPU;
* like CuPy's ``__array_ufunc__`` it declines (NotImplemented) operands it does not know,
  e.g. ``numpy.add.at(a, (slice, slice), b)`` with a tuple index;
* like CuPy's ``reshape``/``ravel`` it refuses ``order=None``;
* like CuPy's ``dot``/``matmul``/``tensordot``/``vdot``/``inner``/``outer`` it refuses Python
  scalars and 0-d host values as operands (``cupy.dot(a, 3.0)`` raises TypeError);
* ``.get()`` copies back to a host numpy array.

It also counts, in :data:`COUNTS`, what a GPU would be asked to do: ``ops`` (every
kernel-like call — a ufunc, a numpy function, a method that computes, a copy, an assignment,
an emulated custom kernel; views such as reshape, transpose and basic slicing are free),
``syncs`` (every device→host read: ``float()``, ``int()``, ``bool()``, ``.item()``,
``.tolist()``, ``.get()``, ``asnumpy``) and ``uploads`` (host→device ``asarray``).  Custom
kernels (``ddref.kernels``) run here through :meth:`FakeNamespace.emulate_kernel`: their
numpy emulation, counted as one op.

``fake_xp`` is the matching namespace (the ``cupy`` module's role): creation functions make
FakeArrays, every other function refuses host arrays and returns FakeArrays.

Everything is computed by numpy, so results must agree with the numpy backend to rounding
(in practice bit for bit).  What the fake cannot show: CuPy kernels' own rounding, CuPy
functions that are missing or differ in signature, memory, speed.
"""

from __future__ import annotations

import numbers

import numpy

HOST_MIXED = ("Unsupported type <class 'numpy.ndarray'>: a host numpy array was mixed into an "
              "operation on device arrays (create arrays with ddref.backend or *_like instead)")
IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
            "Please use `.get()` to construct a NumPy array explicitly.")


class Counts:
    """Device operations, host synchronisations and uploads since the last :meth:`reset`."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.ops = self.syncs = self.uploads = 0

    def snapshot(self):
        return {"ops": self.ops, "syncs": self.syncs, "uploads": self.uploads}


COUNTS = Counts()


def _count_op(result, *inputs):
    """One op, unless ``result`` is a view of one of ``inputs`` (no kernel on a GPU)."""
    raw = result._a if isinstance(result, FakeArray) else result
    if isinstance(raw, numpy.ndarray):
        for x in _flat_arrays(inputs):
            if numpy.may_share_memory(raw, x):
                return
    COUNTS.ops += 1


def _flat_arrays(x):
    if isinstance(x, FakeArray):
        yield x._a
    elif isinstance(x, numpy.ndarray):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _flat_arrays(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from _flat_arrays(item)


def _sync():
    COUNTS.syncs += 1


# CuPy's linear-algebra products take arrays only: cupy.dot(a, 3.0) raises TypeError.
_ARRAYS_ONLY = {numpy.dot, numpy.matmul, numpy.tensordot, numpy.vdot, numpy.inner, numpy.outer}
ARRAYS_ONLY = ("Argument 'b' has incorrect type (expected cupy._core.core._ndarray_base, got {}): "
               "CuPy's dot/matmul/tensordot take device arrays only (multiply by a scalar instead)")


def _refuse_scalars(function, args):
    if function in _ARRAYS_ONLY or getattr(function, "__wrapped__", None) in _ARRAYS_ONLY:
        for x in args[:2]:
            if not isinstance(x, FakeArray):
                raise TypeError(ARRAYS_ONLY.format(type(x).__name__))


def _is_scalar(x):
    return isinstance(x, (bool, numbers.Number, numpy.generic)) and not isinstance(x, numpy.ndarray)


def _refuse_host(x):
    """Raise TypeError if a host numpy array hides anywhere in x (lists, tuples, dicts)."""
    if isinstance(x, numpy.ndarray):
        raise TypeError(HOST_MIXED)
    if isinstance(x, (list, tuple)):
        for item in x:
            _refuse_host(item)
    elif isinstance(x, dict):
        for item in x.values():
            _refuse_host(item)


def _raw(x):
    """The host array inside FakeArrays, recursively through lists / tuples / dicts."""
    if isinstance(x, FakeArray):
        return x._a
    if isinstance(x, list):
        return [_raw(i) for i in x]
    if isinstance(x, tuple):
        return tuple(_raw(i) for i in x)
    if isinstance(x, dict):
        return {k: _raw(v) for k, v in x.items()}
    return x


def _wrap(x):
    """numpy results back onto the fake device: arrays and numpy scalars become FakeArrays."""
    if isinstance(x, numpy.ndarray):
        return FakeArray(x)
    if isinstance(x, numpy.generic):
        return FakeArray(numpy.asarray(x))
    if isinstance(x, list):
        return [_wrap(i) for i in x]
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_wrap(i) for i in x)
    return x


def _check_order(kwargs):
    # CuPy's _normalize_order takes len(order): reshape/ravel with order=None raise TypeError.
    if "order" in kwargs and kwargs["order"] is None:
        raise TypeError("order=None is not accepted by CuPy's reshape/ravel (pass 'C' or omit it)")


class FakeArray:
    """A device array stand-in (see the module docstring)."""

    __slots__ = ("_a",)
    __array_priority__ = 100

    def __init__(self, array):
        if not isinstance(array, numpy.ndarray):
            raise TypeError(f"FakeArray wraps a numpy.ndarray, got {type(array)}")
        self._a = array

    # ------------------------------------------------------------------ strictness

    def __array__(self, dtype=None, copy=None):
        raise TypeError(IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        operands = inputs + (tuple(out) if out else ())
        for x in operands:
            if isinstance(x, numpy.ndarray):
                raise TypeError(HOST_MIXED)
            if not (isinstance(x, FakeArray) or _is_scalar(x)):
                return NotImplemented        # e.g. an autograd ArrayBox, or add.at's tuple index
        if ufunc is numpy.matmul:
            _refuse_scalars(numpy.matmul, inputs)
        if out:
            kwargs["out"] = tuple(_raw(o) for o in out)
        COUNTS.ops += 1
        result = getattr(ufunc, method)(*_raw(inputs), **kwargs)
        if out:
            return out[0] if len(out) == 1 else tuple(out)
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        if any(issubclass(t, numpy.ndarray) for t in types):
            raise TypeError(HOST_MIXED)
        if not all(issubclass(t, FakeArray) for t in types):
            return NotImplemented
        if func in (numpy.reshape, numpy.ravel):
            _check_order(kwargs)
        _refuse_scalars(func, args)
        result = _wrap(func(*_raw(args), **_raw(kwargs)))
        _count_op(result, args, kwargs)
        return result

    # ------------------------------------------------------------------ to and from the host

    def get(self):
        """A host numpy copy (what ``cupy.ndarray.get()`` does): one host synchronisation."""
        _sync()
        return self._a.copy()

    def item(self):
        _sync()
        return self._a.item()

    def tolist(self):
        _sync()
        return self._a.tolist()

    # CuPy allows float(), int() and bool() of a one-element array: each waits for the device.
    def __float__(self):
        _sync()
        return float(self._a)

    def __int__(self):
        _sync()
        return int(self._a)

    def __bool__(self):
        _sync()
        return bool(self._a)

    def __repr__(self):
        return f"FakeArray({self._a!r})"

    __str__ = __repr__

    # ------------------------------------------------------------------ attributes

    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    T = property(lambda self: FakeArray(self._a.T))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (self[i] for i in range(len(self._a)))

    # ------------------------------------------------------------------ indexing

    def __getitem__(self, index):
        # host integer index arrays are accepted, as CuPy accepts them
        index = _raw(index)
        raw = self._a[index]
        if isinstance(raw, numpy.generic):      # a[i, j]: CuPy gives a 0-d view, not a copy
            raw = self._a[(*index, Ellipsis) if isinstance(index, tuple) else (index, Ellipsis)]
        result = _wrap(raw)
        _count_op(result, self)
        return result

    def __setitem__(self, index, value):
        if isinstance(value, numpy.ndarray):
            raise TypeError(HOST_MIXED)
        if not (isinstance(value, FakeArray) or _is_scalar(value)):
            raise TypeError(f"Unsupported type {type(value)}")
        COUNTS.ops += 1
        self._a[_raw(index)] = _raw(value)

    # ------------------------------------------------------------------ methods

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        result = FakeArray(self._a.astype(dtype, order=order, copy=copy))
        _count_op(result, self)
        return result

    def copy(self, order="C"):
        COUNTS.ops += 1
        return FakeArray(self._a.copy(order=order))

    def view(self, dtype=None):
        if isinstance(dtype, type) and issubclass(dtype, numpy.ndarray):
            raise TypeError(f"a device array cannot be viewed as {dtype.__name__} (a host type)")
        return FakeArray(self._a.view() if dtype is None else self._a.view(dtype))

    def reshape(self, *shape, order="C"):
        _check_order({"order": order})
        result = FakeArray(self._a.reshape(*shape, order=order))
        _count_op(result, self)
        return result

    def ravel(self, order="C"):
        _check_order({"order": order})
        result = FakeArray(self._a.ravel(order=order))
        _count_op(result, self)
        return result

    def flatten(self, order="C"):
        COUNTS.ops += 1
        return FakeArray(self._a.flatten(order=order))

    def transpose(self, *axes):
        return FakeArray(self._a.transpose(*axes))

    def fill(self, value):
        if not _is_scalar(value):
            raise TypeError(f"Unsupported type {type(value)}")
        COUNTS.ops += 1
        self._a.fill(value)


def _strict_method(name):
    def method(self, *args, **kwargs):
        _refuse_host(args)
        _refuse_host(kwargs)
        if name == "dot":
            _refuse_scalars(numpy.dot, (self, *args))
        result = _wrap(getattr(self._a, name)(*_raw(args), **_raw(kwargs)))
        _count_op(result, self, args)
        return result

    method.__name__ = name
    return method


for _name in ("sum", "mean", "max", "min", "prod", "argmax", "argmin", "all", "any", "std", "var",
              "cumsum", "clip", "dot", "squeeze", "swapaxes", "repeat", "take", "nonzero",
              "conj", "round"):
    setattr(FakeArray, _name, _strict_method(_name))


def _binary(ufunc, reflected=False):
    if reflected:
        return lambda self, other: ufunc(other, self)
    return lambda self, other: ufunc(self, other)


def _inplace(ufunc):
    def method(self, other):
        ufunc(self, other, out=(self,))
        return self

    return method


for _op, _ufunc in (("add", numpy.add), ("sub", numpy.subtract), ("mul", numpy.multiply),
                    ("truediv", numpy.true_divide), ("floordiv", numpy.floor_divide),
                    ("mod", numpy.remainder), ("pow", numpy.power), ("matmul", numpy.matmul),
                    ("and", numpy.bitwise_and), ("or", numpy.bitwise_or),
                    ("xor", numpy.bitwise_xor)):
    setattr(FakeArray, f"__{_op}__", _binary(_ufunc))
    setattr(FakeArray, f"__r{_op}__", _binary(_ufunc, reflected=True))
    setattr(FakeArray, f"__i{_op}__", _inplace(_ufunc))

for _op, _ufunc in (("eq", numpy.equal), ("ne", numpy.not_equal), ("lt", numpy.less),
                    ("le", numpy.less_equal), ("gt", numpy.greater), ("ge", numpy.greater_equal)):
    setattr(FakeArray, f"__{_op}__", _binary(_ufunc))
FakeArray.__hash__ = None
FakeArray.__neg__ = lambda self: numpy.negative(self)
FakeArray.__pos__ = lambda self: numpy.positive(self)
FakeArray.__abs__ = lambda self: numpy.absolute(self)
FakeArray.__invert__ = lambda self: numpy.invert(self)


# ---------------------------------------------------------------------- the namespace


def _strict(function):
    """A numpy function that takes and returns device arrays and refuses host arrays."""

    def call(*args, **kwargs):
        _refuse_host(args)
        _refuse_host(kwargs)
        if function in (numpy.reshape, numpy.ravel):
            _check_order(kwargs)
        _refuse_scalars(function, args)
        result = _wrap(function(*_raw(args), **_raw(kwargs)))
        if getattr(function, "__name__", "") not in ("empty", "empty_like"):   # allocation only
            _count_op(result, args, kwargs)
        return result

    call.__name__ = getattr(function, "__name__", "function")
    call.__wrapped__ = function
    return call


class _FakeUfunc:
    """A numpy ufunc on the fake device: ``__call__``, ``.at``, ``.reduce``, … are all strict."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        return _strict(self._ufunc)(*args, **kwargs)

    def __getattr__(self, name):
        attribute = getattr(self._ufunc, name)
        return _strict(attribute) if callable(attribute) else attribute


def _from_host(x, dtype=None, copy=None):
    """Explicit transfer to the fake device (cupy.asarray accepts host arrays)."""
    if isinstance(x, FakeArray):
        if dtype is None or numpy.dtype(dtype) == x.dtype:
            return x if not copy else x.copy()
        return x.astype(dtype)
    COUNTS.uploads += 1
    return FakeArray(numpy.array(_raw(x), dtype=dtype))


class FakeNamespace:
    """The ``cupy`` module's stand-in: creation functions make FakeArrays; every other numpy
    function or ufunc is available in a strict form (no host arrays in, device arrays out)."""

    ndarray = FakeArray

    def __init__(self, module=numpy, name="fake_xp"):
        self._module = module
        self.__name__ = name

    def __repr__(self):
        return f"<fake device namespace {self.__name__}>"

    # explicit transfers and creation
    def asarray(self, x, dtype=None, order=None):
        return _from_host(x, dtype)

    def array(self, x, dtype=None, copy=True, order="K", ndmin=0):
        out = _from_host(x, dtype, copy=copy)
        return out if ndmin <= out.ndim else FakeArray(numpy.array(out._a, ndmin=ndmin))

    def asnumpy(self, x):
        return x.get() if isinstance(x, FakeArray) else numpy.asarray(x)

    def emulate_kernel(self, emulation, *args, **kwargs):
        """Run a custom device kernel (``ddref.kernels``) as its numpy emulation: device arrays
        in, device arrays out, counted as one op.  Host arrays are refused, as on a GPU."""
        _refuse_host(args)
        _refuse_host(kwargs)
        COUNTS.ops += 1
        return _wrap(emulation(*_raw(args), **_raw(kwargs)))

    def __getattr__(self, name):
        attribute = getattr(self._module, name)
        if name in ("zeros", "ones", "empty", "full", "arange", "linspace", "eye", "identity",
                    "zeros_like", "ones_like", "empty_like", "full_like", "ascontiguousarray",
                    "stack", "concatenate", "pad", "where"):
            return _strict(attribute)
        if name == "random":
            raise AttributeError("fake_xp has no random module: draw on the host (ddref.backend.rng) "
                                 "and move the values with asarray")
        if isinstance(attribute, numpy.ufunc):
            return _FakeUfunc(attribute)
        if isinstance(attribute, type) or not callable(attribute):
            if type(attribute).__name__ == "module":
                return FakeNamespace(attribute, f"{self.__name__}.{name}")
            return attribute                       # dtypes, constants, newaxis, …
        return _strict(attribute)


fake_xp = FakeNamespace()
