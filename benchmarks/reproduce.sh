#!/usr/bin/env bash
# The accuracy numbers of the README, one `ddref distill` run each (2,000 outer iterations,
# as the PyTorch reference used).  About 20 minutes on a 2-core machine.
# Usage: bash benchmarks/reproduce.sh [OUT_DIR]      (default runs/reproduce)
set -euo pipefail
out=${1:-runs/reproduce}
common=(--iterations 2000 --decay-every 800 --eval-every 200 --no-progress)

ddref distill "${common[@]}" --steps 1  --epochs 3 --out "$out/digits-mlp-fixed-10img"
ddref distill "${common[@]}" --steps 10 --epochs 3 --out "$out/digits-mlp-fixed-100img"
ddref distill "${common[@]}" --steps 10 --epochs 3 --init random --eval-inits 10 \
    --out "$out/digits-mlp-random-100img"
ddref distill --dataset mnist5k --model lenet --batch-size 1024 --steps 1 --epochs 3 \
    --iterations 1000 --decay-every 400 --eval-every 100 --no-progress \
    --out "$out/mnist5k-lenet-fixed-10img"

python - "$out" <<'PY'
import json, pathlib, sys
print(f"{'run':32s} {'images':>6s} {'distilled':>18s} {'random real':>18s} {'s/iter':>7s}")
for run in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    m = json.loads((run / "metrics.json").read_text())
    fmt = lambda a: f"{100*a['mean']:.1f}" + (f" ± {100*a['std']:.1f}" if a['n'] > 1 else "")
    print(f"{run.name:32s} {m['n_images']:6d} {fmt(m['distilled_accuracy']):>18s} "
          f"{fmt(m['random_real_accuracy']):>18s} {m['seconds_per_iteration']:7.3f}")
PY
