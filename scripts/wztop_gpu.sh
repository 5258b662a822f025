#!/usr/bin/env bash
# The 81 % run's recipe (configs/wztop.yaml, unchanged) on one GPU for as long as a time budget allows,
# and beside it, on the same machine's CPU cores, the CPU recipe (configs/wztop_cpu.yaml) extended to
# EPOCHS_CPU epochs. One command for a lent GPU (issue #17 item 5); results under $OUT:
#
#   bash scripts/wztop_gpu.sh [BUDGET_S [train args...]]   # default 540 s; device: timeout_s = BUDGET_S + 30
#   bash scripts/wztop_gpu.sh 525 --set loss.alpha_scale=2   # a variant of the recipe: args go to the gpu run
#   TUNE_WORKERS=4 bash scripts/wztop_gpu.sh 525             # instead: search the CPU recipe's settings
#
# With TUNE_WORKERS=K, step 2 is `ucluster tune` of configs/wztop_cpu.yaml (space: TUNE_SPACE, default
# configs/space_wztop_cpu.yaml) on the CPU recipe's sample (seed 301, 68,000 jets), scored on the test
# jets: K workers share the GPU (each a 1/K share of its memory) and one Optuna journal until the
# budget; the study (summary.json, best.yaml, plots, every trial's metrics) comes back as study.tar.gz.
#
# 1. simulate W/Z/top jets (pT 850-1250 GeV): train seeds 301 (68,000 jets: the CPU recipe's sample) and
#    303 (the rest of the generation budget: JETS_PER_WORKER per core), test seed 302 (16,500 jets),
#    while a 2-epoch smoke run on toy jets checks the stack and fills the XLA compilation cache;
# 2. train gpu (seeds 301 + 303, eval every 250k joint samples) and cpu (seed 301) until the budget;
# 3. `ucluster evaluate` each run's newest checkpoint on the test jets.
# OUT gets log.txt and runs.tar.gz (each run's config, metrics.jsonl, curve.jsonl, eval/, newest
# checkpoint). Wheels in .whl/ (pythia8mc, fastjet, awkward, vector) are installed when missing.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-540}
shift $(( $# > 0 ? 1 : 0 ))
T0=$SECONDS
OUT=${OUT:-$PWD/wztop_gpu_out}
W=${WORK:-$(mktemp -d)}
NCPU=${NCPU:-$(nproc)}
JETS_PER_WORKER=${JETS_PER_WORKER:-12000}
JETS_T1=${JETS_T1:-68000}
JETS_TEST=${JETS_TEST:-16500}
EPOCHS_CPU=${EPOCHS_CPU:-21}
mkdir -p "$OUT" "$W"
exec > >(tee -a "$OUT/log.txt") 2>&1
left() { echo $(( BUDGET - (SECONDS - T0) - ${1:-0} )); }
say() { echo "[$(( SECONDS - T0 )) s] $*"; }

PY=${PYTHON:-python3}
if [ -d .whl ] && ! "$PY" -c "import pythia8mc, fastjet" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" .whl/*.whl || exit 1
  export PYTHONPATH=$W/site
  export PYTHIA8DATA=${PYTHIA8DATA:-$(find "$W/site" -type d -name xmldoc -path '*Pythia8*' | head -1)}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=$W/jax_cache
export UCLUSTER_NO_TUNING=1  # the CPU-only XLA flags stay out of the GPU processes (the cpu run sets its own)
UC=("$PY" -m ucluster_jax.cli)
say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')," \
    "$NCPU cores; $("$PY" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())')"

# -- 1. data, with the smoke run beside it ---------------------------------------------------------------
gen() { "${UC[@]}" generate --out "$W/data/$1" --jets "$2" --seed "$3" --workers "$4" --format parquet --overwrite \
          --quiet > "$W/gen_$1.log" 2>&1; }
W_TEST=2; W_T1=$(( NCPU >= 8 ? 6 : 1 )); W_T2=$(( NCPU - 1 - W_TEST - W_T1 > 0 ? NCPU - 1 - W_TEST - W_T1 : 1 ))
JETS_T2=$(( W_T2 * JETS_PER_WORKER ))
gen test $JETS_TEST 302 $W_TEST & g0=$!
gen t1 $JETS_T1 301 $W_T1 & g1=$!
gen t2 $JETS_T2 303 $W_T2 & g2=$!
say "generating $JETS_T1 + $JETS_T2 train and $JETS_TEST test jets on $(( W_TEST + W_T1 + W_T2 )) workers"
smoke() {
  "${UC[@]}" toy --out "$W/toy/train" --n 2048 --seed 1 --overwrite && "${UC[@]}" toy --out "$W/toy/test" --n 1024 --seed 2 --overwrite &&
  "${UC[@]}" train --config configs/wztop.yaml --data "$W/toy/train" --test-data "$W/toy/test" --out "$W/toy/run" \
    --set train.epochs=2 --set train.pretrain_epochs=1 --set train.eval_every_samples=1024
}
if ! smoke > "$W/smoke.log" 2>&1; then
  say "smoke run failed:"; tail -40 "$W/smoke.log"; kill $g0 $g1 $g2 2>/dev/null; exit 1
fi
say "smoke run passed: $(grep -c . "$W/toy/run/metrics.jsonl") epochs"
for g in $g0 $g1 $g2; do wait $g || { say "generation failed:"; tail -n 20 "$W"/gen_*.log; exit 1; }; done
mkdir -p "$W/data/gpu" && ln -s "$W/data/t1/part-00000.parquet" "$W/data/gpu/a.parquet" &&
  ln -s "$W/data/t2/part-00000.parquet" "$W/data/gpu/b.parquet"
say "data ready"

if [ -n "${TUNE_WORKERS:-}" ]; then
  # -- 2'. the search: K workers on one journal until the budget, then the summary of what finished ------
  T_TUNE=$(left 40)
  TUNE=("${UC[@]}" tune --config configs/wztop_cpu.yaml --space "${TUNE_SPACE:-configs/space_wztop_cpu.yaml}"
        --data "$W/data/t1" --test-data "$W/data/test" --out "$W/study" --seed 0 --set train.eval_every_samples=0)
  say "searching for $T_TUNE s with $TUNE_WORKERS workers"
  export XLA_PYTHON_CLIENT_MEM_FRACTION=$("$PY" -c "print(round(0.9 / $TUNE_WORKERS, 3))")
  pids=()
  for i in $(seq 1 "$TUNE_WORKERS"); do
    timeout -s TERM "$T_TUNE" "${TUNE[@]}" --trials 1000 "$@" > "$W/tune_$i.log" 2>&1 & pids+=($!)
  done
  wait "${pids[@]}"
  # the trials the budget cut off are marked failed once their heartbeat is 5 s old; --trials 0 starts none
  sleep 6
  "${TUNE[@]}" --trials 0 --stale-after 5 "$@" > "$W/tune_summary.log" 2>&1
  say "search ended: $(grep -c . "$W/tune_summary.log") summary lines"; tail -n 25 "$W/tune_summary.log"
  cp "$W"/*.log "$W/study/" 2>/dev/null
  (cd "$W" && tar czf "$OUT/study.tar.gz" --exclude=checkpoints study)
  say "done: $(ls "$OUT")"
  exit 0
fi

# -- 2. both trainings until the budget (less the evaluation's share) -------------------------------------
T_TRAIN=$(left 60)
say "training for $T_TRAIN s"
timeout -s TERM "$T_TRAIN" "${UC[@]}" train --config configs/wztop.yaml --data "$W/data/gpu" --test-data "$W/data/test" \
  --out "$W/runs/gpu" --set train.eval_every_samples=250000 "$@" > "$W/train_gpu.log" 2>&1 & a=$!
JAX_PLATFORMS=cpu UCLUSTER_NO_TUNING= timeout -s TERM "$T_TRAIN" taskset -c 1-$(( NCPU - 1 )) "${UC[@]}" train --config configs/wztop_cpu.yaml \
  --data "$W/data/t1" --test-data "$W/data/test" --out "$W/runs/cpu" --set train.epochs="$EPOCHS_CPU" \
  > "$W/train_cpu.log" 2>&1 & c=$!
wait $a; say "gpu training ended ($?; 124: the budget)"; wait $c; say "cpu training ended ($?)"
tail -n 3 "$W/train_gpu.log" "$W/train_cpu.log"

# -- 3. evaluate the newest checkpoints -------------------------------------------------------------------
timeout "$(left 5)" "${UC[@]}" evaluate --run "$W/runs/gpu" --data "$W/data/test" > "$W/eval_gpu.log" 2>&1 & e1=$!
JAX_PLATFORMS=cpu UCLUSTER_NO_TUNING= timeout "$(left 5)" taskset -c 1-$(( NCPU - 1 )) "${UC[@]}" evaluate --run "$W/runs/cpu" \
  --data "$W/data/test" > "$W/eval_cpu.log" 2>&1 & e2=$!
wait $e1 $e2
for r in gpu cpu; do say "$r: $(tail -2 "$W/eval_$r.log" | tr '\n' ' ')"; done
cp "$W"/*.log "$W/runs/" 2>/dev/null
(cd "$W/runs" && tar czf "$OUT/runs.tar.gz" --exclude=checkpoints . &&
  for r in gpu cpu; do c=$(ls "$r"/checkpoints/*.msgpack 2>/dev/null | sort | tail -1); [ -n "$c" ] && echo "$c ${c%.msgpack}.json"; done |
  xargs -r tar czf "$OUT/checkpoints.tar.gz")
say "done: $(ls "$OUT")"
