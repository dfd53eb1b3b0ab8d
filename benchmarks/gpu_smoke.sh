#!/usr/bin/env bash
# GPU smoke check, one command, under 5 minutes on a GPU machine (each part has a timeout):
#   1. the `gpu` tests: numpy vs CuPy meta-gradients, every patched autograd rule, on real CuPy;
#   2. the fake device's op and sync counts per outer iteration (no GPU involved);
#   3. seconds per outer iteration, LeNet (mnist-shaped, real batch 1,024) and MLP (digits-
#      shaped, 512), 10 steps × 3 epochs, float32, side by side: ddref numpy on this machine's
#      CPU, ddref CuPy, PyTorch on CUDA (torch_dd.py's outer iteration, when torch is importable);
#   4. the main job (`ddref distill`, digits / mlp, 1,000 iterations) end to end on the CPU and
#      on CuPy: wall-clock seconds and the test accuracy of each.
#
# Usage: bash benchmarks/gpu_smoke.sh            (PYTHON=... to pick the interpreter,
#        THREADS=N for the CPU runs (default: all cores), ITERATIONS=1000 for the main job)
# Needs: pip install -e ".[gpu,dev]" and an NVIDIA GPU; torch with CUDA for the PyTorch column.
# Without CuPy or a GPU the gpu tests are skipped and only the CPU columns are printed.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
THREADS=${THREADS:-$(nproc)}
ITERATIONS=${ITERATIONS:-1000}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=$(mktemp -d "${TMPDIR:-/tmp}/gpu_smoke.XXXXXX")
status=0

echo "== 1. pytest -m gpu"
timeout 120 "$python" -m pytest -m gpu -q -p no:cacheprovider tests/test_backend.py tests/test_fused.py
rc=$?; [ "$rc" -eq 5 ] && rc=0          # 5 = no gpu tests collected: nothing failed
[ "$rc" -ne 0 ] && status=$rc

echo "== 2. fake-device counts per outer iteration"
OMP_NUM_THREADS=1 timeout 60 "$python" benchmarks/gpu_smoke.py --counts || status=$?

echo "== 3. seconds per outer iteration (CPU runs at $THREADS threads)"
OMP_NUM_THREADS=$THREADS timeout 120 "$python" benchmarks/gpu_smoke.py --repeats 5 --warmup 2 || status=$?

echo "== 4. the main job end to end: ddref distill, $ITERATIONS iterations"
main_job() {  # main_job NAME BACKEND
    local start end
    start=$(date +%s.%N)
    DDREF_BACKEND=$2 timeout 100 "$python" -m ddref --threads "$THREADS" distill --iterations "$ITERATIONS" \
        --no-progress --out "$out/$1" > "$out/$1.log" 2>&1
    local rc=$?
    end=$(date +%s.%N)
    local acc
    acc=$(grep "test accuracy, .* distilled" "$out/$1.log" | sed 's/.*: *//')
    printf '| %s | %s | %s | %s |\n' "$1" "$2" "$("$python" -c "print(f'{$end - $start:.1f}')")" \
        "${acc:-failed (exit $rc), see $out/$1.log}"
    return $rc
}
echo "| run | backend | seconds | distilled test accuracy |"
echo "|---|---|---|---|"
main_job cpu numpy || status=$?
if "$python" -c 'from ddref import backend; backend.use("cupy")' 2>/dev/null; then
    main_job gpu cupy || status=$?
else
    echo "| gpu | cupy | – | skipped: no CuPy GPU here |"
fi
echo "(logs and outputs in $out)"
exit $status
