#!/usr/bin/env bash
# One-shot GPU benchmark for a device session (one H200): `ucluster bench` at GPU sizes, JSON + PNG +
# log under $OUT (default ./bench_gpu_out). Meant to fit one 10-minute device command:
#
#   run(command="bash scripts/bench_gpu.sh", timeout_s=590)
#
# Environment, in this order:
#   1. $PYTHON if set, else .venv/bin/python, else python3 -- used as is when `import jax` sees a GPU;
#   2. otherwise a venv in $VENV (default /tmp/ucluster-gpu-venv) with the project and jax[cuda12]
#      installed: from $WHEELHOUSE (pip --no-index --find-links) when given, else from the package
#      index (the device machine may have no network: then pre-stage wheels and set WHEELHOUSE).
# mpi4jax is optional here: without it the mpi sections are skipped and said so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench_gpu_out}
mkdir -p "$OUT"
LOG="$OUT/bench_gpu.log"
exec > >(tee -a "$LOG") 2>&1
echo "== bench_gpu.sh $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "(no nvidia-smi)"

JAX_VERSION=${JAX_VERSION:-0.10.2}  # the version this project is tested with (pyproject: jax>=0.10,<0.11)

has_gpu() { "$1" -c "import jax, sys; sys.exit(0 if any(d.platform == 'gpu' for d in jax.devices()) else 1)" 2>/dev/null; }

PY=""
for cand in "${PYTHON:-}" .venv/bin/python python3; do
  [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && has_gpu "$cand" && { PY=$cand; break; }
done
if [ -z "$PY" ]; then
  VENV=${VENV:-/tmp/ucluster-gpu-venv}
  BASE=$(command -v python3.11 || command -v python3)
  [ -x "$VENV/bin/python" ] || "$BASE" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install -q)
  [ -n "${WHEELHOUSE:-}" ] && PIP+=(--no-index --find-links "$WHEELHOUSE")
  echo "== installing jax[cuda12]==$JAX_VERSION and the project into $VENV ${WHEELHOUSE:+(from $WHEELHOUSE)}"
  timeout 300 "${PIP[@]}" "jax[cuda12]==$JAX_VERSION" || echo "!! jax[cuda12] install failed"
  timeout 200 "${PIP[@]}" -e . || echo "!! project install failed"
  PY=$VENV/bin/python
  has_gpu "$PY" || { echo "!! no GPU visible to jax; nothing to measure"; exit 1; }
fi
echo "== python: $PY"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"

export XLA_PYTHON_CLIENT_PREALLOCATE=false  # so the reported peak is what the step needs
SECTIONS=train,eval,data,e2e
if "$PY" -c "import mpi4jax" 2>/dev/null && [ -x "$(dirname "$PY")/mpirun" ]; then
  SECTIONS=$SECTIONS,mpi  # 2 ranks share the one GPU: the allreduce timing and model, not GPU scaling
else
  echo "(mpi4jax or mpirun missing: mpi section skipped)"
fi

# GPU sizes: batches up to 8192 (the original trains at 512), ~64k jets per timed repeat.
timeout 540 "$PY" -m ucluster_jax.cli bench --out "$OUT" --sections "$SECTIONS" \
  --batch-sizes 512,2048,8192 --eval-batch-sizes 2048,16384 --jets-per-repeat 65536 --repeats 5 \
  --toy-jets 65536 --ranks 1,2 --replica-batch 512 --scaling-steps 8 --threads-per-rank all \
  --cache-dir "$OUT/xla_cache" "$@"
rc=$?
rm -rf "$OUT/xla_cache"
echo "== exit $rc; files: $(ls "$OUT")"
exit $rc
