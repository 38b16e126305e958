#!/usr/bin/env bash
# The K sweep: configs/mnist_fc.yaml at k = 0.1 ... 0.9, JOBS runs at a time (default 2),
# into runs/k_sweep/, then a side-by-side table and a plot (matplotlib: pip install 'scoretrain[plot]').
#   bash configs/sweeps/k_sweep.sh            # extra arguments are passed to every fit, e.g. train.epochs=5
set -euo pipefail
cd "$(dirname "$0")/../.."
ST=${SCORETRAIN:-.venv/bin/scoretrain}
OUT=${OUT:-runs/k_sweep}
JOBS=${JOBS:-2}
# One BLAS thread per run when several run at once: the BLAS threads of parallel runs would
# fight over the cores (and spin-wait), making every run many times slower.
if [ "$JOBS" -gt 1 ]; then export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}; fi
printf '%s\n' 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 |
  xargs -P "$JOBS" -I{} "$ST" fit configs/mnist_fc.yaml model.k={} "$@" --name k{} --runs-dir "$OUT" -q
"$ST" compare "$OUT" --sort k
"$ST" compare "$OUT" --plot "$OUT/k_sweep.png" >/dev/null && echo "plot: $OUT/k_sweep.png"
