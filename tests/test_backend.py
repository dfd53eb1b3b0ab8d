"""ddref.backend and the CuPy backend (ddref._cupy), tested without a GPU.

The CuPy backend is autograd differentiating through device arrays.  Here the device is the
strict fake of tests/fake_device.py: numpy computes everything, but any host array created
by model code or by a gradient rule, and any implicit device→host conversion, raises
TypeError as it would on CuPy.  ``ddref._cupy.install`` applies the same patches to the fake
as ``backend.use("cupy")`` applies to CuPy, so

* the core meta-gradients (naive and back-gradient, mlp and lenet, 3 steps × 2 epochs,
  float64) must run on the fake and agree with numpy to 1e-12;
* every autograd rule that ddref._cupy replaces is shown to fail on the fake without the
  replacement, and to give numpy's values, gradients and second derivatives with it;
* planting a host array in model code makes the fake device fail.

Tests marked ``gpu`` repeat the comparisons on real CuPy; they are skipped where CuPy or a
GPU is absent (``pytest -m gpu``, or benchmarks/gpu_smoke.sh on a GPU machine).
"""

import contextlib
import importlib.metadata
import os
import subprocess
import sys
import textwrap
import types

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

from ddref import _cupy, backend, engines, fused, fused_layers, hypergrad, losses, nn
from ddref.unroll import inverse_softplus

try:
    from fake_device import FakeArray, fake_xp
except ImportError:  # tests/ imported as a package
    from tests.fake_device import FakeArray, fake_xp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"mlp": (1, 8, 8), "lenet": (1, 28, 28)}
STEPS, EPOCHS, PER_STEP, N_REAL = 3, 2, 4, 6
SAME = {"fake": 1e-12, "cupy": 1e-9}       # relative agreement with numpy (float64)


# ---------------------------------------------------------------------------- backends


@contextlib.contextmanager
def _selected(name):
    """Select numpy, the fake device (patching autograd for it) or real CuPy (skipping the
    test where CuPy or a GPU is absent) for a with-block."""
    if name == "fake":
        _cupy.install(fake_xp, FakeArray)
        with backend._using_namespace("fake", fake_xp) as xp:
            yield xp
        return
    if name == "cupy":
        try:
            with backend.using("cupy"):
                pass
        except backend.BackendUnavailable as err:
            pytest.skip(f"no CuPy GPU backend here: {err}")
    with backend.using(name) as xp:
        yield xp


@pytest.fixture(params=["fake", pytest.param("cupy", marks=pytest.mark.gpu)])
def device(request):
    """A device backend selected for the test: the strict fake (always), or real CuPy (gpu)."""
    with _selected(request.param) as xp:
        yield request.param, xp


@pytest.fixture(params=["numpy", "fake", pytest.param("cupy", marks=pytest.mark.gpu)])
def any_backend(request):
    """numpy, the fake device, or (gpu) real CuPy."""
    with _selected(request.param) as xp:
        yield request.param, xp


# ---------------------------------------------------------------------------- the problem


def _problem(model_name, dtype="float64", seed=0):
    """Host (numpy) data for one meta-gradient; moved to the selected backend by _on_backend."""
    shape = SHAPES[model_name]
    rng = np.random.default_rng(seed)
    return dict(
        model=nn.build_model(model_name, shape, 10), dtype=dtype, seed=seed + 1,
        x_distilled=rng.normal(size=(STEPS, PER_STEP, *shape)),
        labels=np.arange(PER_STEP) % 10,
        raw_lrs=np.full((EPOCHS, STEPS), inverse_softplus(0.02)) + 0.1 * rng.normal(size=(EPOCHS, STEPS)),
        x_real=rng.normal(size=(N_REAL, *shape)),
        real_labels=rng.integers(0, 10, N_REAL))


def _on_backend(engine, p):
    """The meta-gradient computed on the selected backend (everything created there)."""
    dtype = p["dtype"]
    return engines.meta_gradient(
        engine, p["model"].apply, p["model"].init(p["seed"], dtype=dtype),
        backend.asarray(p["x_distilled"], dtype=dtype), losses.one_hot(p["labels"], 10, dtype),
        backend.asarray(p["raw_lrs"], dtype=dtype), backend.asarray(p["x_real"], dtype=dtype),
        losses.one_hot(p["real_labels"], 10, dtype))


_REFERENCE = {}


def _numpy_reference(model_name, engine, dtype="float64"):
    key = (model_name, engine, dtype)
    if key not in _REFERENCE:
        with backend.using("numpy"):
            _REFERENCE[key] = _on_backend(engine, _problem(model_name, dtype))
    return _REFERENCE[key]


# ---------------------------------------------------------------------------- meta-gradients


@pytest.mark.parametrize("path", ["fast", "plain"])
@pytest.mark.parametrize("model_name", sorted(SHAPES))
def test_meta_gradients_on_every_backend(any_backend, model_name, path, rel_err):
    """naive and back-gradient meta-gradients run on the backend, stay on its arrays, agree
    with each other, and give numpy's numbers — on the fast path (ddref.fused) and the plain one."""
    name, xp = any_backend
    p = _problem(model_name)
    with (fused.plain() if path == "plain" else contextlib.nullcontext()):
        results = {engine: _on_backend(engine, p) for engine in ("naive", "backgrad")}
    for engine, mg in results.items():
        assert isinstance(mg.loss, float)
        assert type(mg.grad_x) is xp.ndarray and type(mg.grad_raw_lrs) is xp.ndarray, engine
        assert mg.grad_x.shape == p["x_distilled"].shape and mg.grad_raw_lrs.shape == p["raw_lrs"].shape
        assert mg.grad_x.dtype == np.float64 and mg.grad_raw_lrs.dtype == np.float64
    naive, back = results["naive"], results["backgrad"]
    assert rel_err(naive.loss, back.loss) < 1e-10
    assert rel_err(backend.to_numpy(naive.grad_x), backend.to_numpy(back.grad_x)) < 1e-10
    assert rel_err(backend.to_numpy(naive.grad_raw_lrs), backend.to_numpy(back.grad_raw_lrs)) < 1e-10
    if name == "numpy":
        return
    for engine, mg in results.items():
        ref = _numpy_reference(model_name, engine)
        tol = SAME[name]
        assert rel_err(mg.loss, ref.loss) < tol, engine
        assert rel_err(backend.to_numpy(mg.grad_x), ref.grad_x) < tol, engine
        assert rel_err(backend.to_numpy(mg.grad_raw_lrs), ref.grad_raw_lrs) < tol, engine
        for s in range(STEPS):
            assert rel_err(backend.to_numpy(mg.grad_x[s]), ref.grad_x[s]) < tol, (engine, s)


def test_float32_stays_float32_on_the_device(device, rel_err):
    name, xp = device
    p = _problem("mlp", dtype="float32")
    mg = _on_backend("backgrad", p)
    ref = _numpy_reference("mlp", "backgrad", "float32")
    assert mg.grad_x.dtype == np.float32 and mg.grad_raw_lrs.dtype == np.float32
    assert rel_err(backend.to_numpy(mg.grad_x), ref.grad_x) < (1e-12 if name == "fake" else 1e-4)


@pytest.mark.parametrize("init, engine, objective, n_nets", [("fixed", "backgrad", "classify", 1),
                                                             ("random", "naive", "attack", 1),
                                                             ("random", "backgrad", "classify", 3)])
def test_distillation_runs_on_the_device(device, init, engine, objective, n_nets, rel_err):
    """A few outer iterations of Algorithm 1 and the evaluation, on the device and on numpy
    (random init with 3 networks: the stacked back-gradient)."""
    from ddref import distill

    name, xp = device
    config = distill.DistillConfig(dataset="digits", model="mlp", init=init, engine=engine, n_nets=n_nets,
                                   objective=objective, steps=2, epochs=2, batch_size=32,
                                   iterations=2, eval_every=0, eval_inits=1, checkpoint_every=0,
                                   dtype="float64")

    def run():
        distiller = distill.Distiller(config, progress=False)
        for _ in range(2):
            distiller.step()
        return distiller, distiller.accuracy(n_inits=1)

    on_device, device_accuracy = run()
    with backend.using("numpy"):
        on_host, host_accuracy = run()
    assert type(on_device.x) is xp.ndarray and type(on_device.raw_lrs) is xp.ndarray
    assert rel_err(backend.to_numpy(on_device.x), on_host.x) < SAME[name]
    assert rel_err(backend.to_numpy(on_device.raw_lrs), on_host.raw_lrs) < SAME[name]
    if name == "fake":          # on a GPU, rounding may flip a borderline prediction
        assert str(device_accuracy) == str(host_accuracy)


# ---------------------------------------------------------------------------- the fake is strict


def _host_relu(x):
    return anp.maximum(x, np.zeros(x.shape))            # a host array planted in model code


def _host_zeros(shape, dtype="float64"):
    return np.zeros(shape, dtype=dtype)                 # parameters created on the host


def _host_row(b):
    b = fused.getval(b)                                  # a host array planted in the fast path
    return b.get() if isinstance(b, FakeArray) else b


@pytest.mark.parametrize("plant", ["forward", "fused", "init"])
def test_a_planted_host_array_fails_on_the_fake_device(monkeypatch, plant):
    path = contextlib.nullcontext()
    if plant == "forward":
        monkeypatch.setattr(nn, "relu", _host_relu)
        path = fused.plain()                            # the plain path calls nn.relu
    elif plant == "fused":
        monkeypatch.setattr(fused_layers, "_row", _host_row)
    else:
        monkeypatch.setattr(backend, "zeros", _host_zeros)
    p = _problem("mlp")
    with path:
        with backend.using("numpy"):
            _on_backend("naive", p)                     # fine on the host ...
        _cupy.install(fake_xp, FakeArray)
        with backend._using_namespace("fake", fake_xp):     # ... but not on a device
            for engine in ("naive", "backgrad"):
                with pytest.raises(TypeError, match="host numpy array|Implicit conversion"):
                    _on_backend(engine, p)


def test_fake_device_counts_operations_and_host_syncs():
    from fake_device import COUNTS

    a = fake_xp.asarray(np.ones((2, 3)))
    COUNTS.reset()
    b = a * 2.0 + 1.0                                   # two kernels
    c = b.T.reshape(6)[1:]                              # views are free, but this reshape copies
    assert COUNTS.snapshot() == {"ops": 3, "syncs": 0, "uploads": 0}
    float(np.sum(c))                                    # one kernel, one sync
    bool(a[0, 0] > 0)                                   # a 0-d view, one kernel, one sync
    c.get(), fake_xp.asnumpy(a), a[1, 2].item()         # three syncs
    assert COUNTS.snapshot() == {"ops": 5, "syncs": 5, "uploads": 0}
    fake_xp.emulate_kernel(lambda x: x + 1, a)         # a custom kernel is one op
    fake_xp.asarray(np.zeros(2))
    assert COUNTS.snapshot() == {"ops": 6, "syncs": 5, "uploads": 1}
    with pytest.raises(TypeError):
        fake_xp.emulate_kernel(lambda x: x, np.zeros(2))


def test_fake_device_refuses_what_cupy_refuses():
    a = fake_xp.ones((2, 3))
    host = np.ones((2, 3))
    assert type(a) is FakeArray and type(np.sum(a)) is FakeArray and a[0, 0].shape == ()
    assert type(np.zeros((2, 3))) is np.ndarray          # why model code must not call it
    for bad in (lambda: np.asarray(a), lambda: a + host, lambda: host * a, lambda: np.dot(a.T, host),
                lambda: np.concatenate([a, host]), lambda: fake_xp.exp(host),
                lambda: fake_xp.stack([host, host]), lambda: a.view(np.ndarray),
                lambda: np.reshape(a, (3, 2), order=None), lambda: np.add.at(a, (0, slice(None)), a[0]),
                lambda: np.dot(a, 3.0), lambda: fake_xp.dot(2.0, a), lambda: a.dot(3.0), lambda: a @ 2.0,
                lambda: np.tensordot(a, 1.0, 0), lambda: fake_xp.matmul(a.T, host)):
        with pytest.raises(TypeError):
            bad()
    assert isinstance(a.get(), np.ndarray) and backend.to_numpy(a).sum() == 6.0
    b = fake_xp.zeros((2, 3))
    b[:, 1:] += a[:, 1:]
    assert b.get().tolist() == [[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]


# ---------------------------------------------------------------------------- patched rules


def _rule_cases():
    """Scalar functions f(x) of a (3, 4) array that exercise each rule ddref._cupy replaces."""
    other = np.linspace(-1.0, 1.0, 12).reshape(4, 3)

    def with_other(f):
        return lambda x: f(x, backend.asarray(other))

    return {
        "sum": lambda x: anp.sum(anp.sin(x) ** 2),
        "sum_axis": lambda x: anp.sum(anp.sum(x ** 3, axis=1, keepdims=True) ** 2),
        "mean": lambda x: anp.mean(anp.mean(x ** 2, axis=0) ** 2),
        "max": lambda x: anp.sum(anp.max(x * x, axis=1) ** 2),
        "min": lambda x: anp.min(anp.exp(x)) + anp.sum(x ** 2),
        "prod": lambda x: anp.sum(anp.prod(1.0 + x ** 2, axis=0)),
        "var_std": lambda x: anp.var(x) + anp.sum(anp.std(x ** 2, axis=1)),
        "dot_2d": with_other(lambda x, o: anp.sum(anp.dot(x, o) ** 2)),
        "dot_1d": with_other(lambda x, o: anp.sum(anp.dot(x[0], x[1]) * anp.dot(x, o[:, 0]) ** 2)),
        "dot_scalar": lambda x: anp.sum(anp.dot(x, 3.0) ** 2),
        "matmul": with_other(lambda x, o: anp.sum(anp.matmul(x, o) ** 2)),
        "tensordot": lambda x: anp.sum(anp.tensordot(x, x, axes=([1], [1])) ** 2),
        "where": lambda x: anp.sum(anp.where(x > 0.1, x ** 2, anp.sin(x)) ** 2),
        "reshape": lambda x: anp.sum(anp.reshape(x ** 2, (2, 6))[0] ** 2),
        "ravel": lambda x: anp.sum(anp.ravel(x ** 2)[:5] ** 2),
        "getitem": lambda x: anp.sum(x[1:, ::2] ** 3) + x[0, 1] ** 2 + anp.sum(x[:, None, 2] ** 4),
        "getitem_fancy": lambda x: anp.sum(x[[0, 2, 2]] ** 3),
        "stack": lambda x: anp.sum(anp.stack([x ** 2, anp.sin(x)], axis=1) ** 2),
        "concatenate": lambda x: anp.sum(anp.concatenate([x, x[:1] ** 2], axis=0) ** 2),
        "transpose": lambda x: anp.sum(anp.transpose(x ** 2) @ x),
        "max_pool": lambda x: anp.sum(nn.max_pool2x2(anp.reshape(x, (1, 1, 3, 4)) ** 2) ** 2),
        "log_softmax": lambda x: anp.sum(losses.log_softmax(x) ** 2),
    }


RULES = _rule_cases()


@pytest.mark.parametrize("case", sorted(RULES))
def test_patched_rules_match_numpy_to_second_order(device, case, rel_err):
    """Value, gradient and Hessian-vector product of each case agree with numpy."""
    name, xp = device
    f = RULES[case]
    rng = np.random.default_rng(7)
    x0, v0 = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))

    def evaluate():
        x, v = backend.asarray(x0), backend.asarray(v0)
        hvp = grad(lambda y: anp.sum(grad(f)(y) * v))
        return [f(x), grad(f)(x), hvp(x)]

    on_device = evaluate()
    with backend.using("numpy"):
        on_host = evaluate()
    for d, h in zip(on_device, on_host):
        assert type(d) is xp.ndarray
        assert rel_err(backend.to_numpy(d), h) < SAME[name], case


def _fake(a):
    return FakeArray(np.asarray(a, dtype=float))


def _host_rules():
    """autograd's own version of each rule ddref._cupy replaces, applied to fake device arrays."""
    from autograd.core import vspace
    from autograd.numpy import numpy_wrapper as anp_wrapper
    from autograd.numpy.numpy_boxes import ArrayBox
    from autograd.numpy.numpy_vspaces import ArrayVSpace
    from autograd.util import func

    def host_vjp(fun, argnum, ans, *args):
        """autograd's own VJP of ``fun`` w.r.t. ``argnum``, applied to the cotangent ones."""
        (result,) = _cupy._HOST_VJPS[fun]((argnum,), ans, args, {})(fake_xp.ones(ans.shape))
        return result

    a, b, g = _fake(np.ones((3, 4))), _fake(np.ones((4, 2))), _fake(np.ones((3, 1)))
    getitem = func(ArrayBox.__getitem__)
    return {
        "vspace": lambda: ArrayVSpace(a),
        "repeat_to_match_shape":
            lambda: _cupy._host_repeat_to_match_shape(g, (3, 4), np.dtype(float), 1, True),
        "dot": lambda: host_vjp(_cupy._host_dot, 0, a @ b, a, b),
        "dot_scalar": lambda: _cupy._host_dot(a, 3.0),
        "where": lambda: host_vjp(anp._original_where, 1, a, a > 0, a, a),
        "reshape": lambda: host_vjp(anp_wrapper.reshape, 0, a.reshape(2, 6), a, (2, 6)),
        "ravel": lambda: host_vjp(anp_wrapper.ravel, 0, a.ravel(), a),
        "getitem": lambda: host_vjp(getitem, 0, a[1:, :2], a, (slice(1, None), slice(None, 2)))
            .mut_add(vspace(a).zeros()),
        "stack": lambda: _cupy._host_stack([g, g]),
        "concatenate": lambda: _cupy._host_concatenate([g, g]),
    }


@pytest.mark.parametrize("rule", sorted(_host_rules()))
def test_autograd_own_rules_fail_on_the_fake_device(rule):
    """Each replacement in ddref._cupy is needed: autograd's own rule breaks on device arrays
    (and the fake notices, as CuPy would)."""
    _cupy.install(fake_xp, FakeArray)
    with pytest.raises(TypeError):
        _host_rules()[rule]()


def test_install_leaves_numpy_results_bit_for_bit_unchanged():
    """In a fresh interpreter: numpy results before and after installing the fake device."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
        import numpy as np
        from autograd import grad
        import test_backend as t
        from ddref import _cupy, hypergrad
        from fake_device import FakeArray, fake_xp

        def results():
            out = []
            for engine in ("naive", "backgrad"):
                mg = t._on_backend(engine, t._problem("mlp"))
                out += [np.asarray(mg.loss), mg.grad_x, mg.grad_raw_lrs]
            x = np.random.default_rng(3).normal(size=(3, 4))
            for case in sorted(t.RULES):
                out.append(grad(t.RULES[case])(x))
            return out

        before = results()
        _cupy.install(fake_xp, FakeArray)
        after = results()
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(before, after))
        print("unchanged", len(before))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unchanged" in done.stdout


# ---------------------------------------------------------------------------- selecting a backend


def test_autograd_is_the_pinned_version():
    found = importlib.metadata.version("autograd")
    assert found == _cupy.AUTOGRAD_VERSION, (
        f"autograd {found} is installed but ddref/_cupy.py patches autograd "
        f"{_cupy.AUTOGRAD_VERSION} internals: re-verify every patch there (and run this file) "
        f"before bumping the pin in setup.cfg.")
    with open(os.path.join(REPO, "setup.cfg")) as f:
        assert f"autograd=={_cupy.AUTOGRAD_VERSION}" in f.read()


def test_install_refuses_another_autograd_version(monkeypatch):
    monkeypatch.setattr(_cupy, "autograd_version", lambda: "1.10.0")
    with pytest.raises(backend.BackendUnavailable, match=r"autograd==1\.9\.1.*re-verify"):
        _cupy.install(fake_xp, FakeArray)


def test_numpy_needs_nothing_from_the_cupy_module():
    script = ("import sys, ddref, ddref.nn, ddref.hypergrad, ddref.losses, ddref.backend as b; "
              "assert b.name() == 'numpy' and b.xp() is __import__('numpy'); "
              "assert 'ddref._cupy' not in sys.modules, 'ddref._cupy imported'; "
              "assert 'cupy' not in sys.modules, 'cupy imported'; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "DDREF_BACKEND"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_an_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match=r"unknown backend 'bogus'.*'numpy' or 'cupy'"):
        backend.use("bogus")
    assert backend.name() == "numpy"


def test_cupy_not_installed_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)      # `import cupy` raises ImportError
    with pytest.raises(backend.CupyNotInstalled, match=r'pip install "ddref\[gpu\]"') as info:
        backend.use("cupy")
    assert isinstance(info.value, ImportError) and isinstance(info.value, RuntimeError)
    assert backend.name() == "numpy" and backend.xp() is np


@pytest.mark.parametrize("failure", ["no_driver", "no_device"])
def test_cupy_without_a_gpu_is_one_clear_error(monkeypatch, failure):
    def count():
        if failure == "no_driver":
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return 0

    runtime = types.SimpleNamespace(getDeviceCount=count)
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    with pytest.raises(backend.BackendUnavailable, match="no .*CUDA GPU.*numpy backend"):
        backend.use("cupy")
    assert backend.name() == "numpy"


def test_environment_variable_selects_the_backend():
    env = dict(os.environ, DDREF_BACKEND="cupy")
    script = "import sys; sys.modules['cupy'] = None; import ddref.backend"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode != 0 and 'pip install "ddref[gpu]"' in done.stderr


def test_using_restores_the_previous_backend():
    with backend._using_namespace("fake", fake_xp):
        assert backend.name() == "fake" and type(backend.zeros((2,))) is FakeArray
        with backend.using("numpy"):
            assert type(backend.zeros((2,))) is np.ndarray
        assert backend.name() == "fake"
        with pytest.raises(ValueError):
            with backend.using("bogus"):
                pass
        assert backend.name() == "fake"
    assert backend.name() == "numpy" and backend.xp() is np
