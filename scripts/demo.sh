#!/usr/bin/env bash
# `make demo`: the main job end to end on the built-in toy W/Z/top jets (a few minutes on 2 cores).
#   DEMO_DATA=pythia make demo   uses jets simulated with Pythia 8 + FastJet instead.
set -euo pipefail
OUT=${OUT:-demo_out}
CONFIG=${CONFIG:-configs/demo.yaml}
mkdir -p "$OUT"
if [ "${DEMO_DATA:-toy}" = "pythia" ]; then
  ucluster generate --out "$OUT/data/train" --jets 7000 --seed 1 --workers 2 --format parquet --overwrite
  ucluster generate --out "$OUT/data/test" --jets 2500 --seed 2 --workers 2 --format parquet --overwrite
else
  ucluster toy --out "$OUT/data/train" --n 6000 --seed 1 --overwrite
  ucluster toy --out "$OUT/data/test" --n 2000 --seed 2 --overwrite
fi
rm -rf "$OUT/run"
ucluster train --config "$CONFIG" --data "$OUT/data/train" --test-data "$OUT/data/test" --out "$OUT/run"
ucluster evaluate --run "$OUT/run" --data "$OUT/data/test"
echo "demo: plots and per-jet results in $OUT/run/eval/ (latent.png, mass_per_cluster.png, training.png)"
