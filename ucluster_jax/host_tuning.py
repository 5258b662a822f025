"""Process settings that make XLA's CPU backend fast, applied once, before JAX starts.

- glibc's malloc returns XLA's per-step temporaries (about 1.2 GB at batch 512) to the kernel
  after every step and faults them back in 4 KiB at a time: measured 320,000 page faults and
  0.5-0.7 s of system time per training step on the development CPU. `glibc.malloc.hugetlb=1`
  (glibc >= 2.35; ignored by older ones) backs those mappings with transparent huge pages: about
  2,000 faults and 0.1 s. glibc reads it only at process start, so the command line re-executes
  itself once with it set.
- Even so the kernel zeroes those pages again at every step (0.4-0.5 s of system time per step at
  batch 512 on the Intel development CPU): the allocator wrapper `native/keep_alloc.c`, built by the
  install into the environment's lib/, is preloaded to keep the step's temporary buffer mapped
  between steps (docs/BENCHMARKS.md). Not added where LD_PRELOAD is already set (another malloc
  there would not mix with its glibc calls).
- `--xla_cpu_prefer_vector_width=512` lets XLA's own loops use AVX-512 where the CPU has it.

`UCLUSTER_NO_TUNING=1` leaves the process as started. Numbers (docs/BENCHMARKS.md) are the same
function either way; only the speed changes.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
XLA_CPU_FLAGS = ("--xla_cpu_prefer_vector_width=512",)
KEEP_ALLOC = Path(sys.prefix) / "lib" / "libucluster_keep_alloc.so"  # scripts/install.sh builds it


def tuned_env(env: dict[str, str], keep_alloc: Path = KEEP_ALLOC) -> dict[str, str]:
    """`env` with the malloc tunable, the allocator wrapper (if built) and the XLA CPU flags added
    (user settings win)."""
    env = dict(env)
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, MALLOC_TUNABLE) if t)
    if not env.get("LD_PRELOAD") and keep_alloc.is_file():
        env["LD_PRELOAD"] = str(keep_alloc)
    flags = env.get("XLA_FLAGS", "")
    for flag in XLA_CPU_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    env["XLA_FLAGS"] = flags
    return env


def tune_process() -> None:
    """Re-execute this program with `tuned_env` if it was not started with it (glibc Linux only).

    Call it first thing in a program's entry point, before JAX, MPI or threads start; under
    mpirun each rank re-executes in place (same PID, before MPI_Init).
    """
    if os.environ.get("UCLUSTER_NO_TUNING") or "jax" in sys.modules:
        return
    env = tuned_env(os.environ)
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    changed = any(env.get(k) != os.environ.get(k) for k in ("GLIBC_TUNABLES", "LD_PRELOAD"))
    if glibc and changed:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    os.environ["XLA_FLAGS"] = env["XLA_FLAGS"]
