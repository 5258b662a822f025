"""Reliability under mpirun (issue 4.1): a rank killed with SIGKILL mid-epoch ends the whole job
promptly with a message naming the rank; `--resume` then reaches the same final state as a run that
was never interrupted (data order is a function of seed and epoch only)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ucluster_jax import checkpoint
from ucluster_jax.config import load_config
from ucluster_jax.data.toy import write_toy
from ucluster_jax.train.state import create_state

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["model.num_points=10", "model.k=3", "model.conv1_widths=[8,8]", "model.conv2_widths=[8,8]",
        "model.head_widths=[8,8]", "model.gap1_width=4", "model.gap2_width=8", "train.batch_size=16",
        "train.epochs=2", "train.pretrain_epochs=1", "train.kmeans_restarts=1", "train.kmeans_iters=5",
        "train.shuffle=true"]

pytestmark = pytest.mark.skipif(shutil.which("mpirun", path=str(BIN)) is None, reason="no mpirun in the venv")


def launch(data: Path, out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    sets = [a for o in TINY for a in ("--set", o)]
    cmd = [str(BIN / "mpirun"), "--allow-run-as-root", "--oversubscribe", "-np", "2", str(BIN / "ucluster"),
           "train", "--config", str(REPO / "configs/demo.yaml"), "--data", str(data), "--out", str(out),
           *sets, *extra]
    # the three launches share compiled programs through JAX's persistent cache (only to save time)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out


def watch(p: subprocess.Popen, marker: str) -> tuple[list[str], threading.Event, threading.Thread]:
    """Collect the job's output in a thread; the event is set once a line contains `marker`."""
    lines, seen = [], threading.Event()

    def read():
        for line in p.stdout:
            lines.append(line)
            if marker in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, seen, reader


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the Python processes below `launcher`, from /proc (their OMPI_COMM_WORLD_RANK)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = dict(kv.split(b"=", 1) for kv in (d / "environ").read_bytes().split(b"\0") if b"=" in kv)
            if b"OMPI_COMM_WORLD_RANK" not in env or b"ucluster" not in (d / "cmdline").read_bytes():
                continue
            a = int(d.name)
            while a > 1 and a != launcher:
                a = _parent(a)
        except (OSError, ValueError, IndexError):
            continue
        if a == launcher:
            found[int(env[b"OMPI_COMM_WORLD_RANK"])] = int(d.name)
    return found


def final_state(run: Path, cfg):
    state, meta = checkpoint.load_latest(run, jax.device_get(create_state(cfg)))
    return state, meta


def test_sigkill_one_rank_then_resume_matches_uninterrupted(tmp_path):
    data = tmp_path / "data"
    write_toy(data, 192, 3, num_points=10, row_group_size=16)  # 12 row groups: 6 per rank, 12 steps/epoch
    cache = tmp_path / "xla-cache"
    killed, ref = tmp_path / "killed", tmp_path / "ref"

    p = launch(data, killed, cache)
    lines, kmeans_done, reader = watch(p, "k-means++")
    # epoch 0 done and checkpointed, then k-means (rank 0 logs it): epoch 1's steps are under way
    assert kmeans_done.wait(600), "".join(lines)[-3000:]
    assert (killed / "checkpoints" / "ckpt-0000000012.json").exists()
    pids = rank_pids(p.pid)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGKILL)
    t_kill = time.monotonic()
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("mpirun hung after a rank was killed")
    waited = time.monotonic() - t_kill
    reader.join(timeout=10)
    out = "".join(lines)
    assert p.returncode != 0
    assert waited < 30, f"mpirun took {waited:.0f} s to notice"
    # Open MPI (prterun) names the rank and its pid: "process rank 1 with PID N on node X exited on signal 9"
    assert f"rank 1 with PID {pids[1]}" in " ".join(out.split()), out[-3000:]
    assert "signal 9" in out
    assert [c.name for c in checkpoint.list_checkpoints(killed)] == ["ckpt-0000000012.msgpack"]  # killed mid-epoch 1
    deadline = time.monotonic() + 10  # every rank gone (or a zombie awaiting its reaper)
    while not all(not Path(f"/proc/{q}").exists() or "Z" in Path(f"/proc/{q}/stat").read_text().split()[2]
                  for q in pids.values()):
        assert time.monotonic() < deadline, f"ranks {pids} still running after mpirun exited"
        time.sleep(0.05)

    resumed = finish(launch(data, killed, cache, "--resume"))
    assert "epoch   1" in resumed and "epoch   0" not in resumed
    finish(launch(data, ref, cache))

    cfg = load_config(REPO / "configs/demo.yaml", TINY)
    a, ma = final_state(killed, cfg)
    b, mb = final_state(ref, cfg)
    assert ma["step"] == mb["step"] == 24 and ma["epoch"] == mb["epoch"] == 1
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    worst = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0))
                for x, y in zip(la, lb))
    assert worst <= 1e-6, worst
