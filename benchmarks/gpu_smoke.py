"""Seconds per outer iteration of Algorithm 1 on numpy and on CuPy, and their ratio.

One outer iteration = one back-gradient meta-gradient of LeNet on MNIST-shaped data
(1×28×28, 10 classes): 10 steps × 3 epochs, 10 distilled images per step (one per class),
a real batch of 1024.  The real images come from ``ddref.data.load('mnist5k')`` when it is
available offline, else random numbers of the same shape (the time does not depend on the
values).  The Adam update is left out: it is a few element-wise operations on x̃ and η̃.

    python benchmarks/gpu_smoke.py               # numpy, then CuPy if it can run here
    python benchmarks/gpu_smoke.py --numpy-only  # no GPU needed
    python benchmarks/gpu_smoke.py --counts      # no GPU needed: see below

``--counts`` runs one outer iteration (the back-gradient meta-gradient, then the Adam update
of x̃ and η̃, as ``ddref distill`` does) of LeNet (1×28×28) and of the MLP (1×8×8) on the
strict fake device of tests/fake_device.py, in float64 at the reference settings, and prints
what a GPU would be asked to do, one line per model:

    RESULT fake-device MODEL ops_per_iteration N syncs_per_iteration M

ops: kernel-like calls (views are free, a custom kernel is one); syncs: device→host reads.
Both are deterministic and do not depend on the batch sizes (checked: two real batch sizes
must give the same counts, else the script fails).

On CuPy the first iteration compiles kernels and is not timed; both backends then run
``--repeats`` timed iterations.  The script also prints how far the CuPy loss and
meta-gradient are from numpy's (the same problem, the same dtype).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from ddref import backend, hypergrad, losses, nn
from ddref.unroll import inverse_softplus


def _real_batch(args):
    shape = (1, 28, 28)
    try:
        from ddref import data

        dataset = data.load("mnist5k", dtype=args.dtype)
        x, y = dataset.x_train[: args.real], dataset.y_train[: args.real]
        if len(x) == args.real:
            return x, y, "mnist5k"
        reason = f"only {len(x)} training images"
    except Exception as err:        # not installed / not downloaded / data module absent
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    rng = np.random.default_rng(1)
    print(f"(mnist5k not available: {reason}; timing on random data of the same shape)")
    return rng.normal(size=(args.real, *shape)).astype(args.dtype), rng.integers(0, 10, args.real), "random"


def _problem(args, x_real, y_real):
    rng = np.random.default_rng(0)
    labels = np.arange(args.per_step) % 10
    return dict(
        x_distilled=rng.normal(size=(args.steps, args.per_step, 1, 28, 28)),
        labels=labels,
        raw_lrs=np.full((args.epochs, args.steps), inverse_softplus(0.02)),
        x_real=x_real, y_real=y_real)


def _time_backend(name, args, p, warmup):
    """Seconds per meta-gradient on backend ``name`` (selected for the call), and the result."""
    with backend.using(name) as xp:
        dtype = args.dtype
        model = nn.build_model("lenet", (1, 28, 28), 10)
        inputs = dict(
            apply=model.apply, theta0=model.init(0, dtype=dtype),
            x_distilled=backend.asarray(p["x_distilled"], dtype=dtype),
            targets=losses.one_hot(p["labels"], 10, dtype),
            raw_lrs=backend.asarray(p["raw_lrs"], dtype=dtype),
            x_real=backend.asarray(p["x_real"], dtype=dtype),
            real_targets=losses.one_hot(p["y_real"], 10, dtype))

        def synchronize():
            if name == "cupy":
                xp.cuda.runtime.deviceSynchronize()

        for _ in range(warmup):
            hypergrad.meta_gradient("backgrad", **inputs)
        synchronize()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = hypergrad.meta_gradient("backgrad", **inputs)
            synchronize()
            times.append(time.perf_counter() - start)
        return min(times), result


# ---------------------------------------------------------------------------- op counts

COUNT_SHAPES = {"lenet": (1, 28, 28), "mlp": (1, 8, 8)}


def _fake_device():
    """tests/fake_device.py (the strict, counting stand-in for CuPy), with autograd taught it."""
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import fake_device
    from ddref import _cupy

    _cupy.install(fake_device.fake_xp, fake_device.FakeArray)
    return fake_device


def count_outer_iteration(model_name, n_real, steps=10, epochs=3, per_step=10, dtype="float64"):
    """{'ops', 'syncs', 'uploads'} of one outer iteration on the fake device (after a first,
    uncounted one), plus the loss it read."""
    from ddref.evaluate import Adam

    fake = _fake_device()
    shape = COUNT_SHAPES[model_name]
    rng = np.random.default_rng(0)
    with backend._using_namespace("fake", fake.fake_xp):
        model = nn.build_model(model_name, shape, 10)
        fixed = dict(apply=model.apply, theta0=model.init(0, dtype=dtype),
                     targets=losses.one_hot(np.arange(per_step) % 10, 10, dtype),
                     x_real=backend.asarray(rng.normal(size=(n_real, *shape)), dtype=dtype),
                     real_targets=losses.one_hot(rng.integers(0, 10, n_real), 10, dtype))
        learned = {"x": backend.asarray(rng.normal(size=(steps, per_step, *shape)), dtype=dtype),
                   "raw_lrs": backend.asarray(np.full((epochs, steps), inverse_softplus(0.02)), dtype=dtype)}
        adam = Adam(learned)

        def outer_iteration(learned):
            mg = hypergrad.meta_gradient("backgrad", x_distilled=learned["x"], raw_lrs=learned["raw_lrs"],
                                         **fixed)
            return mg.loss, adam.step(learned, {"x": mg.grad_x, "raw_lrs": mg.grad_raw_lrs})

        _, learned = outer_iteration(learned)
        fake.COUNTS.reset()
        loss, learned = outer_iteration(learned)
        return {**fake.COUNTS.snapshot(), "loss": float(loss)}


def print_counts(n_real=(8, 16)):
    for model_name in ("lenet", "mlp"):
        found = [count_outer_iteration(model_name, n) for n in n_real]
        counts = [{k: c[k] for k in ("ops", "syncs", "uploads")} for c in found]
        if any(c != counts[0] for c in counts):
            raise SystemExit(f"{model_name}: the counts depend on the real batch size: {counts}")
        print(f"RESULT fake-device {model_name} ops_per_iteration {counts[0]['ops']} "
              f"syncs_per_iteration {counts[0]['syncs']}")
        print(f"  ({model_name}: {counts[0]['uploads']} host->device uploads; real batches {n_real} "
              f"give the same counts)")


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numpy-only", action="store_true", help="skip CuPy (no GPU needed)")
    parser.add_argument("--counts", action="store_true",
                        help="print the fake device's ops and syncs per outer iteration (no GPU needed)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed iterations per backend (the best is reported)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-step", type=int, default=10, help="distilled images per step")
    parser.add_argument("--real", type=int, default=1024, help="real images per outer iteration")
    args = parser.parse_args(argv)
    if args.counts:
        print_counts()
        return 0

    x_real, y_real, source = _real_batch(args)
    p = _problem(args, x_real, y_real)
    print(f"lenet, {source} 1x28x28, {args.steps} steps x {args.epochs} epochs, {args.per_step} "
          f"distilled images per step, real batch {args.real}, {args.dtype}, backgrad")

    numpy_seconds, numpy_result = _time_backend("numpy", args, p, warmup=0)
    print(f"numpy  {numpy_seconds:8.3f} s per outer iteration")
    if args.numpy_only:
        return 0
    try:
        with backend.using("cupy"):
            pass
    except backend.BackendUnavailable as err:
        print(f"cupy   skipped: {err}")
        return 0
    cupy_seconds, cupy_result = _time_backend("cupy", args, p, warmup=1)
    print(f"cupy   {cupy_seconds:8.3f} s per outer iteration")
    print(f"ratio  {numpy_seconds / cupy_seconds:8.2f} x (numpy time / CuPy time)")
    print(f"agreement with numpy: loss {_rel(numpy_result.loss, cupy_result.loss):.1e}, "
          f"grad x {_rel(numpy_result.grad_x, backend.to_numpy(cupy_result.grad_x)):.1e}, "
          f"grad lrs {_rel(numpy_result.grad_raw_lrs, backend.to_numpy(cupy_result.grad_raw_lrs)):.1e} "
          f"(relative, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
