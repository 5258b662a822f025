#!/usr/bin/env bash
# The CPU recipe end to end, as a user with no data would run it, timed: simulate W/Z/top jets in the
# hls4ml layout, `ucluster prepare` them, train configs/wztop_cpu.yaml, evaluate on a separate test set.
#   bash scripts/wztop_cpu_check.sh OUT [TRAIN_SEED] [TEST_SEED] [PT_MIN] [PT_MAX] [extra `ucluster train` args...]
# Defaults: seeds 201/202, jet pT 850-1250 GeV; 68,000 + 16,500 generated jets (about 60,000 + 15,000
# after the selection). Prints the wall time of each stage; OUT/run/eval/summary.json holds the accuracy
# (with --set train.select_from_epoch=E: of the state the run selected; OUT/run/eval_last: of its last state).
set -euo pipefail
OUT=${1:?usage: wztop_cpu_check.sh OUT [TRAIN_SEED] [TEST_SEED] [PT_MIN] [PT_MAX] [train args...]}
TRAIN_SEED=${2:-201}; TEST_SEED=${3:-202}; PT_MIN=${4:-850}; PT_MAX=${5:-1250}
MASS=${MASS:-jet}  # MASS=massless|softdrop with `--set loss.mass=$MASS`: another mass (docs/RESULTS.md)
shift $(( $# < 5 ? $# : 5 ))
mkdir -p "$OUT"
stage() { local t0=$SECONDS; "$@"; echo "[$(( SECONDS - t0 )) s] $1 $2" | tee -a "$OUT/times.txt"; }
stage ucluster generate --out "$OUT/h5/train" --jets 68000 --seed "$TRAIN_SEED" --pt-min "$PT_MIN" --pt-max "$PT_MAX" \
  --workers 2 --overwrite --quiet
stage ucluster generate --out "$OUT/h5/test" --jets 16500 --seed "$TEST_SEED" --pt-min "$PT_MIN" --pt-max "$PT_MAX" \
  --workers 2 --overwrite --quiet
stage ucluster prepare "$OUT"/h5/train/*.h5 --out "$OUT/train" --overwrite --mass "$MASS"
stage ucluster prepare "$OUT"/h5/test/*.h5 --out "$OUT/test" --overwrite --mass "$MASS"
rm -rf "$OUT/run"
stage ucluster train --config configs/wztop_cpu.yaml --data "$OUT/train" --test-data "$OUT/test" --out "$OUT/run" "$@"
stage ucluster evaluate --run "$OUT/run" --data "$OUT/test"
# the run's last state too, beside the one it selected where train.select_from_epoch is set: OUT/run/eval_last
stage ucluster evaluate --run "$OUT/run" --data "$OUT/test" --last --out "$OUT/run/eval_last" --no-plots
