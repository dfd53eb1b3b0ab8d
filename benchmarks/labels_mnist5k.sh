#!/usr/bin/env bash
# Hard against learned labels on mnist5k / LeNet, fixed init (README "Beyond the paper",
# chapter 9): 1 step × 3 epochs, real batch 1,024, 1,000 outer iterations (outer lr halved every
# 400), float32, one BLAS thread; one fixed θ0 per seed, so each run is one trained network.
#   10 images: hard labels and free learned labels (t = z, label lr 0.003), seeds 0-5; free
#              labels with label lr 0.01, seeds 0-2; softmax learned labels, two settings, seed 0;
#   5 images for 10 classes: hard labels (classes 0-4 only) and free learned labels, seed 0;
#   10 images, 2,000 iterations: hard and free labels (label lr 0.003), seeds 0-2.
# Prints the final test accuracy of each run, the mean of its last five curve points (every 50
# iterations: a single point swings by several points) and the mean outer loss of its last 100
# iterations (for the 2,000-iteration runs the last five points span iterations 1,600-2,000).
# About 4 minutes per 1,000 iterations alone on one core (two hours for the 25 runs; runs
# already finished in OUT are kept).
# Usage: bash benchmarks/labels_mnist5k.sh [OUT]        (default runs/labels-mnist5k)
set -euo pipefail
out=${1:-runs/labels-mnist5k}
common=(--dataset mnist5k --model lenet --batch-size 1024 --steps 1 --epochs 3 --iterations 1000
        --decay-every 400 --eval-every 50 --no-progress)
free=(--learn-labels --label-form free)

run() {   # NAME OPTIONS…: distil into $out/NAME unless it is already finished there
    local name=$1; shift
    [[ -f $out/$name/metrics.json ]] || python -m ddref --threads 1 distill "${common[@]}" "$@" \
        --out "$out/$name" --force > /dev/null
}
for seed in 0 1 2 3 4 5; do
    run "hard-10-seed$seed" --seed "$seed"
    run "free-10-seed$seed" "${free[@]}" --label-lr 0.003 --seed "$seed"
done
for seed in 0 1 2; do
    run "free-10-lr0.01-seed$seed" "${free[@]}" --label-lr 0.01 --seed "$seed"
done
run softmax-10-init0.9 --learn-labels --label-lr 0.01
run softmax-10-init0.99 --learn-labels --label-lr 0.01 --label-init 0.99
run hard-5 --images 5
run free-5 --images 5 "${free[@]}" --label-lr 0.01
# twice as long: 2,000 iterations, outer lr halved every 800 (options given later win)
long=(--iterations 2000 --decay-every 800 --eval-every 100)
for seed in 0 1 2; do
    run "hard-10-2000it-seed$seed" "${long[@]}" --seed "$seed"
    run "free-10-2000it-seed$seed" "${long[@]}" "${free[@]}" --label-lr 0.003 --seed "$seed"
done

python - "$out" <<'PY'
import json, pathlib, sys
print(f"{'run':<22} {'final':>7} {'last 5 points':>13} {'outer loss (last 100)':>22}")
for run in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    history = json.loads((run / "metrics.json").read_text())["history"]
    points, losses = history["eval_accuracies"], history["losses"]
    print(f"{run.name:<22} {100 * points[-1]:>6.2f}% {100 * sum(points[-5:]) / 5:>12.2f}% "
          f"{sum(losses[-100:]) / 100:>22.4f}")
PY
