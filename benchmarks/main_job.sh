#!/usr/bin/env bash
# The README's main job end to end, against the PyTorch reference on the same settings:
#   ddref:  ddref --threads T distill            (digits, mlp, fixed init, 10 steps × 3 epochs,
#                                                 1,000 iterations, curve points, final accuracy,
#                                                 10-draw random-real baseline)
#   torch:  torch_dd.py --arch mlp --data digits --iters 1000 --threads T   (with its evaluation)
# Prints wall-clock seconds and the test accuracy of each, measured in this one run.
#
# Usage: TORCH_PYTHON=/path/to/python-with-torch bash benchmarks/main_job.sh
# Environment: THREADS (default 1), ITERATIONS (default 1000), TORCH_DD (default
# <repo>/../shared/reference/torch_dd.py), OUT (default a temporary folder).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
THREADS=${THREADS:-1}
ITERATIONS=${ITERATIONS:-1000}
TORCH_PYTHON=${TORCH_PYTHON:-python}
TORCH_DD=${TORCH_DD:-$root/../shared/reference/torch_dd.py}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

seconds() { local start=$(date +%s.%N); "$@" > "$OUT/last.log" 2>&1; local rc=$?
            python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')"; return $rc; }

ddref_s=$(seconds ddref --threads "$THREADS" distill --iterations "$ITERATIONS" \
          --out "$OUT/ddref-run" --no-progress)
ddref_acc=$(python3 -c "import json; m = json.load(open('$OUT/ddref-run/metrics.json')); \
print(f\"{100 * m['distilled_accuracy']['mean']:.2f}% (random real {100 * m['random_real_accuracy']['mean']:.2f} ± {100 * m['random_real_accuracy']['std']:.2f}%)\")")

if "$TORCH_PYTHON" -c 'import torch' 2>/dev/null && [[ -f $TORCH_DD ]]; then
    torch_s=$(seconds "$TORCH_PYTHON" "$TORCH_DD" --arch mlp --data digits --iters "$ITERATIONS" \
              --threads "$THREADS")
    distilled=$(grep "EVAL distilled" "$OUT/last.log" | sed 's/.*test acc \([0-9.]*\).*/\1/')
    real=$(grep "EVAL random-real baseline" "$OUT/last.log" | sed 's/.*test acc \([0-9.]*\) +- \([0-9.]*\).*/\1 ± \2/')
    torch_acc="${distilled}% (random real ${real}%)"
else
    torch_s="n/a"; torch_acc="(no torch: set TORCH_PYTHON)"
fi
echo "| implementation | command | seconds | test accuracy |"
echo "|---|---|---|---|"
echo "| ddref $(ddref --version | cut -d' ' -f2) | \`ddref --threads $THREADS distill --iterations $ITERATIONS\` | $ddref_s | $ddref_acc |"
echo "| PyTorch reference | \`torch_dd.py --arch mlp --data digits --iters $ITERATIONS --threads $THREADS\` | $torch_s | $torch_acc |"
