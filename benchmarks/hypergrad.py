#!/usr/bin/env python
"""Cost of the meta-gradient: ``naive`` (autograd through the unroll) against ``backgrad``
(the paper's back-gradient), as the number of inner steps T grows.

For each model/data set and each T it measures, on the real data set:

* forward  — the inner unroll alone, ``ddref.unroll.unroll(apply, θ0, x̃, y, softplus(raw))``,
             then the outer loss on the real batch, no meta-gradient (each inner step still
             takes its own ∇θ ℓ: that *is* the forward pass of Algorithm 1);
* naive    — ``ddref.engines.meta_gradient("naive", …)``;
* backgrad — ``ddref.engines.meta_gradient("backgrad", …)``;

reporting the median seconds per call over ``--repeats`` timed calls, the ratio
time(meta-gradient) / time(forward) (ratio of the medians), and the peak memory of one
call measured with ``tracemalloc``.

Memory: ``tracemalloc`` is started just before one call and stopped just after; its peak
counts every Python and numpy buffer allocated *during* the call (numpy reports its data
buffers to tracemalloc), not the inputs that already existed (θ0, x̃, the real batch).
RSS is not used: it is process-wide, includes the interpreter, the libraries and the data
sets, and never goes down, so it cannot isolate one call.  The traced call is also the
warm-up; the timed calls run without tracing (tracing slows allocation down).  The timed
calls of forward/naive/backgrad are interleaved (round robin) so that a change of machine
load hits all three alike.

Settings follow the PyTorch reference (../shared/reference/torch_dd.py): one distilled image
per class per step (10 per step), fixed labels, initial inner lr 0.02 through softplus,
xavier θ0 from a fixed seed, real batch 512 (digits) / 1024 (mnist5k), float32.
T = steps × epochs with epochs = 3 when 3 divides T, else epochs = 1:
T=1 → 1×1, 3 → 1×3, 10 → 10×1, 30 → 10×3, 100 → 100×1.

Budget: ``--max-seconds`` caps the wall time spent on one (model, T, engine) cell.  A call
that would overrun it (predicted from the previous call) is not started, and a call that
overruns it anyway is interrupted (SIGALRM); a cell with no finished timed call prints
"skipped", and larger T of the same engine are skipped too.

``--match-torch`` instead mirrors torch_dd.py's own timing: ``Distiller.step()`` of
``ddref distill`` (meta-gradient + Adam step + real-batch sampling) for ``--iters`` outer
iterations at 10 steps × 3 epochs, median seconds per outer iteration with the first 2
dropped, and peak RSS (``ru_maxrss``, like torch_dd.py), printed as the same RESULT lines.

    python benchmarks/hypergrad.py                       # full table (2 min on 2 quiet cores, 7 min busy)
    python benchmarks/hypergrad.py --quick               # smoke run
    python benchmarks/hypergrad.py --models lenet --T 30 --repeats 5
    python benchmarks/hypergrad.py --match-torch --models lenet --threads 2 --iters 6
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

SETUPS = {  # model -> (data set, real batch), as in the PyTorch reference
    "mlp": ("digits", 512),
    "lenet": ("mnist5k", 1024),
}
ENGINES = ("naive", "backgrad")
DISTILL_LR = 0.02
N_CLASSES_PER_STEP = 10  # one image per class per step
SPLIT_RULE = "T = steps × epochs, epochs = 3 if 3 divides T else 1"


def split(T):
    """(steps, epochs) of T inner steps: epochs = 3 when 3 divides T, else 1."""
    epochs = 3 if T % 3 == 0 else 1
    return T // epochs, epochs


# ---------------------------------------------------------------------------- environment


def _threadpools():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return threadpool_info()


def _git_describe():
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{rev}{' + uncommitted changes' if dirty else ''}" if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_environment(args):
    from importlib.metadata import PackageNotFoundError, version  # autograd has no __version__

    import ddref

    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "?"

    load = os.getloadavg()
    print(f"# ddref {getattr(ddref, '__version__', '?')} (git {_git_describe()}), "
          f"python {platform.python_version()}, numpy {np.__version__}, autograd {ver('autograd')}")
    print(f"# machine: {platform.machine()} {os.cpu_count()} CPUs; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min) at start; {time.strftime('%Y-%m-%d %H:%M:%S')}")
    pools = _threadpools()
    if pools is None:
        print("# BLAS: threadpoolctl not installed (pip install threadpoolctl to see and set BLAS threads)")
    else:
        for p in pools:
            print(f"# {p.get('user_api')}: {p.get('internal_api')} {p.get('version')} "
                  f"threads={p.get('num_threads')} arch={p.get('architecture', '?')} ({Path(p.get('filepath', '?')).name})")
    if load[0] > (os.cpu_count() or 1):
        print(f"# WARNING: load {load[0]:.2f} > {os.cpu_count()} CPUs: other processes compete for the cores; "
              f"multi-threaded BLAS then waits on its own threads and small matrix products can run several "
              f"times slower (compare with --threads 1); absolute times are unreliable, ratios less so")
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    print(f"# --threads {args.threads if args.threads else '(not set: BLAS default)'}"
          f"{'; env ' + ' '.join(f'{k}={v}' for k, v in env.items()) if env else ''}")


def limit_threads(n):
    """Limit BLAS/OpenMP threads to n (None: leave as is).  Returns a context manager."""
    import contextlib

    if not n:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(f"# warning: threadpoolctl missing, --threads {n} ignored; set OPENBLAS_NUM_THREADS={n} "
              f"OMP_NUM_THREADS={n} before starting python instead", file=sys.stderr)
        return contextlib.nullcontext()
    return threadpool_limits(limits=n)


# ---------------------------------------------------------------------------- budgeted calls


class CellTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise CellTimeout


def call_within(seconds, fn):
    """fn() with a wall-clock limit (SIGALRM; the autograd loops are Python, so it lands
    between two numpy calls).  Returns (result, seconds); raises CellTimeout."""
    if seconds <= 0:
        raise CellTimeout
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def traced_peak_mb(seconds, fn):
    """Peak MB allocated during fn() (tracemalloc), and fn's wall time under tracing."""
    gc.collect()
    tracemalloc.start()
    try:
        _, dt = call_within(seconds, fn)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak / 2**20, dt


class Cell:
    """Timing and memory of one (model, T, kind) cell within a time budget."""

    def __init__(self, budget):
        self.budget, self.spent = budget, 0.0
        self.times, self.peak_mb, self.skipped = [], None, None
        self.traced_seconds = None   # wall time of the traced call (slower: tracemalloc is on)
        self.done = False            # out of budget

    def wants_more(self, repeats, min_time, max_calls):
        if self.skipped or self.done:
            return False
        n = len(self.times)
        return n < repeats or (sum(self.times) < min_time and n < max_calls)

    def _remaining(self):
        return self.budget - self.spent

    def _run(self, fn, traced):
        expected = self.times[-1] if self.times else self.traced_seconds
        if expected is not None and expected > self._remaining():
            raise CellTimeout
        t0 = time.perf_counter()
        try:
            if traced:
                self.peak_mb, self.traced_seconds = traced_peak_mb(self._remaining(), fn)
            else:
                gc.collect()
                _, dt = call_within(self._remaining(), fn)
                self.times.append(dt)
        finally:
            self.spent += time.perf_counter() - t0

    def measure_memory(self, fn):
        try:
            self._run(fn, traced=True)
        except CellTimeout:
            self.skipped = f"skipped (> {self.budget:g} s)"

    def measure_time(self, fn):
        """One timed call; returns False once the budget is used up."""
        if self.skipped:
            return False
        try:
            self._run(fn, traced=False)
            return True
        except CellTimeout:
            if not self.times and self.traced_seconds is None:
                self.skipped = f"skipped (> {self.budget:g} s)"
            return False

    @property
    def median(self):
        """Median of the timed calls; without any, the traced call's time (flagged by `traced_only`)."""
        if self.times:
            return statistics.median(self.times)
        return self.traced_seconds

    @property
    def traced_only(self):
        return not self.times and self.traced_seconds is not None


# ---------------------------------------------------------------------------- the table


def setup_model(model_name, dtype, seed):
    from ddref import data, losses, nn

    data_name, batch = SETUPS[model_name]
    ds = data.load(data_name, dtype=dtype)
    model = nn.build_model(model_name, ds.image_shape, ds.num_classes)
    rng = np.random.default_rng(seed)
    theta0 = model.init(rng, dtype=dtype)
    targets = losses.one_hot(np.arange(N_CLASSES_PER_STEP) % ds.num_classes, ds.num_classes, dtype)
    idx = rng.choice(len(ds.y_train), size=min(batch, len(ds.y_train)), replace=False)
    x_real = np.ascontiguousarray(ds.x_train[idx], dtype=dtype)
    real_targets = losses.one_hot(ds.y_train[idx], ds.num_classes, dtype)
    return ds, model, theta0, targets, x_real, real_targets


def bench_table(args):
    from ddref import engines, hypergrad, losses
    from ddref.unroll import inverse_softplus, softplus, unroll

    rows = []
    header = ("| model / data | T | S×E | real batch | forward s | naive s | naive / fwd | naive MB "
              "| backgrad s | backgrad / fwd | backgrad MB | backgrad / naive | n (f/n/b) |")
    print()
    print(f"# {SPLIT_RULE}; 1 image per class per step (10 per step); dtype {args.dtype}; "
          f"repeats {args.repeats} (median; cheap cells up to {10 * args.repeats} calls or {args.min_time:g} s); budget {args.max_seconds:g} s per cell; "
          f"engines {' '.join(args.engines)}")
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    t_all = time.perf_counter()
    for model_name in args.models:
        data_name, batch = SETUPS[model_name]
        ds, model, theta0, targets, x_real, real_targets = setup_model(model_name, args.dtype, args.seed)
        too_slow = {}  # engine -> T at which it ran out of budget
        for T in args.T:
            steps, epochs = split(T)
            rng = np.random.default_rng(args.seed + 1000 + T)
            x = rng.normal(size=(steps, N_CLASSES_PER_STEP, *ds.image_shape)).astype(args.dtype)
            raw = np.full((epochs, steps), inverse_softplus(DISTILL_LR), dtype=args.dtype)

            def forward():
                params = unroll(model.apply, theta0, x, targets, softplus(raw))
                return float(losses.cross_entropy(model.apply(params, x_real), real_targets))

            def engine_fn(engine):
                return lambda: engines.meta_gradient(engine, model.apply, theta0, x, targets, raw,
                                                       x_real, real_targets)

            fns = {"forward": forward, **{e: engine_fn(e) for e in args.engines}}
            cells = {k: Cell(args.max_seconds) for k in fns}
            for kind, cell in cells.items():
                if kind in too_slow:
                    cell.skipped = f"skipped (T={too_slow[kind]} was over budget)"
            # one traced call each: peak memory, and the warm-up
            for kind, fn in fns.items():
                if not cells[kind].skipped:
                    if args.no_memory:
                        cells[kind].measure_time(fn)     # untraced warm-up, not kept
                        cells[kind].times.clear()
                    else:
                        cells[kind].measure_memory(fn)
            # timed calls, round robin; cheap cells go on until they add up to --min-time
            max_calls = max(args.repeats, 10 * args.repeats)
            while True:
                active = [k for k, c in cells.items() if c.wants_more(args.repeats, args.min_time, max_calls)]
                if not active:
                    break
                for kind in active:
                    if not cells[kind].measure_time(fns[kind]):
                        cells[kind].done = True
            for kind, cell in cells.items():
                if cell.skipped and kind not in too_slow:
                    too_slow[kind] = T
            rows.append(format_row(model_name, data_name, T, steps, epochs, batch, cells, args))
            print(rows[-1], flush=True)
    print(f"# table took {time.perf_counter() - t_all:.0f} s; load average now "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print("# forward = unroll + outer loss, no meta-gradient; X / fwd = median(X) / median(forward); "
          "MB = tracemalloc peak of one call (allocations during the call only); "
          "n = timed calls per column (budget may cut them); "
          "† = no untraced call fitted the budget: the time is that of the traced call (tracemalloc on, "
          "somewhat slower)")


def format_row(model_name, data_name, T, steps, epochs, batch, cells, args):
    def sec(c):
        if c is None:
            return "–"
        if c.skipped:
            return c.skipped
        return (f"{c.median:.4f}" if c.median < 1 else f"{c.median:.3f}") + ("†" if c.traced_only else "")

    def mb(c):
        if c is None or c.skipped or c.peak_mb is None:
            return "–"
        return f"{c.peak_mb:.1f}"

    def ratio(a, b):
        if a is None or b is None or a.skipped or b.skipped or a.median is None or b.median is None:
            return "–"
        return f"{a.median / b.median:.2f}" + ("†" if a.traced_only or b.traced_only else "")

    f, n, b = cells["forward"], cells.get("naive"), cells.get("backgrad")
    counts = "/".join(str(len(c.times)) if c is not None else "–" for c in (f, n, b))
    return (f"| {model_name} / {data_name} | {T} | {steps}×{epochs} | {batch} | {sec(f)} | {sec(n)} | "
            f"{ratio(n, f)} | {mb(n)} | {sec(b)} | {ratio(b, f)} | {mb(b)} | {ratio(b, n)} | {counts} |")


# ---------------------------------------------------------------------------- --match-torch


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def match_torch(args):
    """torch_dd.py's timing loop, on ddref distill's own outer iteration."""
    import dataclasses

    from ddref.distill import DistillConfig, Distiller

    steps, epochs = args.steps, args.epochs
    for model_name in args.models:
        data_name, batch = SETUPS[model_name]
        for engine in args.engines:
            wanted = dict(dataset=data_name, model=model_name, init=args.init, n_nets=args.n_nets,
                          steps=steps, epochs=epochs,
                          images_per_class=1, distill_lr=DISTILL_LR, batch_size=batch, engine=engine,
                          dtype=args.dtype, seed=args.seed, iterations=args.iters, decay_every=0,
                          eval_every=0, checkpoint_every=0)
            known = {f.name for f in dataclasses.fields(DistillConfig)}
            config = DistillConfig(**{k: v for k, v in wanted.items() if k in known})
            distiller = Distiller(config, progress=False)
            print(f"ddref distill step: model={model_name} data={data_name} steps={steps} epochs={epochs} "
                  f"n_per_step={len(distiller.labels)} real_batch={batch} init={args.init} n_nets={args.n_nets} engine={engine} "
                  f"dtype={args.dtype} iters={args.iters} threads={args.threads or 'default'}", flush=True)
            rss0 = rss_mb()
            times, t_start = [], time.perf_counter()
            for it in range(args.iters):
                t0 = time.perf_counter()
                loss = distiller.step()
                times.append(time.perf_counter() - t0)
                if it == 0 or it + 1 == args.iters:
                    print(f"it {it + 1:5d}  outer loss {loss:.4f}  iter {times[-1]:.3f}s  "
                          f"elapsed {time.perf_counter() - t_start:.1f}s", flush=True)
                if time.perf_counter() - t_start > args.max_seconds and len(times) >= 3:
                    print(f"# stopped after {len(times)} iterations: --max-seconds {args.max_seconds:g} reached",
                          flush=True)
                    break
            steady = times[2:] if len(times) > 2 else times
            print(f"RESULT sec_per_outer_iter median {statistics.median(steady):.4f}  "
                  f"mean {statistics.mean(steady):.4f}  min {min(steady):.4f}  "
                  f"(n={len(steady)}, 2 warmup dropped)", flush=True)
            print(f"RESULT peak_rss_mb {rss_mb():.1f}  (before training loop {rss0:.1f})", flush=True)
            del distiller
            gc.collect()


# ---------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    ap.add_argument("--T", nargs="+", type=int, default=[1, 3, 10, 30, 100], metavar="T",
                    help=f"inner steps ({SPLIT_RULE})")
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per cell (median); default 3")
    ap.add_argument("--min-time", type=float, default=1.0,
                    help="keep timing a cheap cell past --repeats until its timed calls add up to this "
                         "many seconds (at most 10 × repeats calls); default 1.0")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="wall-time budget per cell (table) or per run (--match-torch); "
                         "default 60 (table) / 120 (--match-torch)")
    ap.add_argument("--threads", type=int, default=None,
                    help="limit BLAS threads (threadpoolctl); default: leave the BLAS default")
    ap.add_argument("--no-memory", action="store_true", help="skip the tracemalloc call (untraced warm-up instead)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: T in {1, 3}, 1 repeat")
    ap.add_argument("--match-torch", action="store_true",
                    help="time `ddref distill` outer iterations the way torch_dd.py does (RESULT lines)")
    ap.add_argument("--iters", type=int, default=10, help="--match-torch: outer iterations (first 2 dropped)")
    ap.add_argument("--steps", type=int, default=10, help="--match-torch: steps (default 10)")
    ap.add_argument("--epochs", type=int, default=3, help="--match-torch: epochs (default 3)")
    ap.add_argument("--init", choices=["fixed", "random"], default="fixed",
                    help="--match-torch: fixed θ0 (default) or a fresh θ0 ~ p(θ0) every iteration")
    ap.add_argument("--n-nets", type=int, default=1,
                    help="--match-torch with --init random: networks per outer iteration (default 1)")
    args = ap.parse_args(argv)
    if args.quick:
        args.T, args.repeats, args.min_time = [1, 3], 1, 0.0
    if args.max_seconds is None:
        args.max_seconds = 120.0 if args.match_torch else 60.0
    if args.repeats < 1 or any(t < 1 for t in args.T):
        ap.error("--repeats and every --T must be at least 1")

    with limit_threads(args.threads):
        print_environment(args)
        if args.match_torch:
            match_torch(args)
        else:
            bench_table(args)


if __name__ == "__main__":
    main()
