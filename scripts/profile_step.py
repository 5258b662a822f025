#!/usr/bin/env python3
"""Developer tool: time the training step, count its page faults, and break it down by layer.

The figures in docs/BENCHMARKS.md ("Where the time goes") come from it. It runs the jitted step
`ucluster train` uses on toy jets, in this process as started (no `host_tuning` re-exec), so the
settings are compared by setting them on the command line:

    python scripts/profile_step.py 512                                   # as started
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 XLA_FLAGS=--xla_cpu_prefer_vector_width=512 \
        LD_PRELOAD=$PWD/.venv/lib/libucluster_keep_alloc.so \
        python scripts/profile_step.py 512 --layers                      # as `ucluster` runs
    git worktree add "$OLD" 1ffd2a1 && (cd "$OLD" && PYTHONPATH="$OLD" \
        python /path/to/scripts/profile_step.py 512)                     # an older model, same script

Prints jets/s (median and best step: on a shared virtual machine the best is the steadier figure
for A/B comparisons), minor page faults and system/user CPU time per step; `--layers` adds thread time
per layer (forward / backward) from a `jax.profiler` trace, mapped through the compiled HLO.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import resource
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("batch", type=int)
    ap.add_argument("--config", default="configs/wztop.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--data", help="time a batch of this parquet dataset instead of synthetic jets")
    ap.add_argument("--layers", action="store_true", help="per-layer thread time from a profiler trace")
    ap.add_argument("--depth", type=int, default=2, help="layer name depth of the breakdown")
    a = ap.parse_args()

    import jax

    from ucluster_jax.bench import synthetic_jets
    from ucluster_jax.config import load_config
    from ucluster_jax.train.state import create_state
    from ucluster_jax.train.step import make_train_step

    cfg = load_config(a.config, a.overrides)
    step = jax.jit(make_train_step(cfg), donate_argnums=0)
    if a.data:
        from pathlib import Path

        from ucluster_jax.data.reader import ParquetDataset

        batch = next(ParquetDataset(Path(a.data)).iter_all(a.batch))
    else:
        batch = synthetic_jets(a.batch, cfg.model.num_points)
    batch = jax.device_put(batch)
    state = create_state(cfg)
    for _ in range(3):
        state, _m = step(state, batch)
    jax.block_until_ready(state)
    r0, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        state, _m = step(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    per = lambda f: (getattr(r1, f) - getattr(r0, f)) / a.steps  # noqa: E731
    dt = sorted(times)[len(times) // 2]
    print(f"B={a.batch} step {dt * 1e3:.1f} ms (median)  {a.batch / dt:.0f} jets/s, best {a.batch / min(times):.0f}  "
          f"minflt/step {per('ru_minflt'):.0f} sys/step {per('ru_stime') * 1e3:.0f} ms user/step "
          f"{per('ru_utime') * 1e3:.0f} ms")
    if not a.layers:
        return 0

    trace, n = tempfile.mkdtemp(prefix="ucluster-trace-"), 3
    jax.profiler.start_trace(trace)
    for _ in range(n):
        state, _m = step(state, batch)
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    path = sorted(glob.glob(trace + "/**/*.xplane.pb", recursive=True), key=os.path.getmtime)[-1]
    thunk_ns: collections.Counter = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLAEigen"):
                for ev in line.events:
                    if not ev.name.startswith("ThunkExecutor"):
                        thunk_ns[ev.name] += ev.duration_ns
    op_name = {}
    for hlo in step.lower(state, batch).compile().as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo)
        if m:
            op_name[m.group(1)] = m.group(2)
    layers: collections.Counter = collections.Counter()
    for thunk, ns in thunk_ns.items():
        op = op_name.get(thunk, "?")
        path_ = re.sub(r"jit\(train_step\)/|jvp\(|transpose\(|\)", "", op).split("/")[:a.depth]
        layers[("bwd " if "transpose(" in op else "fwd ") + "/".join(path_)] += ns
    print(f"thread time per step: {sum(layers.values()) / n / 1e6:.0f} ms")
    for key, ns in layers.most_common(25):
        print(f"{ns / n / 1e6:8.1f} ms  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
