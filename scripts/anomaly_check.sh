#!/usr/bin/env bash
# The anomaly task end to end, as a user with no data would run it, timed: simulate QCD dijets with a
# W' -> X(500) Y(100) resonance in the LHC Olympics R&D layout, `ucluster prepare` them, train
# configs/anomaly_cpu.yaml, evaluate on a separate test set (docs/ANOMALY.md).
#   bash scripts/anomaly_check.sh OUT [TRAIN_SEED] [TEST_SEED] [SIGNAL_FRACTION] [extra `ucluster train` args...]
# Defaults: seeds 401/402, 50,000 + 15,000 events (N_TRAIN, N_TEST) generated with 10 % signal
# (GEN_FRACTION); a smaller SIGNAL_FRACTION keeps a seeded subset of the signal at `prepare`
# (--signal-fraction), so LHCO=DIR can share one generation between fractions. A stage whose output
# exists is skipped, so an interrupted study resumes. Prints the wall time of each stage
# (OUT/times.txt); OUT/run/eval/summary.json holds the figures.
set -euo pipefail
OUT=${1:?usage: anomaly_check.sh OUT [TRAIN_SEED] [TEST_SEED] [SIGNAL_FRACTION] [train args...]}
TRAIN_SEED=${2:-401}; TEST_SEED=${3:-402}; GEN_FRACTION=${GEN_FRACTION:-0.1}; FRACTION=${4:-$GEN_FRACTION}
N_TRAIN=${N_TRAIN:-50000}; N_TEST=${N_TEST:-15000}; LHCO=${LHCO:-$OUT/lhco}
shift $(( $# < 4 ? $# : 4 ))
mkdir -p "$OUT" "$LHCO"
stage() { local t0=$SECONDS; "$@"; echo "[$(( SECONDS - t0 )) s] $1 $2" | tee -a "$OUT/times.txt"; }
gen() {  # gen NAME EVENTS SEED
  [ -e "$LHCO/$1.h5" ] || stage ucluster generate --processes qcd-dijet,resonance --events "$2" \
    --signal-fraction "$GEN_FRACTION" --seed "$3" --out "$LHCO/$1.h5" --workers 2 --quiet
}
gen train "$N_TRAIN" "$TRAIN_SEED"
gen test "$N_TEST" "$TEST_SEED"
subsample=(); [ "$FRACTION" != "$GEN_FRACTION" ] && subsample=(--signal-fraction "$FRACTION")
for part in train test; do
  seed=$([ $part = train ] && echo "$TRAIN_SEED" || echo "$TEST_SEED")
  [ -e "$OUT/$part" ] || stage ucluster prepare "$LHCO/$part.h5" --out "$OUT/$part" "${subsample[@]}" --seed "$seed"
done
[ -e "$OUT/run/eval/summary.json" ] || {
  resume=(); [ -d "$OUT/run/checkpoints" ] && resume=(--resume)
  stage ucluster train --config configs/anomaly_cpu.yaml --data "$OUT/train" --test-data "$OUT/test" \
    --out "$OUT/run" "${resume[@]}" "$@"
  stage ucluster evaluate --run "$OUT/run" --data "$OUT/train" --out "$OUT/run/eval_train"
  stage ucluster evaluate --run "$OUT/run" --data "$OUT/test"
}
