#!/usr/bin/env bash
# ddref against the PyTorch reference (../shared/reference/torch_dd.py), same settings, one run:
# mlp/digits (real batch 512) and lenet/mnist5k (real batch 1024), 10 steps × 3 epochs, 1 image
# per class per step, float32, no evaluation, for each thread count in THREAD_LIST.
#   torch: torch_dd.py --backward autograd  and  --backward official      (fixed init, seed 0)
#   ddref: benchmarks/hypergrad.py --match-torch (the outer iteration of `ddref distill`:
#          meta-gradient + Adam step), engines backgrad (the default) and naive
#   n_nets row: random init; torch_dd.py --random-init draws one network per iteration, so
#          "torch × 4" is 4 × its time per iteration; ddref runs --init random --n-nets 4.
# Runs alternate torch and ddref and are repeated ROUNDS times, so that a change of machine
# load hits both; each cell is the median over rounds of the per-run median seconds per outer
# iteration (first 2 iterations of a run dropped, as torch_dd.py does).  The ratio columns are
# ddref ÷ torch (< 1: ddref faster).
#
# OpenBLAS: this machine may set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (for old OpenBLAS builds);
# they force an older, slower kernel on numpy's OpenBLAS.  By default both are unset for every
# run of this script (KEEP_OPENBLAS_ENV=1 keeps them); the kernel numpy runs is printed.
#
# Usage: TORCH_PYTHON=/path/to/python-with-torch bash benchmarks/compare_torch.sh
# Environment (all optional):
#   TORCH_PYTHON       python that has torch, mlxtend, scikit-learn       (default: python)
#   DDREF_PYTHON       python that has ddref      (default: python if it imports ddref, else .venv/bin/python)
#   TORCH_DD           path of torch_dd.py        (default: <repo>/../shared/reference/torch_dd.py)
#   THREAD_LIST="1 2"  thread counts (both implementations)      ROUNDS=2  repetitions
#   MODELS="mlp lenet" NETS_ROW=1 (0: skip the n_nets = 4 rows)   KEEP_OPENBLAS_ENV=0
#   TORCH_ITERS_MLP=40 TORCH_ITERS_LENET=8 DDREF_ITERS_MLP=40 DDREF_ITERS_LENET=8
#   RUN_TIMEOUT=300    hard limit per process (seconds); a run past it is reported as failed
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
TORCH_PYTHON=${TORCH_PYTHON:-python}
TORCH_DD=${TORCH_DD:-$root/../shared/reference/torch_dd.py}
THREAD_LIST=${THREAD_LIST:-1 2}
ROUNDS=${ROUNDS:-2}
MODELS=${MODELS:-mlp lenet}
NETS_ROW=${NETS_ROW:-1}
TORCH_ITERS_MLP=${TORCH_ITERS_MLP:-40}
TORCH_ITERS_LENET=${TORCH_ITERS_LENET:-8}
DDREF_ITERS_MLP=${DDREF_ITERS_MLP:-40}
DDREF_ITERS_LENET=${DDREF_ITERS_LENET:-8}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}

if [[ -z ${DDREF_PYTHON:-} ]]; then
    if (cd / && python -c 'import ddref, autograd') 2>/dev/null; then DDREF_PYTHON=python
    elif [[ -x $root/.venv/bin/python ]]; then DDREF_PYTHON=$root/.venv/bin/python
    else DDREF_PYTHON=python; fi
fi
if [[ ${KEEP_OPENBLAS_ENV:-0} != 1 ]]; then
    unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
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
if ! (cd "$root" && "$DDREF_PYTHON" -c 'import ddref, autograd') 2>/dev/null; then
    echo "error: '$DDREF_PYTHON' cannot import ddref; activate its virtualenv or set DDREF_PYTHON." >&2
    exit 2
fi
torch_version=$("$TORCH_PYTHON" -c 'import torch; print(torch.__version__)')
case $torch_version in 2.13.0*) ;; *) echo "warning: torch $torch_version, the reference numbers used 2.13.0" >&2 ;; esac
ddref_at=$(cd "$root" && "$DDREF_PYTHON" -c 'import ddref, os; print(os.path.dirname(ddref.__file__))')
blas_py='import numpy
from threadpoolctl import threadpool_info
print(", ".join(p["internal_api"] + " " + p["version"] + " kernel " + str(p.get("architecture")) for p in threadpool_info()))'
blas=$(cd "$root" && "$DDREF_PYTHON" -c "$blas_py" 2>/dev/null) || blas="?"

logs=$(mktemp -d "${TMPDIR:-/tmp}/compare_torch.XXXXXX")
echo "# compare_torch.sh  $(date '+%Y-%m-%d %H:%M:%S')  $(uname -m), $(nproc) CPUs"
echo "# uptime at start: $(uptime)"
echo "# torch: $TORCH_PYTHON (torch $torch_version), $TORCH_DD"
echo "# ddref: $DDREF_PYTHON, ddref from $ddref_at, numpy BLAS: $blas"
echo "# OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-(unset)} OPENBLAS_L2_SIZE=${OPENBLAS_L2_SIZE:-(unset)}"
echo "# settings: 10 steps × 3 epochs, 1 image/class/step, float32, no eval, threads $THREAD_LIST, $ROUNDS rounds;"
echo "#           iterations torch mlp $TORCH_ITERS_MLP / lenet $TORCH_ITERS_LENET, ddref mlp $DDREF_ITERS_MLP / lenet $DDREF_ITERS_LENET"
echo "# logs: $logs"

declare -A times
run() {  # run KEY CMD...: log to $logs/KEY.rROUND.log, append its median to times[KEY]
    local key=$1; shift
    local log=$logs/$key.r$round.log
    timeout "$RUN_TIMEOUT" "$@" >"$log" 2>&1
    local rc=$?
    local m
    m=$(awk '/^RESULT sec_per_outer_iter/ {print $4}' "$log")
    if [[ $rc -ne 0 || -z $m ]]; then
        echo "## $key round $round FAILED (exit $rc): $*"; sed 's/^/    /' "$log" | tail -5
        return
    fi
    times[$key]="${times[$key]:-} $m"
    printf '%-36s round %d: %s s/iter\n' "$key" "$round" "$m"
}

data_of() { [[ $1 == mlp ]] && echo digits || echo mnist; }
ddref_data_of() { [[ $1 == mlp ]] && echo digits || echo mnist5k; }
torch_iters() { [[ $1 == mlp ]] && echo "$TORCH_ITERS_MLP" || echo "$TORCH_ITERS_LENET"; }
ddref_iters() { [[ $1 == mlp ]] && echo "$DDREF_ITERS_MLP" || echo "$DDREF_ITERS_LENET"; }
torch_run() {  # torch_run KEY MODEL THREADS BACKWARD INIT
    run "$1" "$TORCH_PYTHON" "$TORCH_DD" --arch "$2" --data "$(data_of "$2")" --steps 10 --epochs 3 \
        --ipc-per-step 1 --iters "$(torch_iters "$2")" --threads "$3" --no-eval --backward "$4" "--$5-init" --seed 0
}
ddref_run() {  # ddref_run KEY MODEL THREADS ENGINE INIT NETS
    run "$1" env PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$DDREF_PYTHON" "$root/benchmarks/hypergrad.py" \
        --match-torch --models "$2" --engines "$4" --steps 10 --epochs 3 --iters "$(ddref_iters "$2")" \
        --threads "$3" --dtype float32 --seed 0 --init "$5" --n-nets "$6" --max-seconds "$RUN_TIMEOUT"
}

for round in $(seq 1 "$ROUNDS"); do
    for threads in $THREAD_LIST; do
        for model in $MODELS; do
            torch_run "$model.$threads.torch-autograd" "$model" "$threads" autograd fixed
            ddref_run "$model.$threads.ddref-backgrad" "$model" "$threads" backgrad fixed 1
            torch_run "$model.$threads.torch-official" "$model" "$threads" official fixed
            ddref_run "$model.$threads.ddref-naive" "$model" "$threads" naive fixed 1
            if [[ $NETS_ROW == 1 ]]; then
                torch_run "$model.$threads.torch-random" "$model" "$threads" autograd random
                ddref_run "$model.$threads.ddref-random4" "$model" "$threads" backgrad random 4
            fi
        done
    done
done

median() { tr ' ' '\n' <<<"$1" | awk 'NF' | sort -g | awk '{a[NR]=$1} END {if (NR == 0) print ""; else if (NR % 2) print a[(NR+1)/2]; else printf "%.4f\n", (a[NR/2] + a[NR/2+1]) / 2}'; }
ratio() { [[ -n $1 && -n $2 ]] && awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}' || echo "–"; }
times4() { [[ -n $1 ]] && awk -v a="$1" 'BEGIN {printf "%.4f", 4 * a}' || echo ""; }
lower() { [[ -z $1 ]] && echo "$2" && return; [[ -z $2 ]] && echo "$1" && return; awk -v a="$1" -v b="$2" 'BEGIN {print (a < b ? a : b)}'; }

echo
echo "# uptime at end: $(uptime)"
echo
echo "Fixed init, seconds per outer iteration (median over $ROUNDS rounds of per-run medians); ratios ddref ÷ torch:"
echo
echo "| model / data | threads | torch autograd | torch official | ddref backgrad | ddref naive | backgrad ÷ torch autograd | backgrad ÷ faster torch | naive ÷ faster torch |"
echo "|---|---|---|---|---|---|---|---|---|"
for model in $MODELS; do
    for threads in $THREAD_LIST; do
        k=$model.$threads
        ta=$(median "${times[$k.torch-autograd]:-}"); to=$(median "${times[$k.torch-official]:-}")
        db=$(median "${times[$k.ddref-backgrad]:-}"); dn=$(median "${times[$k.ddref-naive]:-}")
        best=$(lower "$ta" "$to")
        echo "| $model / $(ddref_data_of "$model") | $threads | ${ta:-failed} | ${to:-failed} | ${db:-failed} | ${dn:-failed} | $(ratio "$db" "$ta") | $(ratio "$db" "$best") | $(ratio "$dn" "$best") |"
    done
done
if [[ $NETS_ROW == 1 ]]; then
    echo
    echo "Random init, 4 networks per outer iteration (torch_dd.py draws one per iteration: its time × 4):"
    echo
    echo "| model / data | threads | torch 1 net | torch × 4 | ddref --n-nets 4 (backgrad) | ddref ÷ torch × 4 |"
    echo "|---|---|---|---|---|---|"
    for model in $MODELS; do
        for threads in $THREAD_LIST; do
            k=$model.$threads
            t1=$(median "${times[$k.torch-random]:-}"); t4=$(times4 "$t1"); d4=$(median "${times[$k.ddref-random4]:-}")
            echo "| $model / $(ddref_data_of "$model") | $threads | ${t1:-failed} | ${t4:-–} | ${d4:-failed} | $(ratio "$d4" "$t4") |"
        done
    done
fi
echo
echo "Spread: each round's ddref backgrad ÷ torch autograd (adjacent runs, so a change of load hits both),"
echo "and the min–max of each implementation's per-run medians over the rounds:"
echo
echo "| model / data | threads | paired ratios by round | median paired ratio | torch autograd min–max | ddref backgrad min–max |"
echo "|---|---|---|---|---|---|"
paired() {  # paired "a1 a2 …" "b1 b2 …": the ratios a_r / b_r, round by round
    awk -v a="$1" -v b="$2" 'BEGIN {n = split(a, x, " "); split(b, y, " "); for (i = 1; i <= n; i++) if (y[i] > 0) printf "%.2f ", x[i] / y[i]}'
}
span() { tr ' ' '\n' <<<"$1" | awk 'NF' | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {if (NR) printf "%s–%s", lo, hi}'; }
for model in $MODELS; do
    for threads in $THREAD_LIST; do
        k=$model.$threads
        pr=$(paired "${times[$k.ddref-backgrad]:-}" "${times[$k.torch-autograd]:-}")
        echo "| $model / $(ddref_data_of "$model") | $threads | ${pr:-–} | $(median "$pr") | $(span "${times[$k.torch-autograd]:-}") | $(span "${times[$k.ddref-backgrad]:-}") |"
    done
done
echo
echo "# s / outer iteration: meta-gradient + Adam step (+ real-batch sampling), first 2 iterations of each run"
echo "# dropped.  Timings on a shared machine are noisy: compare ratios from one run."
