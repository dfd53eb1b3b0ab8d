#!/usr/bin/env bash
# The Fashion-MNIST results grid (issue 17; docs/results.md "Fashion-MNIST"): LeNet, Algorithm 1
# under fixed and random init with 100 images (10 steps × 3 epochs × 1 image per class) and 10
# images (1 step × 3 epochs), against random real, k-means, class average and the full training
# set, each judged by the paper's protocol and by the field's (ddref.protocol: 5 fresh networks
# × 300 epochs on the set as a pool).  The grid is GRIDS["fashion"] in ddref/table/grids.py.
# Needs fashion-mnist (`ddref datasets`: Debian's dataset-fashion-mnist, $DDREF_DATA, or
# `ddref download fashion-mnist`).
# Expected wall time: 23 minutes measured on 2 shared cores with --jobs 2 (plan for up to 45
# when other work loads the machine; each cell's seconds are
# in results/fashion/table.json); a rerun computes only the cells missing from
# results/fashion/cells.          Usage: bash benchmarks/fashion_grid.sh [JOBS]
set -euo pipefail
jobs=${1:-2}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ddref table --grid fashion --jobs "$jobs" --no-progress
# outputs: results/fashion/table.md, table.json (every row with n, seed, seconds and command),
# table.png; one cell alone: ddref table --grid fashion --only fashion-mnist-lenet-10img-fixed-kmeans
