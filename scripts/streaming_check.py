"""Show that training streams: a dataset several times larger than the memory the job may use trains.

Writes toy jets (100 points x 8 features, 3.2 kB per jet uncompressed) in chunks, then runs
`ucluster train` for one focal-only epoch inside a cgroup (v1 memory controller, root only) whose
limit is a fraction of the dataset's uncompressed size, and reports the peak memory the cgroup saw.
A job that loaded the dataset would be killed by the OOM killer.

    python scripts/streaming_check.py --jets 400000 --limit-mb 900 --work "$SCRATCH/streaming"
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ucluster_jax.data.schema import DatasetMeta, ShardWriter
from ucluster_jax.data.toy import toy_jets

CGROUP = Path("/sys/fs/cgroup/memory")
TINY = ["model.conv1_widths=[16,16]", "model.conv2_widths=[16,16]", "model.gap2_width=16",
        "model.head_widths=[16,16]", "train.batch_size=256", "train.epochs=1", "train.pretrain_epochs=1",
        "train.shuffle=true"]


def write(out: Path, jets: int, chunk: int = 20000) -> None:
    with ShardWriter(out, DatasetMeta(), shard_size=65536, row_group_size=2048, overwrite=True) as w:
        for i in range(0, jets, chunk):
            w.add(toy_jets(min(chunk, jets - i), seed=1000 + i))
        w.commit()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jets", type=int, default=400_000)
    ap.add_argument("--limit-mb", type=int, default=900)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ucluster-streaming")
    a = ap.parse_args()
    data = a.work / "data"
    if not data.exists():
        t = time.time()
        write(data, a.jets)
        print(f"wrote {a.jets} jets in {time.time() - t:.0f} s", flush=True)
    raw_mb = a.jets * 100 * 8 * 4 / 2**20
    disk_mb = sum(p.stat().st_size for p in data.glob("*.parquet")) / 2**20
    group = CGROUP / f"ucluster-streaming-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(a.limit_mb * 2**20))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(a.limit_mb * 2**20))
        sets = [x for s in TINY for x in ("--set", s)]
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh",
               str(Path(sys.executable).parent / "ucluster"), "train", "--config", "configs/demo.yaml",
               "--data", str(data), "--out", str(a.work / "run"), *sets]
        t = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        peak_mb = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        report = {"jets": a.jets, "dataset_uncompressed_mb": round(raw_mb), "dataset_on_disk_mb": round(disk_mb),
                  "memory_limit_mb": a.limit_mb, "peak_memory_mb": round(peak_mb),
                  "ratio_dataset_to_limit": round(raw_mb / a.limit_mb, 2), "exit_code": r.returncode,
                  "seconds": round(time.time() - t), "oom_kills": (group / "memory.oom_control").read_text().split()[-1]}
    finally:
        subprocess.run(["sh", "-c", f"cat {group}/cgroup.procs | xargs -r kill -9"], check=False)
        time.sleep(0.5)
        group.rmdir()
    print(r.stdout[-800:], r.stderr[-1500:] if r.returncode else "", sep="\n")
    print(json.dumps(report, indent=1))
    return 0 if r.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
