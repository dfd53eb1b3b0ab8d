#!/usr/bin/env python
"""Peak memory and time of the meta-gradient engines against the number of inner steps T.

For each model / data set, each T and each engine of :mod:`ddref.reversible` (naive,
backgrad, checkpoint, reverse, and backgrad truncated to the last 10 steps), on the inner
loop with momentum β (default 0.9: the reverse engine needs β > 0; every engine runs the
same unroll), it measures

* peak MB — ``tracemalloc`` peak of one call: every Python object and numpy buffer allocated
  *during* the call (numpy reports its buffers to tracemalloc), not the inputs (θ0, x̃, the
  real batch) that already exist;
* seconds — one more call, untraced (tracing slows allocation down).

T = steps × epochs with 10 steps (one image per class each) and T / 10 epochs, as a longer
distillation would grow it.  Settings otherwise as benchmarks/hypergrad.py: initial inner lr
0.02 through softplus, xavier θ0 from a fixed seed, real batch 512 (digits) / 1024 (mnist5k).

A cell that runs past ``--max-seconds`` is interrupted (SIGALRM between two numpy calls) and
its engine is skipped for larger T.  Results: a markdown table on stdout and in
``--out``/memory.md, the numbers in memory.json, and the figure memory.png (peak MB and
seconds against T, log-log), plus the growth checks: reverse's peak at the largest T over its
peak at T = 10, and the slope of log(peak) against log(T) per engine (√T has slope 0.5).

    python benchmarks/memory.py                                    # MLP to T=1000, LeNet to 300
    python benchmarks/memory.py --models mlp --T 10 30 100 300 1000
    python benchmarks/memory.py --quick                            # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import time
import tracemalloc
from pathlib import Path

import numpy as np

SETUPS = {"mlp": ("digits", 512), "lenet": ("mnist5k", 1024)}
DEFAULT_T = {"mlp": [10, 30, 100, 300, 1000], "lenet": [10, 30, 100, 300]}
ENGINES = ("naive", "backgrad", "checkpoint", "reverse", "truncate")
TRUNCATE = 10
DISTILL_LR = 0.02
STEPS = 10


class OverBudget(Exception):
    pass


def _alarm(signum, frame):
    raise OverBudget


def call_within(seconds, fn):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def peak_mb(seconds, fn):
    gc.collect()
    tracemalloc.start()
    try:
        call_within(seconds, fn)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def problem(model_name, T, dtype, seed):
    from ddref import data, losses, nn
    from ddref.unroll import inverse_softplus

    data_name, batch = SETUPS[model_name]
    ds = data.load(data_name, dtype=dtype)
    model = nn.build_model(model_name, ds.image_shape, ds.num_classes)
    rng = np.random.default_rng(seed)
    theta0 = model.init(rng, dtype=dtype)
    steps = min(T, STEPS)
    if T % steps:
        raise SystemExit(f"--T {T}: give T ≤ {STEPS} or a multiple of {STEPS} (T = steps × epochs).")
    x = rng.normal(size=(steps, 10, *ds.image_shape)).astype(dtype)
    targets = losses.one_hot(np.arange(10) % ds.num_classes, ds.num_classes, dtype)
    raw = np.full((T // steps, steps), inverse_softplus(DISTILL_LR), dtype=dtype)
    idx = rng.choice(len(ds.y_train), size=min(batch, len(ds.y_train)), replace=False)
    x_real = np.ascontiguousarray(ds.x_train[idx], dtype=dtype)
    real_targets = losses.one_hot(ds.y_train[idx], ds.num_classes, dtype)
    n_params = sum(v.size for v in theta0.values())
    return dict(apply=model.apply, theta0=theta0, x_distilled=x, targets=targets, raw_lrs=raw,
                x_real=x_real, real_targets=real_targets), data_name, n_params


def engine_call(engine, p, momentum):
    from ddref import engines

    if engine == "truncate":
        return lambda: engines.meta_gradient("backgrad", **p, momentum=momentum, truncate=TRUNCATE)
    return lambda: engines.meta_gradient(engine, **p, momentum=momentum)


def run(args):
    rows = []
    for model_name in args.models:
        too_slow = {}
        for T in args.T or DEFAULT_T[model_name]:
            p, data_name, n_params = problem(model_name, T, args.dtype, args.seed)
            theta_mb = n_params * np.dtype(args.dtype).itemsize / 2**20
            for engine in args.engines:
                row = dict(model=model_name, data=data_name, T=T, engine=engine, n_params=n_params,
                           theta_mb=theta_mb, peak_mb=None, seconds=None, note="")
                if engine in too_slow:
                    row["note"] = f"skipped (T={too_slow[engine]} over {args.max_seconds:g} s)"
                else:
                    fn = engine_call(engine, p, args.momentum)
                    try:
                        row["peak_mb"] = peak_mb(args.max_seconds, fn)
                        gc.collect()
                        row["seconds"] = call_within(args.max_seconds, fn)
                    except OverBudget:
                        too_slow[engine] = T
                        row["note"] = f"over {args.max_seconds:g} s"
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


HEADER = "| model / data | T | engine | peak MB | peak / |θ| | seconds | note |"


def format_row(r):
    mb = "–" if r["peak_mb"] is None else f"{r['peak_mb']:.2f}"
    ratio = "–" if r["peak_mb"] is None else f"{r['peak_mb'] / r['theta_mb']:.1f}"
    sec = "–" if r["seconds"] is None else f"{r['seconds']:.2f}"
    name = f"truncate {TRUNCATE} (backgrad)" if r["engine"] == "truncate" else r["engine"]
    return f"| {r['model']} / {r['data']} | {r['T']} | {name} | {mb} | {ratio} | {sec} | {r['note']} |"


def fit_power(T, peak):
    """peak ≈ a + b·T^p: the exponent p in [0, 1.5] (grid 0.01) whose least-squares fit of
    (a, b) leaves the smallest residual.  The constant a — one step's activations and the real
    batch's — would hide the growth in a plain log-log slope."""
    T, peak = np.asarray(T, float), np.asarray(peak, float)
    best = None
    for p in np.arange(0.0, 1.501, 0.01):
        design = np.stack([np.ones_like(T), T ** p], axis=1)
        coef, *_ = np.linalg.lstsq(design, peak, rcond=None)
        residual = float(np.sum((design @ coef - peak) ** 2))
        if best is None or residual < best[0]:
            best = (residual, float(p), float(coef[0]), float(coef[1]))
    return dict(exponent=best[1], constant_mb=best[2], coefficient_mb=best[3])


def growth(rows):
    """Per (model, engine): the fitted exponent of peak ≈ a + b·T^p (≥ 3 points), the
    log-log slope, and peak(T_max) / peak(T_min)."""
    out = {}
    for key in sorted({(r["model"], r["engine"]) for r in rows}):
        pts = [(r["T"], r["peak_mb"]) for r in rows
               if (r["model"], r["engine"]) == key and r["peak_mb"] is not None]
        if len(pts) < 2:
            continue
        t, m = [a for a, _ in pts], [b for _, b in pts]
        out[f"{key[0]}/{key[1]}"] = dict(
            slope=float(np.polyfit(np.log(t), np.log(m), 1)[0]), T_min=t[0], T_max=t[-1],
            ratio=m[-1] / m[0], **(fit_power(t, m) if len(pts) >= 3 else {}))
    return out


def growth_lines(checks):
    lines = []
    for k, v in checks.items():
        fit = (f"peak ≈ {v['constant_mb']:.2f} + {v['coefficient_mb']:.3g}·T^{v['exponent']:.2f} MB; "
               if "exponent" in v else "")
        lines.append(f"# {k}: {fit}log-log slope {v['slope']:.2f}; "
                     f"peak(T={v['T_max']}) / peak(T={v['T_min']}) = {v['ratio']:.2f}")
    return lines


def draw(rows, path):
    """Per model: peak MB, the growth of the peak above the engine's own peak at the smallest T
    (in copies of θ, with T and √T guide lines), and seconds — all against T, log-log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = list(dict.fromkeys(r["model"] for r in rows))
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 4.2 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        ax_peak, ax_growth, ax_time = axes[i]
        mine = [r for r in rows if r["model"] == model]
        theta_mb = mine[0]["theta_mb"]
        for j, engine in enumerate(engines):
            pts = [r for r in mine if r["engine"] == engine and r["peak_mb"] is not None]
            if not pts:
                continue
            name = f"truncate {TRUNCATE}" if engine == "truncate" else engine
            T = np.array([r["T"] for r in pts], float)
            peak = np.array([r["peak_mb"] for r in pts])
            ax_peak.plot(T, peak, "o-", color=f"C{j}", label=name)
            copies = (peak - peak[0]) / theta_mb
            keep = copies > 0.5
            ax_growth.plot(T[keep], copies[keep], "o-", color=f"C{j}", label=name)
            ax_time.plot(T, [r["seconds"] for r in pts], "o-", color=f"C{j}", label=name)
        T_all = np.array(sorted({r["T"] for r in mine}), float)
        guide, T0 = T_all[1:], T_all[0]          # the guides are 0 at the smallest T
        ax_growth.plot(guide, guide - T0, "k:", lw=1, label="T − T₀ copies")
        ax_growth.plot(guide, 3 * (np.sqrt(guide) - np.sqrt(T0)), "k--", lw=1,
                       label="3(√T − √T₀) copies")
        data_name = SETUPS[model][0]
        for ax, label, title in (
                (ax_peak, "peak memory (MB, tracemalloc)", f"peak memory (one θ = {theta_mb:.2f} MB)"),
                (ax_growth, "peak − peak at the smallest T (copies of θ)", "what grows with T"),
                (ax_time, "seconds per meta-gradient", "time (one untraced call)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(T_all, [f"{t:g}" for t in T_all])          # the measured T, no minor labels
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("inner steps T")
            ax.set_ylabel(label)
            ax.set_title(f"{model} / {data_name}: {title}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    ap.add_argument("--T", nargs="+", type=int, default=None,
                    help="inner steps (default: 10 30 100 300 1000 for mlp, up to 300 for lenet)")
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="budget per cell (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/memory", help="folder for memory.md/.json/.png")
    ap.add_argument("--quick", action="store_true", help="smoke run: mlp, T in {10, 30}")
    ap.add_argument("--from-json", default=None, metavar="PATH",
                    help="measure nothing: redo the table, growth fits and figure from a memory.json")
    args = ap.parse_args(argv)
    if args.from_json:
        return report(json.loads(Path(args.from_json).read_text())["rows"], Path(args.out), vars(args))
    if args.quick:
        args.models, args.T = ["mlp"], [10, 30]
    if args.momentum <= 0 and "reverse" in args.engines:
        ap.error("the reverse engine needs --momentum > 0 (e.g. 0.9)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# momentum {args.momentum}; dtype {args.dtype}; T = {STEPS} steps × T/{STEPS} epochs; "
          f"1 call traced (peak) + 1 untraced (seconds); budget {args.max_seconds:g} s per cell; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    start = time.perf_counter()
    rows = run(args)
    print(f"# took {time.perf_counter() - start:.0f} s; load average now "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    report(rows, out, vars(args))


def report(rows, out, settings):
    out.mkdir(parents=True, exist_ok=True)
    checks = growth(rows)
    lines = growth_lines(checks)
    print("\n".join(lines))
    table = "\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1)] + [format_row(r) for r in rows])
    (out / "memory.md").write_text(table + "\n\n" + "\n".join(lines) + "\n")
    (out / "memory.json").write_text(json.dumps(dict(settings=settings, rows=rows, growth=checks),
                                                indent=1, default=str))
    draw(rows, out / "memory.png")
    print(f"# wrote {out}/memory.md, memory.json, memory.png")


if __name__ == "__main__":
    main()
