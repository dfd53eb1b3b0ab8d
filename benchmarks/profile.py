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
    args = ap.parse_args(argv)

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
