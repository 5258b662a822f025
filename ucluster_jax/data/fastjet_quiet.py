"""FastJet, imported once per process with its banner kept off stdout (it prints one at the first
clustering, which would mix into a command's output)."""
from __future__ import annotations

import ctypes
import functools
import os
import sys


@functools.cache
def fastjet():
    """The `fastjet` module, after one throw-away clustering with stdout pointed at /dev/null."""
    import fastjet as fj

    try:
        libc = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - non-glibc platform: live with the banner
        libc = None
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        fj.ClusterSequence([fj.PseudoJet(1.0, 0.0, 0.0, 1.0)], fj.JetDefinition(fj.antikt_algorithm, 0.8)).inclusive_jets()
        if libc is not None:
            libc.fflush(None)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return fj
