#!/usr/bin/env bash
# Multi-node data-parallel training with mpirun: one rank per GPU, gradients allreduced with mpi4jax.
#   scripts/mpirun_multinode.sh HOSTFILE NRANKS DATA_DIR RUN_DIR [extra ucluster train args]
# Every node needs the same venv path and sees DATA_DIR (each rank reads only its own row groups).
set -euo pipefail
HOSTFILE=$1; NP=$2; DATA=$3; RUN=$4; shift 4
VENV=${VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}
# Per-rank GPU selection: rank i on a node uses local GPU i (Open MPI exports the local rank).
# GPU-aware MPI (CUDA-enabled Open MPI/UCX) lets mpi4jax reduce device buffers directly:
#   export MPI4JAX_USE_CUDA_MPI=1
exec "$VENV/bin/mpirun" -np "$NP" --hostfile "$HOSTFILE" --map-by ppr:1:gpu --bind-to none \
  -x PATH -x LD_LIBRARY_PATH -x XLA_PYTHON_CLIENT_PREALLOCATE=false -x MPI4JAX_USE_CUDA_MPI \
  bash -c 'export CUDA_VISIBLE_DEVICES=${OMPI_COMM_WORLD_LOCAL_RANK:-0}; exec "$0" "$@"' \
  "$VENV/bin/ucluster" train --engine mpi --data "$DATA" --out "$RUN" "$@"
