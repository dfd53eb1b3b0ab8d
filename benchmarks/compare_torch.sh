#!/usr/bin/env bash
# ddref against the PyTorch reference (../shared/reference/torch_dd.py), same settings, one run:
# mlp/digits (real batch 512) and lenet/mnist5k (real batch 1024), 10 steps × 3 epochs, 1 image
# per class per step, fixed init (seed 0), float32, --threads 2, no evaluation.
#   torch: torch_dd.py --backward autograd  and  --backward official
#   ddref: benchmarks/hypergrad.py --match-torch (the outer iteration of `ddref distill`:
#          meta-gradient + Adam step), engines backgrad and naive
# Each run is its own process (peak RSS is per process); the table gives median seconds per
# outer iteration (first 2 iterations dropped, as torch_dd.py does), peak RSS, and the ratio of
# every row to the two torch rows of its model.  Takes about 1.5 minutes on 2 quiet cores,
# up to ~5 on busy ones (ddref runs stop after MAX_SECONDS).
#
# Usage: bash benchmarks/compare_torch.sh
# Environment (all optional):
#   TORCH_PYTHON       python that has torch, mlxtend, scikit-learn       (default: python)
#   DDREF_PYTHON       python that has ddref      (default: python if it imports ddref, else .venv/bin/python)
#   TORCH_DD           path of torch_dd.py        (default: <repo>/../shared/reference/torch_dd.py)
#   THREADS            threads for both           (default: 2)
#   MODELS             "mlp lenet"                DDREF_ENGINES  "backgrad naive"
#   TORCH_ITERS_MLP=100 TORCH_ITERS_LENET=20 DDREF_ITERS_MLP=30 DDREF_ITERS_LENET=8
#   MAX_SECONDS=60     ddref stops a run after this long once it has 3 iterations
#   RUN_TIMEOUT=240    hard limit per process (seconds); a run past it is reported as failed
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
TORCH_PYTHON=${TORCH_PYTHON:-python}
TORCH_DD=${TORCH_DD:-$root/../shared/reference/torch_dd.py}
THREADS=${THREADS:-2}
MODELS=${MODELS:-mlp lenet}
DDREF_ENGINES=${DDREF_ENGINES:-backgrad naive}
TORCH_ITERS_MLP=${TORCH_ITERS_MLP:-100}
TORCH_ITERS_LENET=${TORCH_ITERS_LENET:-20}
DDREF_ITERS_MLP=${DDREF_ITERS_MLP:-30}
DDREF_ITERS_LENET=${DDREF_ITERS_LENET:-8}
MAX_SECONDS=${MAX_SECONDS:-60}
RUN_TIMEOUT=${RUN_TIMEOUT:-240}

if [[ -z ${DDREF_PYTHON:-} ]]; then
    if (cd / && python -c 'import ddref, autograd') 2>/dev/null; then DDREF_PYTHON=python
    elif [[ -x $root/.venv/bin/python ]]; then DDREF_PYTHON=$root/.venv/bin/python
    else DDREF_PYTHON=python; fi
fi

if [[ ! -f $TORCH_DD ]]; then
    echo "error: $TORCH_DD not found; set TORCH_DD=/path/to/torch_dd.py" >&2
    exit 2
fi
if ! "$TORCH_PYTHON" -c 'import torch, mlxtend, sklearn' 2>/dev/null; then
    echo "error: '$TORCH_PYTHON' cannot import torch, mlxtend and scikit-learn." >&2
    echo "Install them (outside ddref, which does not depend on torch), e.g.:" >&2
    echo "    python3 -m venv ~/torchvenv && ~/torchvenv/bin/pip install torch==2.13.0 mlxtend scikit-learn" >&2
    echo "then run:  TORCH_PYTHON=~/torchvenv/bin/python bash benchmarks/compare_torch.sh" >&2
    exit 2
fi
if ! (cd / && "$DDREF_PYTHON" -c 'import ddref, autograd') 2>/dev/null; then
    echo "error: '$DDREF_PYTHON' cannot import ddref; activate its virtualenv or set DDREF_PYTHON." >&2
    exit 2
fi
torch_version=$("$TORCH_PYTHON" -c 'import torch; print(torch.__version__)')
case $torch_version in 2.13.0*) ;; *) echo "warning: torch $torch_version, the reference numbers used 2.13.0" >&2 ;; esac

load1=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)
if awk -v l="$load1" -v n="$(nproc)" 'BEGIN {exit !(l > n)}'; then
    echo "warning: load average $load1 > $(nproc) CPUs: with $THREADS threads per process, BLAS/OpenMP threads" >&2
    echo "         wait on each other and timings can be several times slower (torch and numpy alike);" >&2
    echo "         rerun on a quiet machine, or with THREADS=1 to compare single-threaded." >&2
fi
logs=$(mktemp -d "${TMPDIR:-/tmp}/compare_torch.XXXXXX")
echo "# compare_torch.sh  $(date '+%Y-%m-%d %H:%M:%S')  $(uname -m), $(nproc) CPUs"
echo "# uptime at start: $(uptime)"
echo "# torch: $TORCH_PYTHON (torch $torch_version), $TORCH_DD"
echo "# ddref: $DDREF_PYTHON, $root/benchmarks/hypergrad.py --match-torch"
echo "# settings: 10 steps × 3 epochs, 1 image/class/step, fixed init seed 0, float32, threads $THREADS, no eval;"
echo "#           iterations torch mlp $TORCH_ITERS_MLP / lenet $TORCH_ITERS_LENET, ddref mlp $DDREF_ITERS_MLP / lenet $DDREF_ITERS_LENET (ddref stops after ${MAX_SECONDS}s once 3 done)"
echo "# logs: $logs"

declare -A median nsteady rss
run() {  # run KEY CMD...: log to $logs/KEY.log, echo it indented, parse the RESULT lines
    local key=$1; shift
    echo
    echo "## $key: $*"
    local t0=$SECONDS
    timeout "$RUN_TIMEOUT" "$@" >"$logs/$key.log" 2>&1
    local rc=$?
    sed 's/^/    /' "$logs/$key.log"
    median[$key]=$(awk '/^RESULT sec_per_outer_iter/ {print $4}' "$logs/$key.log")
    nsteady[$key]=$(sed -n 's/^RESULT sec_per_outer_iter.*(n=\([0-9]*\).*/\1/p' "$logs/$key.log")
    rss[$key]=$(awk '/^RESULT peak_rss_mb/ {print $3}' "$logs/$key.log")
    if [[ $rc -ne 0 || -z ${median[$key]} ]]; then
        echo "    -> FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ", timed out after ${RUN_TIMEOUT}s"))"
        median[$key]=""
    fi
    echo "    ($((SECONDS - t0)) s)"
}

data_of() { [[ $1 == mlp ]] && echo digits || echo mnist; }
ddref_data_of() { [[ $1 == mlp ]] && echo digits || echo mnist5k; }

for model in $MODELS; do
    if [[ $model == mlp ]]; then ti=$TORCH_ITERS_MLP; di=$DDREF_ITERS_MLP; else ti=$TORCH_ITERS_LENET; di=$DDREF_ITERS_LENET; fi
    for bw in autograd official; do
        run "$model.torch-$bw" "$TORCH_PYTHON" "$TORCH_DD" --arch "$model" --data "$(data_of "$model")" \
            --steps 10 --epochs 3 --ipc-per-step 1 --iters "$ti" --threads "$THREADS" --no-eval \
            --backward "$bw" --fixed-init --seed 0
    done
    for engine in $DDREF_ENGINES; do
        run "$model.ddref-$engine" "$DDREF_PYTHON" "$root/benchmarks/hypergrad.py" --match-torch \
            --models "$model" --engines "$engine" --steps 10 --epochs 3 --iters "$di" \
            --threads "$THREADS" --dtype float32 --seed 0 --max-seconds "$MAX_SECONDS"
    done
done

ratio() { [[ -n $1 && -n $2 ]] && awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}' || echo "–"; }
echo
echo "# uptime at end: $(uptime)"
echo
echo "| model / data | run | s / outer iter (median) | n | peak RSS MB | ÷ torch autograd | ÷ torch official |"
echo "|---|---|---|---|---|---|---|"
for model in $MODELS; do
    ta=${median[$model.torch-autograd]:-}; to=${median[$model.torch-official]:-}
    for run in torch-autograd torch-official $(for e in $DDREF_ENGINES; do echo "ddref-$e"; done); do
        key=$model.$run; m=${median[$key]:-}
        echo "| $model / $(ddref_data_of "$model") | ${run/-/ } | ${m:-failed} | ${nsteady[$key]:-–} | ${rss[$key]:-–} | $(ratio "$m" "$ta") | $(ratio "$m" "$to") |"
    done
done
echo
echo "# ddref rows ÷ torch rows = ddref/torch (> 1: ddref slower).  s / outer iter: meta-gradient + Adam step,"
echo "# first 2 iterations dropped.  Peak RSS is the whole process (interpreter, libraries, data set included):"
echo "# torch's libraries alone take a few hundred MB, so compare memory with benchmarks/hypergrad.py's tracemalloc"
echo "# column, not here.  Timings on a shared machine are noisy: compare ratios from one run."
