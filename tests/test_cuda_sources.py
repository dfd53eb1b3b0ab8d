"""The CUDA sources of ddref.cuda_kernels, compiled and run without a GPU.

A kernel body is C++ apart from its frame, so each is compiled here (g++) as a host function
that loops ``for (long long i = 0; i < size; ++i) { body }`` with the semantics of
``cupy.ElementwiseKernel``: a ``raw T x`` parameter is an array the body indexes (every
index checked here: one outside the array is an IndexError, not a crash); a non-raw one is
element i of its array, broadcast to the loop's shape (``const T x`` for an input, ``T& x``
for an output); ``int32`` and ``bool`` parameters are passed by value; ``T`` is double.

:class:`HostCupy`, a stand-in for the ``cupy`` module (numpy arrays; its ``ElementwiseKernel``
runs the compiled function), is then selected as the backend, so that ``ddref.kernels`` calls
the real launchers of ``cuda_kernels.LAUNCHERS`` as it does on a GPU, and the checks of
tests/test_fused.py compare every kernel with the numpy path to 1e-10 in float64.  A bug
planted in a source makes them fail.  Where nvcc is on PATH, every kernel is also compiled as
a ``__global__`` function to PTX (no GPU needed), so CUDA-only compile errors show.

Not shown here: a GPU's rounding, CuPy's own kernel wrapper (its argument rules are imitated,
not run), NVRTC, speed.
"""

import ctypes
import numbers
import shutil
import subprocess

import numpy as np
import pytest

import test_fused
from ddref import backend, cuda_kernels, kernels

if shutil.which("g++") is None:
    pytest.skip("g++ is not on PATH: the CUDA kernel bodies are compiled as host C++ here",
                allow_module_level=True)

HOST_PRELUDE = """#include <cmath>
typedef double T;
using std::exp; using std::log;                  /* built into CUDA device code */
template <class A> static inline A min(A a, A b) { return b < a ? b : a; }
extern "C" { long long out_of_bounds = 0; }
template <class E> struct Raw {                  /* a raw parameter (CuPy's CArray), indices checked */
  E* data; long long size;
  E& operator[](long long k) const {
    static T spare;
    if (k >= 0 && k < size) return data[k];
    ++out_of_bounds; return spare;
  }
};
"""
HOST_LOOP = "for (long long i = 0; i < size; ++i)"
CUDA_LOOP = ("for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size;"
             " i += (long long)blockDim.x * gridDim.x)")
SCALARS = {"int32": ("int", ctypes.c_int), "bool": ("bool", ctypes.c_bool)}


def parameters(spec):
    """[(raw, type, name)] of an ElementwiseKernel parameter list such as "raw T x, int32 n"."""
    return [(words[0] == "raw", words[-2], words[-1]) for words in (p.split() for p in spec.split(","))]


def translation_unit(sources, cuda=False):
    """One extern "C" function ddref_<name>(long long size, parameters…) per kernel.  On the host
    a raw parameter is a pointer and its size, every index checked; raw inputs are const: a
    kernel must not write its inputs."""
    functions = []
    for name, (ins, outs, body) in sources.items():
        inputs = parameters(ins)
        args, setup, bind = ["long long size"], [], []
        for k, (raw, kind, var) in enumerate(inputs + parameters(outs)):
            const = "const " if k < len(inputs) else ""
            if kind in SCALARS:
                args.append(f"{SCALARS[kind][0]} {var}")
            elif raw and cuda:
                args.append(f"{const}T* {var}")
            elif raw:                                       # the body indexes it
                args += [f"{const}T* {var}_data", f"long long {var}_size"]
                setup.append(f"Raw<{const}T> {var} = {{{var}_data, {var}_size}};")
            else:                                           # the body sees element i
                args.append(f"{const}T* {var}_ptr")
                bind.append(f"{'const T' if const else 'T&'} {var} = {var}_ptr[i];")
        functions.append(f"{'__global__ ' if cuda else ''}void ddref_{name}({', '.join(args)}) {{\n"
                         f"  {' '.join(setup)}\n  {CUDA_LOOP if cuda else HOST_LOOP} {{\n"
                         f"    {' '.join(bind)}{body}\n  }}\n}}")
    prelude = "typedef double T;\n" if cuda else HOST_PRELUDE
    return prelude + 'extern "C" {\n' + "\n".join(functions) + "\n}\n"


def compile_host(sources, directory):
    """{name: (its source, the compiled ctypes function)} for a dict like cuda_kernels.SOURCES."""
    (directory / "kernels.cpp").write_text(translation_unit(sources))
    result = subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-o",
                             str(directory / "kernels.so"), str(directory / "kernels.cpp")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    library = ctypes.CDLL(str(directory / "kernels.so"))
    compiled = {}
    for name, source in sources.items():
        function = getattr(library, f"ddref_{name}")
        function.restype, function.argtypes = None, [ctypes.c_longlong]
        for raw, kind, _ in parameters(source[0] + "," + source[1]):
            function.argtypes += [SCALARS[kind][1]] if kind in SCALARS else \
                [ctypes.c_void_p, ctypes.c_longlong] if raw else [ctypes.c_void_p]
        function.out_of_bounds = ctypes.c_longlong.in_dll(library, "out_of_bounds")
        compiled[name] = source, function
    return compiled


class HostCupy:
    """What the launchers use of the ``cupy`` module, on numpy arrays.  ``empty`` is filled with
    NaN, as uninitialised device memory may hold anything."""

    zeros = staticmethod(np.zeros)
    ascontiguousarray = staticmethod(np.ascontiguousarray)
    sum = staticmethod(np.sum)

    def __init__(self, compiled):
        self.compiled = compiled

    @staticmethod
    def empty(shape, dtype=np.float64):
        return np.full(shape, np.nan, dtype=dtype)

    def empty_like(self, a):
        return self.empty(a.shape, a.dtype)

    def ElementwiseKernel(self, in_params, out_params, body, name):
        source, function = self.compiled[name.removeprefix("ddref_")]
        if source != (in_params, out_params, body):
            raise LookupError(f"{name}: not the source compiled for this test")
        return lambda *args: launch(function, parameters(in_params), parameters(out_params), args)


def launch(function, inputs, outputs, args):
    """Run a compiled kernel under cupy.ElementwiseKernel's rules: the loop's shape is the
    broadcast of the non-raw arrays (inputs and given outputs; a non-raw output must have it),
    outputs not given are allocated with it (a raw one cannot be), one dtype for every T array,
    int32 / bool scalars; return the outputs (one, or a tuple)."""
    params = inputs + outputs
    if len(args) not in (len(inputs), len(params)):
        raise TypeError(f"{len(args)} arguments for {len(inputs)} inputs and {len(outputs)} outputs")
    args = list(args) + [None] * (len(params) - len(args))
    if {a.dtype for (_, kind, _), a in zip(params, args) if kind == "T" and isinstance(a, np.ndarray)} \
            != {np.dtype(np.float64)}:
        raise TypeError("every T array must be float64 here")
    shape = np.broadcast_shapes(*(np.shape(a) for (raw, kind, _), a in zip(params, args)
                                  if kind == "T" and not raw and a is not None))
    held, call = [], []
    for k, ((raw, kind, var), a) in enumerate(zip(params, args)):
        if kind == "int32" and (isinstance(a, bool) or not isinstance(a, numbers.Integral)) or \
                kind == "bool" and not isinstance(a, bool):
            raise TypeError(f"{var}: {kind} expected, got {type(a).__name__}")
        if kind == "T" and k >= len(inputs):                 # an output, written in place
            if a is None and raw:
                raise ValueError(f"{var}: a raw output must be given (its size is undecided)")
            a = args[k] = np.full(shape, np.nan) if a is None else a
            if not a.flags.c_contiguous or not raw and a.shape != shape:
                raise ValueError(f"{var}: output of shape {a.shape}, loop shape {shape}")
        elif kind == "T":
            a = np.ascontiguousarray(a if raw else np.broadcast_to(a, shape), dtype=np.float64)
        held.append(a)                                       # alive until the call returns
        call += [a] if kind in SCALARS else [a.ctypes.data, a.size] if raw else [a.ctypes.data]
    function.out_of_bounds.value = 0
    function(int(np.prod(shape)), *call)
    if function.out_of_bounds.value:
        raise IndexError(f"{function.out_of_bounds.value} raw reads or writes out of bounds")
    return args[len(inputs)] if len(outputs) == 1 else tuple(args[len(inputs):])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_host(cuda_kernels.SOURCES, tmp_path_factory.mktemp("cuda_sources"))


def runner(compiled, monkeypatch):
    """run(function, *args): function(*args) with HostCupy as the backend (numpy in and out)."""
    monkeypatch.setattr(cuda_kernels, "_COMPILED", {})    # launchers build their kernels afresh
    host = HostCupy(compiled)

    def run(function, *args):
        with backend._using_namespace("cupy-sources-on-host", host):
            return function(*args)
    return run


@pytest.fixture
def on_host(compiled, monkeypatch):
    return runner(compiled, monkeypatch)


# The checks of the emulated kernels in tests/test_fused.py, run here on the compiled sources.
PATCHES, POOL, ELEMENT_WISE = (test_fused.test_emulated_patch_kernels_agree_with_numpy,
                               test_fused.test_emulated_pool_kernels_agree_with_numpy,
                               test_fused.test_emulated_element_wise_kernels_agree_with_numpy)


@pytest.mark.parametrize("h, w, pad", [(28, 28, 2), (10, 10, 0), (9, 7, 1)])
def test_patch_kernels_agree_with_numpy(on_host, rng, rel_err, h, w, pad):
    PATCHES(on_host, rng, rel_err, h, w, pad)          # 5×3 kernel, N = 2


@pytest.mark.parametrize("ho, wo", [(10, 10), (9, 7)])
def test_pool_kernels_agree_with_numpy(on_host, rng, rel_err, ho, wo):
    POOL(on_host, rng, rel_err, ho, wo)                # tied maxima, exact zeros, bias in the kernel


def test_element_wise_kernels_agree_with_numpy(on_host, rng, rel_err):
    ELEMENT_WISE(on_host, rng, rel_err)


@pytest.mark.parametrize("ho, wo", [(10, 10), (9, 7)])
def test_pool_route_is_the_emulations(on_host, rng, rel_err, ho, wo):
    """The device route itself (hit laid out like z, 0 in cropped rows; scale), without a bias."""
    z_shape = (3, ho, wo, 2)
    z = test_fused._ties(rng, (3, ho * wo * 2))
    out, (hit, scale) = on_host(kernels.pool_relu, z, z_shape)
    want_out, (want_hit, want_scale) = kernels._emulate_pool(z, np.zeros(3), z_shape)
    for got, want in [(out, want_out), (hit, want_hit), (scale, want_scale)]:
        assert got.shape == want.shape and rel_err(got, want) < test_fused.AGREE


MUTANTS = {                      # kernel: (text of its source, a plausible bug in its place)
    "patches": ("oy + di - pad, xx = ox + dj - pad", "oy + dj - pad, xx = ox + di - pad"),
    "patches_adjoint": ("int oy = y + pad - di;", "int oy = y - pad + di;"),
    "pool": ("hit[k + right] = hb; hit[k + down] = hc;", "hit[k + right] = hc; hit[k + down] = hb;"),
    "unpool": ("min(y / 2, hp - 1), q = min(x / 2,", "min(x / 2, hp - 1), q = min(y / 2,"),
    "pool_tangent": ("zd[k + down] * hit[k + down]", "zd[k + down] * hit[k + right]"),
    "xent": ("t[o + c]) / n;", "t[o + c]) / k;"),
}
CHECKS = {"patches": (PATCHES, (10, 10, 0)), "patches_adjoint": (PATCHES, (9, 7, 1)),
          "pool": (POOL, (9, 7)), "unpool": (POOL, (9, 7)), "pool_tangent": (POOL, (10, 10)),
          "xent": (ELEMENT_WISE, ())}


@pytest.mark.parametrize("kernel", MUTANTS)
def test_a_bug_planted_in_a_source_fails_the_checks(compiled, monkeypatch, tmp_path, rng, rel_err, kernel):
    """(Not every edit is a bug: swapping ``right`` and ``down`` throughout ``pool`` transposes
    each 2×2 window, which changes neither its maxima nor where they are.)"""
    text, bug = MUTANTS[kernel]
    ins, outs, body = cuda_kernels.SOURCES[kernel]
    assert body.count(text) == 1
    monkeypatch.setitem(cuda_kernels.SOURCES, kernel, (ins, outs, body.replace(text, bug)))
    mutant = compile_host({kernel: cuda_kernels.SOURCES[kernel]}, tmp_path)
    check, args = CHECKS[kernel]
    with pytest.raises(AssertionError):
        check(runner({**compiled, **mutant}, monkeypatch), rng, rel_err, *args)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH (CUDA compile check)")
def test_every_kernel_compiles_as_cuda(tmp_path):
    (tmp_path / "kernels.cu").write_text(translation_unit(cuda_kernels.SOURCES, cuda=True))
    result = subprocess.run(["nvcc", "-ptx", "-o", str(tmp_path / "kernels.ptx"), str(tmp_path / "kernels.cu")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ptx = (tmp_path / "kernels.ptx").read_text()
    assert [name for name in cuda_kernels.SOURCES if f".entry ddref_{name}(" not in ptx] == []
