#!/usr/bin/env python
"""Evaluation one network at a time against many networks stacked into one computation.

Two workloads per data set, the MLP, 10 steps × 3 epochs of 1 image per class per step:

* held-out — 10 held-out initialisations trained on one set of images (the distilled-set
             evaluation, ``evaluate.evaluate_distilled``), then their test accuracy;
* baseline — the random-real baseline: the 8 grid learning rates × 3 tune draws trained and
             scored on the training split, then 10 draws at the chosen lr scored on the test
             split (``baselines.random_real_baseline``).

"loop" is the readable definition, one network after the other (``train_on_steps``,
``accuracy_on``, the grid lr by lr); "batched" is ``train_many`` / ``accuracies_on`` as ddref
uses them.  Both see the same images, networks and grid, so they must report the same
accuracies: the script checks that before it prints a time.  The images stand in for a
distilled set (random real ones; any images cost the same).  Timed calls alternate between
loop and batched (a change of machine load hits both alike); medians over ``--repeats``.

    python benchmarks/evaluation.py                   # digits and mnist5k, 1 BLAS thread
    python benchmarks/evaluation.py --datasets digits --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from ddref import baselines, data, evaluate, nn
from ddref.evaluate import (BASELINE_LR_GRID, accuracy_on, held_out_inits, sample_real_steps,
                            train_on_steps)
from ddref.losses import one_hot

STEPS, EPOCHS, LR, N_INITS, N_DRAWS, TUNE_DRAWS = 10, 3, 0.02, 10, 10, 3


def workload(name, dtype):
    dataset = data.load(name, dtype=dtype)
    model = nn.build_model("mlp", dataset.image_shape, dataset.num_classes)
    labels = np.arange(dataset.num_classes)
    x_steps = sample_real_steps(dataset, STEPS, labels, np.random.default_rng(0))
    lrs = np.full((EPOCHS, STEPS), LR)
    return dataset, model, labels, x_steps, lrs


# ---------------------------------------------------------------------------- one network at a time


def held_out_loop(dataset, model, labels, x_steps, lrs, dtype):
    targets = one_hot(labels, dataset.num_classes, dtype)
    return [accuracy_on(model.apply, train_on_steps(model.apply, th, x_steps, targets, lrs),
                        dataset.x_test, dataset.y_test)
            for th in held_out_inits(model, N_INITS, 0, dtype)]


def baseline_loop(dataset, model, labels, dtype):
    """``baselines.random_real_baseline`` written as loops over networks and grid values."""
    inits = held_out_inits(model, N_DRAWS, 0, dtype)
    sets = baselines.baseline_sets("random_real", model, dataset, STEPS, EPOCHS, labels, inits,
                                   N_DRAWS, 0, BASELINE_LR_GRID, TUNE_DRAWS)
    targets = one_hot(labels, dataset.num_classes, dtype)
    pairs = baselines.pairs_of(sets, inits)

    def trained(pairs, lr):
        return [train_on_steps(model.apply, th, x, targets, np.full((EPOCHS, STEPS), lr))
                for x, th in pairs]

    def score(lr):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            nets = trained(pairs[:TUNE_DRAWS], lr)
            if not all(np.isfinite(w).all() for p in nets for w in p.values()):
                return -np.inf
            try:
                return np.mean([accuracy_on(model.apply, p, dataset.x_train, dataset.y_train)
                                for p in nets])
            except evaluate.TrainingDiverged:
                return -np.inf

    lr = float(max(BASELINE_LR_GRID, key=score))
    return [accuracy_on(model.apply, p, dataset.x_test, dataset.y_test)
            for p in trained(pairs[:N_DRAWS], lr)], lr


# ---------------------------------------------------------------------------- stacked


def held_out_batched(dataset, model, labels, x_steps, lrs, dtype):
    return list(evaluate.evaluate_distilled(model, dataset, x_steps, labels, lrs, n_inits=N_INITS,
                                            seed=0).values)


def baseline_batched(dataset, model, labels, dtype):
    accuracy, lr = baselines.random_real_baseline(model, dataset, STEPS, EPOCHS, labels,
                                                 n_draws=N_DRAWS, seed=0, dtype=dtype,
                                                 tune_draws=TUNE_DRAWS)
    return list(accuracy.values), lr


def seconds(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    print(f"| data set | workload | loop s | batched s | batched ÷ loop |  "
          f"({args.threads} BLAS thread(s), {args.dtype}, median of {args.repeats})")
    print("|---|---|---|---|---|")
    with threadpool_limits(limits=args.threads, user_api="blas"):
        for name in args.datasets:
            dataset, model, labels, x_steps, lrs = workload(name, args.dtype)
            jobs = {f"held-out ({N_INITS} inits)": (held_out_loop, held_out_batched,
                                                    (dataset, model, labels, x_steps, lrs, args.dtype)),
                    f"baseline ({len(BASELINE_LR_GRID)} lrs × {TUNE_DRAWS} + {N_DRAWS} draws)":
                        (baseline_loop, baseline_batched, (dataset, model, labels, args.dtype))}
            for job, (loop, batched, job_args) in jobs.items():
                times = {"loop": [], "batched": []}
                for _ in range(args.repeats):
                    t_loop, r_loop = seconds(loop, *job_args)
                    t_batched, r_batched = seconds(batched, *job_args)
                    if r_loop != r_batched:
                        raise SystemExit(f"{name} {job}: loop gives {r_loop}, batched {r_batched}")
                    times["loop"].append(t_loop)
                    times["batched"].append(t_batched)
                loop_s, batched_s = (statistics.median(times[k]) for k in ("loop", "batched"))
                print(f"| {name} | {job} | {loop_s:.3f} | {batched_s:.3f} | {batched_s / loop_s:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
