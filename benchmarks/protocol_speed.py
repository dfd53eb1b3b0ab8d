"""Seconds for the field's protocol (ddref.protocol.evaluate) on a Fashion-MNIST-shaped cell:
a pool of N images 1×28×28 in 10 classes, E epochs (E + 1 passes, as DC's loop), K networks,
tested on T images.  Random pixels stand in for the data (the time does not depend on them).

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD \\
        python benchmarks/protocol_speed.py --models lenet convnet3 --width 32 --epochs 300

Prints, per model: training and test wall seconds per network, what one cell (K networks)
costs at that rate, and the process's CPU seconds beside the wall seconds (on a shared machine
the CPU time is the better estimate of the cost on a quiet core).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ddref import nn, protocol
from ddref.data import Dataset


def fake_dataset(n_test, shape, classes, seed=0):
    rng = np.random.default_rng(seed)
    x_test = rng.normal(size=(n_test, *shape)).astype("float32")
    y_test = rng.integers(0, classes, n_test)
    return Dataset("fashion-shaped", x_test[:1], y_test[:1], x_test, y_test,
                   np.zeros(shape[0]), np.ones(shape[0]), tuple(map(str, range(classes))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet", "convnet3"])
    parser.add_argument("--width", type=int, default=32, help="convnet3's width")
    parser.add_argument("--images", type=int, default=100, help="pool size N")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--n-nets", type=int, default=1, help="networks timed (K)")
    parser.add_argument("--test", type=int, default=10_000, help="test images T")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    shape, classes = (1, 28, 28), 10
    data = fake_dataset(args.test, shape, classes)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(args.images, *shape)).astype("float32")
    labels = np.arange(args.images) % classes
    recipe = protocol.Recipe(epochs=args.epochs, n_nets=args.n_nets)
    rows = []
    for name in args.models:
        options = {"width": args.width} if name == "convnet3" else {}
        model = nn.build_model(name, shape, classes, **options)
        start, cpu = time.perf_counter(), time.process_time()
        result = protocol.evaluate(model, data, images, labels, recipe, seed=0, diverged="nan")
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        row = {"model": name, **options, "images": args.images, "epochs": args.epochs,
               "passes": recipe.passes, "n_nets": args.n_nets, "test_images": args.test,
               "train_s_per_net": result.seconds_train / args.n_nets,
               "test_s_per_net": result.seconds_test / args.n_nets, "wall_s": wall, "cpu_s": cpu}
        rows.append(row)
        per_net = (result.seconds_train + result.seconds_test) / args.n_nets
        print(f"{name}{' width ' + str(args.width) if options else ''}: "
              f"train {row['train_s_per_net']:.1f} s/net ({1000 * row['train_s_per_net'] / recipe.passes:.0f} ms "
              f"per pass of {args.images} images), test {row['test_s_per_net']:.1f} s/net on {args.test} "
              f"images; one cell of K=5: {5 * per_net / 60:.1f} min, K=20: {20 * per_net / 60:.1f} min "
              f"(CPU time {cpu:.1f} s of {wall:.1f} s wall: below 1 on a busy machine)",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
