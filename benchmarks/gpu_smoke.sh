#!/usr/bin/env bash
# GPU smoke check, one command, a few minutes at most: the `gpu` tests (numpy vs CuPy
# meta-gradients and every patched autograd rule, on real CuPy), then seconds per outer
# iteration of LeNet on MNIST-shaped data on numpy and on CuPy, and their ratio.
#
# Usage: bash benchmarks/gpu_smoke.sh [--numpy-only] [--repeats N] [--dtype float64]
# Needs: pip install -e ".[gpu,dev]" and an NVIDIA GPU.  Without CuPy or a GPU the gpu
# tests are skipped and only the numpy time is printed.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}

echo "== pytest -m gpu"
timeout 100 "$python" -m pytest -m gpu -q -p no:cacheprovider
tests=$?
[ "$tests" -eq 5 ] && tests=0          # 5 = no gpu tests collected: nothing failed

echo "== seconds per outer iteration"
timeout 80 "$python" benchmarks/gpu_smoke.py "$@"
bench=$?

exit $(( tests != 0 ? tests : bench ))
