"""Seconds per outer iteration of Algorithm 1: ddref on numpy (this machine's CPU), ddref on
CuPy, PyTorch on CUDA — and what the fake device counts.

One outer iteration = what ``ddref distill`` does per iteration: the back-gradient
meta-gradient (10 steps × 3 epochs, 10 distilled images per step, one per class) and the Adam
update of x̃ and η̃.  Workloads: ``lenet`` on MNIST-shaped data (1×28×28, real batch 1,024)
and ``mlp`` on digits-shaped data (1×8×8, real batch 512), float32, the real images random
numbers of that shape (the time does not depend on the values).  PyTorch: the outer iteration
of ``../shared/reference/torch_dd.py`` (``outer_grad_autograd`` + Adam) with every tensor on
the GPU, when torch with CUDA is importable.

    python benchmarks/gpu_smoke.py                       # every backend that can run here
    python benchmarks/gpu_smoke.py --backends numpy      # no GPU needed
    python benchmarks/gpu_smoke.py --counts              # no GPU needed: see below

Each backend runs ``--warmup`` untimed iterations (CuPy compiles its kernels in the first),
then ``--repeats`` timed ones, synchronising the device after each; the median is reported,
one line per workload and backend, ``RESULT BACKEND MODEL sec_per_iteration S``, then a
table with the ratios, and how far the CuPy meta-gradient is from numpy's.

``--counts`` runs one outer iteration of LeNet (1×28×28) and of the MLP (1×8×8) on the strict
fake device of tests/fake_device.py, in float64 at the reference settings, and prints what a
GPU would be asked to do, one line per model:

    RESULT fake-device MODEL ops_per_iteration N syncs_per_iteration M

ops: kernel-like calls (views are free, a custom kernel is one); syncs: device→host reads.
Both are deterministic and do not depend on the batch sizes (checked: two real batch sizes
must give the same counts, else the script fails).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

# benchmarks/ holds profile.py, which would shadow the standard module that torch imports
# (through cProfile): take this script's folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

from ddref import backend, engines, losses, nn  # noqa: E402
from ddref.unroll import inverse_softplus  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = {"lenet": ((1, 28, 28), 1024), "mlp": ((1, 8, 8), 512)}
STEPS, EPOCHS, PER_STEP = 10, 3, 10


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
            mg = engines.meta_gradient("backgrad", x_distilled=learned["x"], raw_lrs=learned["raw_lrs"],
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


# ---------------------------------------------------------------------------- timing


def _problem(model_name, seed=0):
    shape, n_real = WORKLOADS[model_name]
    rng = np.random.default_rng(seed)
    return dict(x=rng.normal(size=(STEPS, PER_STEP, *shape)), labels=np.arange(PER_STEP) % 10,
                x_real=rng.normal(size=(n_real, *shape)), y_real=rng.integers(0, 10, n_real))


def _median_seconds(one_iteration, synchronize, warmup, repeats):
    for _ in range(warmup):
        one_iteration()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_iteration()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_ddref(backend_name, model_name, args):
    """(median seconds per outer iteration, the first meta-gradient) on a ddref backend."""
    from ddref.evaluate import Adam

    p, dtype = _problem(model_name), args.dtype
    shape = WORKLOADS[model_name][0]
    with backend.using(backend_name) as xp:
        model = nn.build_model(model_name, shape, 10)
        fixed = dict(apply=model.apply, theta0=model.init(0, dtype=dtype),
                     targets=losses.one_hot(p["labels"], 10, dtype),
                     x_real=backend.asarray(p["x_real"], dtype=dtype),
                     real_targets=losses.one_hot(p["y_real"], 10, dtype))
        raw = np.full((EPOCHS, STEPS), inverse_softplus(0.02))
        state = {"learned": {"x": backend.asarray(p["x"], dtype=dtype), "raw_lrs": backend.asarray(raw, dtype=dtype)}}
        adam = Adam(state["learned"])
        first = engines.meta_gradient("backgrad", x_distilled=state["learned"]["x"],
                                        raw_lrs=state["learned"]["raw_lrs"], **fixed)

        def one_iteration():
            learned = state["learned"]
            mg = engines.meta_gradient("backgrad", x_distilled=learned["x"], raw_lrs=learned["raw_lrs"], **fixed)
            state["learned"] = adam.step(learned, {"x": mg.grad_x, "raw_lrs": mg.grad_raw_lrs})

        def synchronize():
            if backend_name == "cupy":
                xp.cuda.runtime.deviceSynchronize()

        seconds = _median_seconds(one_iteration, synchronize, args.warmup, args.repeats)
        return seconds, first


def _torch_dd():
    path = os.environ.get("TORCH_DD", os.path.join(REPO, "..", "shared", "reference", "torch_dd.py"))
    spec = importlib.util.spec_from_file_location("torch_dd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_torch_cuda(model_name, args):
    """Median seconds per outer iteration of torch_dd.py's autograd scheme + Adam on CUDA."""
    import torch

    torch_dd = _torch_dd()
    device = torch.device(args.torch_device)
    p = _problem(model_name)
    dtype = getattr(torch, args.dtype)
    th0 = [t.detach().to(device, dtype).requires_grad_() for t in torch_dd.init_params(model_name, torch.Generator().manual_seed(1))]
    xd = torch.tensor(p["x"], dtype=dtype, device=device).requires_grad_()
    yd = torch.tensor(p["labels"], device=device)
    raw = torch.full((EPOCHS * STEPS,), inverse_softplus(0.02), dtype=dtype, device=device).requires_grad_()
    rx, ry = torch.tensor(p["x_real"], dtype=dtype, device=device), torch.tensor(p["y_real"], device=device)
    settings = argparse.Namespace(epochs=EPOCHS, steps=STEPS, lr_param="softplus")
    opt = torch.optim.Adam([xd, raw], lr=0.01, betas=(0.5, 0.999))
    net = torch_dd.NETS[model_name]

    def one_iteration():
        opt.zero_grad(set_to_none=True)
        _, gx, graw = torch_dd.outer_grad_autograd(net, th0, xd, yd, raw, settings, rx, ry)
        xd.grad, raw.grad = gx, graw
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return _median_seconds(one_iteration, sync, args.warmup, args.repeats)


def _torch_cuda_available():
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:                      # not installed, or a broken CUDA install
        return False


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300))


def print_times(args):
    backends = list(args.backends)
    if "cupy" in backends:
        try:
            with backend.using("cupy"):
                pass
        except backend.BackendUnavailable as err:
            print(f"(cupy skipped: {err})")
            backends.remove("cupy")
    if "torch-cuda" in backends and args.torch_device == "cuda" and not _torch_cuda_available():
        print("(torch-cuda skipped: torch with CUDA is not importable here)")
        backends.remove("torch-cuda")
    table = {}
    for model_name in args.models:
        firsts = {}
        for name in backends:
            if name == "torch-cuda":
                seconds = time_torch_cuda(model_name, args)
            else:
                seconds, firsts[name] = time_ddref(name, model_name, args)
            table[model_name, name] = seconds
            print(f"RESULT {name} {model_name} sec_per_iteration {seconds:.4f}", flush=True)
        if {"numpy", "cupy"} <= set(firsts):
            a, b = firsts["numpy"], firsts["cupy"]
            print(f"  ({model_name}: CuPy vs numpy, relative, {args.dtype}: loss {_rel(a.loss, b.loss):.1e}, "
                  f"grad x {_rel(a.grad_x, backend.to_numpy(b.grad_x)):.1e}, "
                  f"grad lrs {_rel(a.grad_raw_lrs, backend.to_numpy(b.grad_raw_lrs)):.1e})")
    print()
    print(f"| workload | {' | '.join(backends)} | cupy ÷ torch-cuda | numpy ÷ cupy |")
    print(f"|---|{'---|' * len(backends)}---|---|")
    for model_name in args.models:
        cells = [f"{table[model_name, b]:.4f}" for b in backends]
        ratio = lambda a, b: (f"{table[model_name, a] / table[model_name, b]:.2f}"
                              if (model_name, a) in table and (model_name, b) in table else "–")
        print(f"| {model_name} | {' | '.join(cells)} | {ratio('cupy', 'torch-cuda')} | {ratio('numpy', 'cupy')} |")
    print(f"(median s per outer iteration of {args.repeats} after {args.warmup} warm-up; {args.dtype})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", action="store_true",
                        help="print the fake device's ops and syncs per outer iteration (no GPU needed)")
    parser.add_argument("--backends", nargs="+", default=["numpy", "cupy", "torch-cuda"],
                        choices=["numpy", "cupy", "torch-cuda"])
    parser.add_argument("--models", nargs="+", default=["lenet", "mlp"], choices=sorted(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--torch-device", default="cuda",
                        help="where the torch-cuda column runs (cpu: to check this script without a GPU)")
    args = parser.parse_args(argv)
    if args.counts:
        print_counts()
    else:
        print_times(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
