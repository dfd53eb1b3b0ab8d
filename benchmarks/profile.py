#!/usr/bin/env python
"""Where one outer iteration's time goes: the phases of a back-gradient meta-gradient,
autograd's node count, and the functions that take the time.

One outer iteration of ``ddref distill`` (fixed init, 10 steps × 3 epochs, 1 image per class
per step, float32, the PyTorch reference's real batch: 512 digits / 1,024 mnist5k) splits into

    inner forward    the logits f(x̃_s; θ_t) of every inner step (no gradient)
    inner gradient   ∇θ ℓ(x̃_s, θ_t) of every step: the forward pass of back-gradient
    outer loss       ℓ(x_real, θ_T) and its gradient ∂L/∂θ_T on the real batch
    reverse pass     the T vector–Jacobian products of the steps (Hessian-vector products)
    backgrad / naive the whole meta-gradient with each engine

each timed on the fast path (``ddref.fused``: the hand-written gradient) and on the plain
path (autograd on ``model.apply``), interleaved so that machine load hits both alike
(median of ``--repeats``).  Then, for one call of each engine: the number of autograd nodes
(one per traced primitive call) by primitive, and the top functions by own time (cProfile).

    python benchmarks/profile.py --model mlp --threads 1
    python benchmarks/profile.py --model lenet --threads 1 --repeats 3
    python benchmarks/profile.py --roofline --threads 1     # LeNet's outer loss against the machine

``--roofline``: the convolution phases of LeNet's outer loss on the real batch (1,024 images,
float32) — patch matrices, the GEMMs, pooling, their derivatives — each with its FLOPs and the
bytes it must move at least (every operand read once, every result written once), against
this machine's measured memory bandwidth (a large copy) and GEMM rate (a 1,024³ SGEMM): the
floor of each phase is max(FLOPs / rate, bytes / bandwidth).
"""

from __future__ import annotations

import sys
from pathlib import Path

# this file is called profile.py, like the standard module cProfile imports: take its folder
# off the import path first, then bring in the helpers of benchmarks/hypergrad.py by path
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import collections  # noqa: E402
import cProfile  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

_spec = importlib.util.spec_from_file_location("ddref_bench_hypergrad", _HERE / "hypergrad.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
SETUPS, limit_threads, print_environment, setup_model = (
    _bench.SETUPS, _bench.limit_threads, _bench.print_environment, _bench.setup_model)


def phases(model, theta0, x, targets, raw, x_real, real_targets):
    """name -> zero-argument function, one per phase of the meta-gradient."""
    from ddref import engines, hypergrad
    from ddref.unroll import check_schedule, loss_and_grad, softplus, step_schedule

    lrs = softplus(raw)
    schedule = step_schedule(*check_schedule(x, raw))
    apply = model.apply
    thetas = hypergrad.train_keeping_weights(apply, theta0, x, targets, lrs, schedule)
    _, v = loss_and_grad(apply, thetas[-1], x_real, real_targets)
    return {
        "inner forward": lambda: [apply(thetas[t], x[s]) for t, (_, s) in enumerate(schedule)],
        "inner gradient": lambda: hypergrad.train_keeping_weights(apply, theta0, x, targets, lrs, schedule),
        "outer loss": lambda: loss_and_grad(apply, thetas[-1], x_real, real_targets),
        "reverse pass": lambda: hypergrad.reverse_pass(apply, thetas, x, targets, lrs, schedule, v),
        "backgrad": lambda: engines.meta_gradient("backgrad", apply, theta0, x, targets, raw,
                                                    x_real, real_targets),
        "naive": lambda: engines.meta_gradient("naive", apply, theta0, x, targets, raw,
                                                 x_real, real_targets),
    }


def time_phases(fns, repeats):
    """Median seconds of each phase on each path, fast and plain calls interleaved."""
    from ddref import fused

    times = collections.defaultdict(list)
    for _ in range(repeats + 1):                  # the first round is a warm-up
        for name, fn in fns.items():
            for path in ("fast", "plain"):
                with (fused.plain() if path == "plain" else _nothing()):
                    t0 = time.perf_counter()
                    fn()
                    times[name, path].append(time.perf_counter() - t0)
    return {key: statistics.median(ts[1:]) for key, ts in times.items()}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_nodes(fn):
    """Autograd nodes created during fn(), by primitive name (a node per traced call)."""
    from autograd import core

    counts = collections.Counter()
    original = core.VJPNode.__init__

    def counting(self, value, fun, *rest):
        counts[getattr(fun, "__name__", str(fun))] += 1
        original(self, value, fun, *rest)

    core.VJPNode.__init__ = counting
    try:
        fn()
    finally:
        core.VJPNode.__init__ = original
    return counts


def top_functions(fn, n):
    """The n functions with the most own time during fn() (cProfile), as text."""
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(n)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    root = str(Path(__file__).resolve().parent.parent)
    site = str(Path(np.__file__).resolve().parent.parent)
    return [line.replace(root + "/", "").replace(site + "/", "") for line in lines[start:] if line.strip()]


# ---------------------------------------------------------------------------- roofline


def _median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_rates(repeats, dtype="float32"):
    """(bytes per second of a 256 MB copy, counting read + write; FLOPs per second of SGEMM)."""
    a = np.ones(64 * 2**20, dtype=dtype)
    out = np.empty_like(a)
    bandwidth = 2 * a.nbytes / _median_time(lambda: np.copyto(out, a), repeats)
    m = np.random.default_rng(0).normal(size=(1024, 1024)).astype(dtype)
    rate = 2 * 1024**3 / _median_time(lambda: m @ m, repeats)
    return bandwidth, rate


def roofline_phases(n=1024, dtype="float32", seed=0):
    """(name, FLOPs, bytes, function) for the convolution phases of LeNet's outer loss."""
    from ddref import kernels

    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.normal(size=shape).astype(dtype)
    size = np.dtype(dtype).itemsize
    nbytes = lambda *arrays: sum(a.size for a in arrays) * size
    x1, w1, w2 = f(1, 28, 28, n), f(6, 25), f(16, 150)
    c1 = kernels.patches_chwn(x1, 5, 5, 2)                     # (25, 784·n)
    z1 = w1 @ c1
    s1 = (6, 28, 28, n)
    p1, route1 = kernels._pool(z1, s1)
    c2 = kernels.patches_chwn(p1, 5, 5, 0)                     # (150, 100·n)
    z2 = w2 @ c2
    s2 = (16, 10, 10, n)
    p2, route2 = kernels._pool(z2, s2)
    g2 = f(*p2.shape)
    gz2 = kernels.unpool(g2, route2, s2)
    gz1 = kernels.unpool(f(*p1.shape), route1, s1)
    hit_bytes = lambda z: z.size                              # one byte per entry
    return [
        ("conv1 patches (25 × 28·28·n)", 0, nbytes(x1, c1), lambda: kernels.patches_chwn(x1, 5, 5, 2)),
        ("conv1 GEMM (6×25)·(25×784·n)", 2 * 6 * 25 * c1.shape[1], nbytes(w1, c1, z1), lambda: w1 @ c1),
        ("pool1 (max, routing)", 3 * z1.size, nbytes(z1, p1, p1) + hit_bytes(z1), lambda: kernels._pool(z1, s1)),
        ("conv2 patches (150 × 100·n)", 0, nbytes(p1, c2), lambda: kernels.patches_chwn(p1, 5, 5, 0)),
        ("conv2 GEMM (16×150)·(150×100·n)", 2 * 16 * 150 * c2.shape[1], nbytes(w2, c2, z2), lambda: w2 @ c2),
        ("pool2", 3 * z2.size, nbytes(z2, p2, p2) + hit_bytes(z2), lambda: kernels._pool(z2, s2)),
        ("unpool2", 2 * z2.size, nbytes(g2, p2, gz2) + hit_bytes(z2), lambda: kernels.unpool(g2, route2, s2)),
        ("conv2 weight grad gz·Pᵀ", 2 * 16 * 150 * c2.shape[1], nbytes(gz2, c2, w2), lambda: gz2 @ c2.T),
        ("conv2 input grad Wᵀ·gz into 25 windows (kernels.conv_input_grad)", 2 * 16 * 150 * c2.shape[1],
         nbytes(w2, gz2, p1), lambda: kernels.conv_input_grad(w2.reshape(16, 6, 5, 5), gz2, p1.shape, 0)),
        ("unpool1", 2 * z1.size, nbytes(p1, p1, z1) + hit_bytes(z1), lambda: kernels.unpool(p1, route1, s1)),
        ("conv1 weight grad gz·Pᵀ", 2 * 6 * 25 * c1.shape[1], nbytes(gz1, c1, w1), lambda: gz1 @ c1.T),
    ]


def print_roofline(repeats, n=1024):
    """Each phase on the whole batch against its floor, and as the fast path runs it: in slices
    of ``fused.SLICE`` images (the time of one slice × the number of slices)."""
    from ddref import fused

    bandwidth, rate = machine_rates(repeats)
    slices = n // fused.SLICE
    print(f"\n## roofline: LeNet's outer loss, real batch {n:,}, float32 — measured copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (read + write), SGEMM {rate / 1e9:.1f} GFLOP/s\n")
    print(f"| phase | MFLOP | MB moved (at least) | floor ms | measured ms | measured ÷ floor "
          f"| in {slices} slices of {fused.SLICE} ms | sliced ÷ floor |")
    print("|---|---|---|---|---|---|---|---|")
    total_floor = total = total_sliced = 0.0
    for (name, flops, nbytes, fn), (*_, sliced_fn) in zip(roofline_phases(n), roofline_phases(fused.SLICE)):
        floor = max(flops / rate, nbytes / bandwidth)
        measured = _median_time(fn, repeats)
        sliced = slices * _median_time(sliced_fn, repeats)
        total_floor, total, total_sliced = total_floor + floor, total + measured, total_sliced + sliced
        print(f"| {name} | {flops / 1e6:.0f} | {nbytes / 1e6:.1f} | {1e3 * floor:.2f} | {1e3 * measured:.2f} "
              f"| {measured / floor:.1f} | {1e3 * sliced:.2f} | {sliced / floor:.1f} |")
    print(f"| **all** | | | {1e3 * total_floor:.1f} | {1e3 * total:.1f} | {total / total_floor:.1f} "
          f"| {1e3 * total_sliced:.1f} | {total_sliced / total_floor:.1f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(SETUPS), default="mlp")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (threadpoolctl); default 1")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top", type=int, default=15, help="functions listed by own time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--roofline", action="store_true", help="only the roofline of LeNet's outer loss (see above)")
    args = ap.parse_args(argv)
    if args.roofline:
        with limit_threads(args.threads):
            print_environment(args)
            print_roofline(args.repeats)
        return

    from ddref import fused

    with limit_threads(args.threads):
        print_environment(args)
        ds, model, theta0, targets, x_real, real_targets = setup_model(args.model, args.dtype, args.seed)
        rng = np.random.default_rng(args.seed + 1)
        x = rng.normal(size=(args.steps, len(targets), *ds.image_shape)).astype(args.dtype)
        from ddref.unroll import inverse_softplus
        raw = np.full((args.epochs, args.steps), inverse_softplus(0.02), dtype=args.dtype)
        T = args.steps * args.epochs
        print(f"\n## {args.model} / {SETUPS[args.model][0]}: T = {args.steps}×{args.epochs} = {T} inner steps, "
              f"{len(targets)} images per step, real batch {len(x_real)}, {args.dtype}, "
              f"threads {args.threads}, median of {args.repeats}")
        fns = phases(model, theta0, x, targets, raw, x_real, real_targets)
        times = time_phases(fns, args.repeats)
        print("\n| phase | fast s | plain s | plain ÷ fast | fast nodes | plain nodes |")
        print("|---|---|---|---|---|---|")
        nodes = {}
        for name, fn in fns.items():
            nodes[name, "fast"] = count_nodes(fn)
            with fused.plain():
                nodes[name, "plain"] = count_nodes(fn)
            f, p = times[name, "fast"], times[name, "plain"]
            print(f"| {name} | {f:.4f} | {p:.4f} | {p / f:.2f} | {sum(nodes[name, 'fast'].values())} "
                  f"| {sum(nodes[name, 'plain'].values())} |")
        print("\nphases add up to backgrad: inner gradient + outer loss + reverse pass "
              f"= {sum(times[k, 'fast'] for k in ('inner gradient', 'outer loss', 'reverse pass')):.4f} s fast, "
              f"{sum(times[k, 'plain'] for k in ('inner gradient', 'outer loss', 'reverse pass')):.4f} s plain")

        for engine in ("backgrad", "naive"):
            for path in ("fast", "plain"):
                counts = nodes[engine, path]
                print(f"\nautograd nodes per outer iteration, {engine}, {path} path: {sum(counts.values())} "
                      f"({sum(counts.values()) / T:.0f} per inner step); by primitive:")
                print("    " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
        for engine in ("backgrad", "naive"):
            print(f"\ntop {args.top} functions by own time, one {engine} meta-gradient, fast path (cProfile):")
            for line in top_functions(fns[engine], args.top):
                print("    " + line)
    print(f"\n# load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
