#!/usr/bin/env bash
# The width sweep at a fixed number of kept weights (the paper's observation that a wider net at a
# smaller k does as well or better): 784-w-w-10 for w = 200, 400, 800, 1600, with k chosen so that
# every net keeps the same ~99,400 weights (half of the 200-wide net). Into runs/width_sweep/.
# With the paper's scaled init (model.scale_fan=true, the default here: std = sqrt(2 / (k * fan_in))),
# so that a very sparse layer's activations keep their scale; pass model.scale_fan=false to compare.
set -euo pipefail
cd "$(dirname "$0")/../.."
ST=${SCORETRAIN:-.venv/bin/scoretrain}
OUT=${OUT:-runs/width_sweep}
JOBS=${JOBS:-2}
if [ "$JOBS" -gt 1 ]; then export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}; fi  # see k_sweep.sh
KEPT=$(( (784 * 200 + 200 * 200 + 200 * 10) / 2 ))
for w in 200 400 800 1600; do
  k=$(python3 -c "print(round($KEPT / (784 * $w + $w * $w + $w * 10), 4))")
  "$ST" fit configs/mnist_fc.yaml "model.widths=[784,$w,$w,10]" model.k="$k" model.scale_fan=true "$@" --name "w$w" --runs-dir "$OUT" -q &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done  # at most JOBS at a time
done
wait
"$ST" compare "$OUT" --sort k
