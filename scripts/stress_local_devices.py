"""Many `ucluster train --devices 2` runs at once on a CPU: does any hang in XLA's CPU client?

Several CPU devices in one process meet in every allreduce of the step. When the host ran steps ahead,
a device's launch could queue behind later computations (XLA's per-device limit on computations in
flight) while the other device waited in the allreduce: a hang, which XLA ends after 40 s with
SIGABRT (seen in CI). `ucluster train` now waits for each step there (`Runtime.settle_each_step`).
This script loads the machine with ROUNDS x CONCURRENT tiny runs (the model and data of
tests/test_data_global.py) and counts the runs that hang, abort or fail.

    python scripts/stress_local_devices.py --work stress_out --rounds 8 --concurrent 4
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ucluster_jax.data.toy import write_toy

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.num_points=10", "model.k=3", "model.conv1_widths=[8,8]", "model.conv2_widths=[8,8]",
        "model.head_widths=[8,8]", "model.gap1_width=4", "model.gap2_width=8", "train.batch_size=32",
        "train.epochs=3", "train.pretrain_epochs=1", "train.kmeans_restarts=2", "train.kmeans_iters=10",
        "train.shuffle=true", "train.lr_decay_samples=20000", "train.eval_batch_size=100",
        "train.kmeans_embeddings=train_mode"]


def outcome(rc: int | None, log: str) -> str:
    if rc is None:
        return "hung"
    if rc == 0:
        return "ok"
    return "aborted (XLA rendezvous timeout)" if "Termination timeout" in log else f"failed (exit {rc})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (data, runs, logs)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--concurrent", type=int, default=4, help="runs at once per round")
    ap.add_argument("--limit", type=float, default=400, help="seconds after which a run counts as hung")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    train, test = a.work / "train", a.work / "test"
    if not train.exists():
        write_toy(train, 1000, 7, num_points=10, row_group_size=96)
        write_toy(test, 300, 8, num_points=10, row_group_size=70)
    ucluster = Path(sys.executable).parent / "ucluster"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    counts: dict[str, int] = {}
    t0 = time.time()
    for r in range(a.rounds):
        procs = []
        for i in range(a.concurrent):
            out = a.work / f"run{r}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [str(ucluster), "train", "--config", str(REPO / "configs/demo.yaml"), "--data", str(train),
                   "--test-data", str(test), "--out", str(out), "--devices", "2",
                   *[x for o in TINY for x in ("--set", o)]]
            log = open(a.work / f"run{r}-{i}.log", "w")
            procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        deadline = time.time() + a.limit
        for p, log in procs:
            try:
                rc = p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                rc = None
            log.close()
            kind = outcome(rc, Path(log.name).read_text())
            counts[kind] = counts.get(kind, 0) + 1
        done = (r + 1) * a.concurrent
        eta = (time.time() - t0) / (r + 1) * (a.rounds - r - 1)
        print(f"round {r + 1}/{a.rounds}: {counts} after {done} runs, ETA {eta / 60:.0f} min", flush=True)
    bad = sum(n for k, n in counts.items() if k != "ok")
    print(f"{a.rounds * a.concurrent} runs, {a.concurrent} at once: {bad} hung, aborted or failed ({counts})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
