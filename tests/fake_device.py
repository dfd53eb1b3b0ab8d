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
* ``.get()`` copies back to a host numpy array.

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
        if out:
            kwargs["out"] = tuple(_raw(o) for o in out)
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
        return _wrap(func(*_raw(args), **_raw(kwargs)))

    # ------------------------------------------------------------------ to and from the host

    def get(self):
        """A host numpy copy (what ``cupy.ndarray.get()`` does)."""
        return self._a.copy()

    def item(self):
        return self._a.item()

    def tolist(self):
        return self._a.tolist()

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
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
        return (_wrap(row) for row in self._a)

    # ------------------------------------------------------------------ indexing

    def __getitem__(self, index):
        # host integer index arrays are accepted, as CuPy accepts them
        return _wrap(self._a[_raw(index)])

    def __setitem__(self, index, value):
        if isinstance(value, numpy.ndarray):
            raise TypeError(HOST_MIXED)
        if not (isinstance(value, FakeArray) or _is_scalar(value)):
            raise TypeError(f"Unsupported type {type(value)}")
        self._a[_raw(index)] = _raw(value)

    # ------------------------------------------------------------------ methods

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        return FakeArray(self._a.astype(dtype, order=order, copy=copy))

    def copy(self, order="C"):
        return FakeArray(self._a.copy(order=order))

    def view(self, dtype=None):
        if isinstance(dtype, type) and issubclass(dtype, numpy.ndarray):
            raise TypeError(f"a device array cannot be viewed as {dtype.__name__} (a host type)")
        return FakeArray(self._a.view() if dtype is None else self._a.view(dtype))

    def reshape(self, *shape, order="C"):
        _check_order({"order": order})
        return FakeArray(self._a.reshape(*shape, order=order))

    def ravel(self, order="C"):
        _check_order({"order": order})
        return FakeArray(self._a.ravel(order=order))

    def flatten(self, order="C"):
        return FakeArray(self._a.flatten(order=order))

    def transpose(self, *axes):
        return FakeArray(self._a.transpose(*axes))

    def fill(self, value):
        if not _is_scalar(value):
            raise TypeError(f"Unsupported type {type(value)}")
        self._a.fill(value)


def _strict_method(name):
    def method(self, *args, **kwargs):
        _refuse_host(args)
        _refuse_host(kwargs)
        return _wrap(getattr(self._a, name)(*_raw(args), **_raw(kwargs)))

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
        return _wrap(function(*_raw(args), **_raw(kwargs)))

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
