"""MPI across processes: mpi4jax inside jitted code, mpi4py for host-side bookkeeping.

Imported only when the job runs under mpirun (or a test asks for it). mpi4jax is the optional
extra `mpi`: it compiles against an MPI library, so it is not a plain dependency.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from ucluster_jax.errors import UserError

INSTALL_MPI4JAX = ("pip install --no-build-isolation 'ucluster-jax[mpi]' with MPI4JAX_BUILD_MPICC set to the "
                   "environment's mpicc (as scripts/install.sh does), or use --engine jaxdist")


def require_mpi4jax():
    """The mpi4jax module, or an error saying how to install it (engines mpi and hybrid need it)."""
    try:
        import mpi4jax
    except ImportError as e:
        raise UserError(f"mpi4jax is not installed ({e}); the mpi and hybrid engines need it: "
                        f"{INSTALL_MPI4JAX}") from None
    return mpi4jax


def launched_world() -> tuple[int, int]:
    """(rank, size) from the launcher's environment (Open MPI, MPICH/PMI, SLURM), without MPI calls."""
    for rank_var, size_var in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                               ("PMIX_RANK", "PMIX_SIZE")):
        if size_var in os.environ:
            return int(os.environ.get(rank_var, 0)), int(os.environ[size_var])
    return 0, 1


class MPIComm:
    """A clone of `comm` (default COMM_WORLD; `ucluster tune --ranks-per-trial` passes a group of ranks)
    with the reductions the trainer needs."""

    def __init__(self, comm: Any = None) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = (MPI.COMM_WORLD if comm is None else comm).Clone()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    # --- inside jitted code (mpi4jax) ---
    def device_sum(self, x: jax.Array) -> jax.Array:
        """Differentiable allreduce-sum: the cotangent of a sum over ranks is itself summed over ranks."""
        mpi4jax = require_mpi4jax()
        comm, SUM = self.comm, self.MPI.SUM

        @jax.custom_vjp
        def f(v):
            return mpi4jax.allreduce(v, op=SUM, comm=comm)

        f.defvjp(lambda v: (f(v), None), lambda _, g: (mpi4jax.allreduce(g, op=SUM, comm=comm),))
        return f(x)

    def tree_mean(self, tree: Any) -> Any:
        """Average a pytree over ranks with ONE allreduce of the flattened leaves (not one per leaf)."""
        mpi4jax = require_mpi4jax()
        flat, unravel = ravel_pytree(tree)
        total = mpi4jax.allreduce(flat, op=self.MPI.SUM, comm=self.comm)
        return unravel(total / self.size)

    # --- host side (mpi4py) ---
    def host_sum(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x)
        out = np.empty_like(x)
        self.comm.Allreduce(x, out, op=self.MPI.SUM)
        return out

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def gather_rows(self, x: np.ndarray) -> np.ndarray | None:
        """Concatenate every rank's rows on rank 0 (None elsewhere)."""
        parts = self.comm.gather(np.ascontiguousarray(x), root=0)
        return np.concatenate(parts) if self.rank == 0 else None

    def allgather_rows(self, x: np.ndarray) -> np.ndarray:
        """Every rank's rows (the same count on each), concatenated in rank order on every rank."""
        x = np.ascontiguousarray(x)
        out = np.empty((self.size * x.shape[0], *x.shape[1:]), x.dtype)
        self.comm.Allgather(x, out)
        return out

    def allgather(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)


def param_checksum(params: Any) -> str:
    """A fingerprint of the exact parameter bytes, compared across ranks to detect diverged replicas."""
    flat, _ = ravel_pytree(jax.device_get(params))
    return hashlib.sha256(np.asarray(flat).tobytes()).hexdigest()[:16]
