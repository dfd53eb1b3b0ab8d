#!/usr/bin/env bash
# Step order and other architectures on mnist5k (README "Beyond the paper"): the LeNet sets of
# the results grid (results/cells/mnist5k-lenet-{fixed,random}-distilled, made by
# `ddref table --grid readme`) and two MLP sets distilled here, each evaluated in its learned
# order, with its steps shuffled, as an unordered pool, and on the other architectures.
# About 8 minutes on 2 shared cores.   Usage: bash benchmarks/reuse_mnist5k.sh [OUT]
set -euo pipefail
out=${1:-runs/reuse-mnist5k}
cells=results/cells
mkdir -p "$out"
for init in fixed random; do
    [[ -f $out/mlp-$init/metrics.json ]] || ddref distill --dataset mnist5k --model mlp \
        --batch-size 1024 --init "$init" --iterations 1000 --decay-every 400 --eval-every 200 \
        --eval-inits 3 --baseline-draws 3 --out "$out/mlp-$init" --no-progress
done
for set in $cells/mnist5k-lenet-fixed-distilled $cells/mnist5k-lenet-random-distilled \
           "$out/mlp-fixed" "$out/mlp-random"; do
    n=(); [[ $set == *random* ]] && n=(--n-inits 3)
    for order in learned shuffled pool; do
        ddref evaluate "$set/distilled.npz" --order "$order" "${n[@]}"
    done
done
for set in $cells/mnist5k-lenet-fixed-distilled $cells/mnist5k-lenet-random-distilled; do
    for model in mlp convnet; do ddref evaluate "$set/distilled.npz" --model "$model" --n-inits 3; done
done
for set in "$out/mlp-fixed" "$out/mlp-random"; do
    for model in lenet convnet; do ddref evaluate "$set/distilled.npz" --model "$model" --n-inits 3; done
done
