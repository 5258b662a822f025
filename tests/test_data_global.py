"""Distributed data equals one process (issue 18): every world size sees the same global batches.

Reader tests simulate ranks with ParquetDataset(rank=, world=); the training tests run the real CLI
in one process and under a real mpirun on real parquet with uneven row groups.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from conftest import BIN, REPO, mpirun, tb_scalars
from ucluster_jax import checkpoint
from ucluster_jax.config import load_config
from ucluster_jax.data.prepare import prepare, row_group_size_for
from ucluster_jax.data.reader import ParquetDataset
from ucluster_jax.data.schema import DatasetMeta, write_shards
from ucluster_jax.data.toy import write_hls4ml_h5, write_toy
from ucluster_jax.train.loop import uneven_read_warning
from ucluster_jax.train.state import create_state

META = DatasetMeta(num_points=4, num_features=2, feature_names=("a", "b"))


def id_dataset(path: Path, n: int, row_group_size: int) -> Path:
    """n jets whose mass is their id (row in file order), in row groups of row_group_size (the last short)."""
    ids = np.arange(n)
    x = np.broadcast_to(ids[:, None, None], (n, 4, 2)).astype(np.float32)
    write_shards(path, {"x": x, "target": (ids % 20).astype(np.int32), "label": (ids % 3).astype(np.int32),
                        "mass": ids.astype(np.float32)}, META, shard_size=3 * row_group_size,
                 row_group_size=row_group_size)
    return path


def global_batches(path: Path, world: int, batch: int, **kw) -> list[np.ndarray]:
    """The ids of each step's global batch: the ranks' local batches concatenated in rank order."""
    per_rank = [[b["mass"].astype(np.int64) for b in ParquetDataset(path, rank=r, world=world).batches(batch, **kw)]
                for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1  # every rank runs the same number of steps
    return [np.concatenate(step) for step in zip(*per_rank)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_world_size_sees_the_same_global_batches(tmp_path, shuffle):
    d = id_dataset(tmp_path / "ds", 7 * 300 + 77, 300)  # 8 row groups in 3 shards, the last one short
    kw = dict(lanes=8, seed=4, epoch=3, shuffle=shuffle, buffer_row_groups=2)
    ref = global_batches(d, 1, 64, **kw)
    assert len(ref) == 2177 // 64
    flat = np.concatenate(ref)
    assert len(np.unique(flat)) == len(flat) >= 2177 - 64  # fewer than one global batch left out
    for world in (2, 4, 8):
        got = global_batches(d, world, 64, **kw)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)  # the same jets, even in the same order
    if shuffle:  # a new order every epoch
        other = global_batches(d, 2, 64, **{**kw, "epoch": 4})
        assert not all(np.array_equal(a, b) for a, b in zip(other, ref))


def test_issue_dataset_keeps_every_batch_under_two_ranks(tmp_path):
    """The issue's numbers: 6 row groups of 2048 and one of 1166 (13,454 jets), batch 128. Dealing whole
    row groups gave rank 0 three and rank 1 four, and both stopped at 82 steps (10,496 jets)."""
    d = id_dataset(tmp_path / "ds", 6 * 2048 + 1166, 2048)
    assert [g.rows for g in ParquetDataset(d).groups] == [2048] * 6 + [1166]
    for world in (1, 2):
        ranks = [ParquetDataset(d, rank=r, world=world) for r in range(world)]
        assert ranks[0].steps_per_epoch(128) == 105
        for ds in ranks:
            n = sum(1 for _ in ds.batches(128, lanes=8, seed=0, epoch=0, shuffle=True))
            assert n == 105, f"world {world} rank {ds.rank}: {n} steps"  # old dealing: 82


def test_a_rank_reads_only_the_row_groups_holding_its_rows(tmp_path, monkeypatch):
    d = id_dataset(tmp_path / "ds", 16 * 100 + 30, 100)
    read: list[int] = []
    orig = ParquetDataset._read_group

    def spy(self, handles, g):
        read.append(self.groups.index(g))
        return orig(self, handles, g)

    monkeypatch.setattr(ParquetDataset, "_read_group", spy)
    for rank in range(4):
        ds = ParquetDataset(d, rank=rank, world=4)
        read.clear()
        for _ in ds.batches(64, lanes=8, seed=1, epoch=2, shuffle=True, buffer_row_groups=2):
            pass
        order = ds._order(1, 2, True)
        starts = np.cumsum([0] + [ds.groups[i].rows for i in order])
        lo, hi = rank * ds.num_jets // 4, (rank + 1) * ds.num_jets // 4
        holding = {int(order[k]) for k in range(len(order)) if starts[k] < hi and starts[k + 1] > lo}
        assert set(read) == holding
        assert len(read) <= len(holding) + 2 * 2  # each group decoded once per lane it overlaps (2 lanes)


def test_evaluation_batches_do_not_depend_on_the_world(tmp_path):
    d = id_dataset(tmp_path / "ds", 5 * 70 + 13, 70)
    ref = [b["mass"] for b in ParquetDataset(d).iter_all(48)]
    for world in (2, 3, 5):
        got = [b["mass"] for r in range(world) for b in ParquetDataset(d, rank=r, world=world).iter_all(48)]
        assert len(got) == len(ref) and all(np.array_equal(a, b) for a, b in zip(got, ref))


# -- prepare --ranks and the warning ------------------------------------------------------------------
def test_prepare_ranks_sizes_row_groups_for_the_ranks(tmp_path):
    h5 = tmp_path / "in.h5"
    write_hls4ml_h5(h5, 3000, 1)
    res = prepare([h5], tmp_path / "out", ranks=3, row_group_size=2048, split=[("train", 0.7), ("test", 0.3)],
                  log=lambda s: None)
    for name, o in res["outputs"].items():
        ds = ParquetDataset(name, world=3)
        sizes = [g.rows for g in ds.groups]
        assert len(sizes) % 3 == 0 and len(sizes) >= 12, sizes
        assert len(set(sizes[:-1])) == 1 and sizes[-1] <= sizes[0]
        assert ds.read_factor() <= 1.5 and uneven_read_warning(ds, Path(name)) is None
    assert row_group_size_for(40 * 2048, 4, 2048) == 2048  # 40 full groups: 10 per rank
    assert row_group_size_for(40 * 2048 + 1, 4, 2048) == -(-(40 * 2048 + 1) // 44)  # 11 per rank
    assert row_group_size_for(100, 4, 2048) == 7  # at least 4 per rank
    # one big row group per rank: the warning names the data and the fix, in one line
    big = id_dataset(tmp_path / "big", 1000, 600)
    line = uneven_read_warning(ParquetDataset(big, world=2), big)
    assert line and "\n" not in line and str(big) in line and "--ranks 2" in line


# -- training: 1 process vs 2 ranks vs 2 devices (2 ranks x 2 devices: tests/test_distributed.py) ----
TINY = ["model.num_points=10", "model.k=3", "model.conv1_widths=[8,8]", "model.conv2_widths=[8,8]",
        "model.head_widths=[8,8]", "model.gap1_width=4", "model.gap2_width=8", "train.batch_size=32",
        "train.epochs=2", "train.pretrain_epochs=1", "train.kmeans_restarts=2", "train.kmeans_iters=10",
        "train.shuffle=true", "train.lr_decay_samples=20000", "train.eval_batch_size=100",
        "train.kmeans_embeddings=train_mode"]


def ucluster_args(data: Path, test: Path, out: Path, *extra: str) -> list[str]:
    sets = [a for o in TINY for a in ("--set", o)]
    return [str(BIN / "ucluster"), "train", "--config", str(REPO / "configs/demo.yaml"), "--data", str(data),
            "--test-data", str(test), "--out", str(out), *sets, *extra]


def env_with(devices: int = 1) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def final(run: Path) -> tuple[np.ndarray, list[dict]]:
    cfg = load_config(REPO / "configs/demo.yaml", TINY)
    state, _ = checkpoint.load_latest(run, jax.device_get(create_state(cfg)))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return np.asarray(ravel_pytree(state.params)[0]), recs


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[Path, Path]:
    """2048 training jets in a row group of 1500, five of 96 and one of 68: under 2 ranks one rank decodes
    up to 2x its share (the read-factor warning shows), and dealing whole row groups left ranks unequal."""
    root = tmp_path_factory.mktemp("uneven")
    write_toy(root / "train", 1500, 3, num_points=10, row_group_size=1500)
    write_toy(root / "small", 548, 5, num_points=10, row_group_size=96)
    (root / "small" / "part-00000.parquet").rename(root / "train" / "part-00001.parquet")
    write_toy(root / "test", 300, 8, num_points=10, row_group_size=70)
    return root / "train", root / "test"


def launch(log: Path, cmd: list[str], devices: int = 1, err: Path | None = None) -> subprocess.Popen:
    """cmd in the background, its output in `log` (stderr in `err` where given)."""
    return subprocess.Popen(cmd, env=env_with(devices), stdout=open(log, "w"),
                            stderr=open(err, "w") if err else subprocess.STDOUT)


def finished(p: subprocess.Popen, log: Path) -> None:
    assert p.wait(timeout=1200) == 0, log.read_text()[-3000:]


MPIRUN2 = [str(BIN / "mpirun"), "--allow-run-as-root", "--oversubscribe", "-np", "2"]


@pytest.fixture(scope="module")
def one_process(uneven, tmp_path_factory) -> Path:
    """`ucluster train` in one process, launched in the background: the reference of the tests below."""
    root = tmp_path_factory.mktemp("one")
    p = launch(root / "log", ucluster_args(*uneven, root / "run"))
    yield p, root
    p.kill()


@pytest.fixture(scope="module")
def two_ranks(uneven, tmp_path_factory) -> Path:
    """`mpirun -np 2 ucluster train`, launched in the background: checked against one process, and the
    uninterrupted run that a run killed and resumed must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("two")
    p = launch(root / "out", [*MPIRUN2, *ucluster_args(*uneven, root / "run")], err=root / "err")
    yield p, root
    p.kill()


def assert_same_training(run: Path, one_process) -> None:
    p, root = one_process
    finished(p, root / "log")
    ref_params, ref = final(root / "run")
    assert [r["steps"] for r in ref] == [2048 // 32] * 2  # dealt whole row groups, a rank could hold 288 jets
    params, recs = final(run)
    assert [r["steps"] for r in recs] == [r["steps"] for r in ref]
    assert [r["samples_seen"] for r in recs] == [r["samples_seen"] for r in ref]
    rel = {k: max(abs(a[k] - b[k]) / abs(b[k]) for a, b in zip(recs, ref)) for k in ("loss", "focal", "kmeans")}
    worst = float(np.abs(params - ref_params).max())
    acc = abs(recs[-1]["test_acc"] - ref[-1]["test_acc"])
    print(f"{run.name}: relative loss differences {rel}, parameters {worst:.2g}, test accuracy {acc:.4f}")
    # rounding differences, amplified by Adam (tests/test_distributed.py): 2.8e-4 on the loss after epoch 0;
    # the small k-means term (0.1 against 20) moves most in relative terms
    assert rel["loss"] < 5e-3 and rel["focal"] < 5e-3 and rel["kmeans"] < 5e-2, rel
    assert acc < 0.02  # a few of the 300 test jets; the issue's old dealing: 0.069
    assert worst < 0.1  # measured 0.03-0.042 after 2 x 64 steps; mu included: the same clusters in the same order


def test_cli_two_ranks_train_like_one_process(uneven, one_process, two_ranks):
    p, root = two_ranks
    finished(p, root / "err")
    out, err = (root / "out").read_text(), (root / "err").read_text()
    # the read-factor warning (loop.uneven_read_warning), once: only rank 0 speaks
    assert err.count("warning:") == 1 and f"{uneven[0]}: row groups of up to 1500 jets" in err, err[-3000:]
    assert out.count("epoch   1") == 1  # only rank 0 logs
    assert len(list((root / "run" / "checkpoints").glob("*.msgpack"))) == 2  # one writer: rank 0
    assert [e for e, _ in tb_scalars(root / "run")["epoch/loss"]] == [0, 1]  # one event writer: rank 0
    assert_same_training(root / "run", one_process)


def test_cli_two_devices_train_like_one_process(uneven, one_process, tmp_path):
    # two ranks x two devices (engine hybrid): the rank slice of the run above, then this device split;
    # its step is held to the single-process step in tests/test_distributed.py
    p = launch(tmp_path / "devices.log", ucluster_args(*uneven, tmp_path / "devices", "--devices", "2"), 2)
    finished(p, tmp_path / "devices.log")
    assert_same_training(tmp_path / "devices", one_process)


# -- a rank killed mid-epoch, and the resume --------------------------------------------------------
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


def test_sigkill_one_rank_mid_epoch_ends_the_job_and_resumes_to_the_uninterrupted_result(uneven, two_ranks, tmp_path):
    """Issue 4.1 and 18: rank 1 of `mpirun -np 2 ucluster train` killed with SIGKILL inside epoch 1 (after
    k-means) ends the whole job promptly with a message naming the rank; `--resume` continues at the step
    after the newest mid-epoch checkpoint and reaches exactly the state of the run never interrupted
    (the `two_ranks` fixture: the same data, world size and settings; checkpoints do not change numbers)."""
    killed = tmp_path / "killed"
    args = ["--checkpoint-every-steps", "5", "--set", "train.keep_checkpoints=100"]
    out_log, err_log = tmp_path / "killed.out", tmp_path / "killed.err"
    p = launch(out_log, [*MPIRUN2, *ucluster_args(*uneven, killed, *args)], err=err_log)
    first = killed / "checkpoints" / f"ckpt-{64 + 10:010d}.json"  # 64 steps per epoch: epoch 1, step 10
    deadline = time.monotonic() + 1200
    pids: dict[int, int] = {}
    while len(pids) < 2 or not first.exists():
        assert p.poll() is None, err_log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no mid-epoch checkpoint"
        pids = pids if len(pids) == 2 else rank_pids(p.pid)
        time.sleep(0.01)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGKILL)
    t_kill = time.monotonic()
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("mpirun hung after a rank was killed")
    waited = time.monotonic() - t_kill
    out, err = out_log.read_text(), err_log.read_text()
    assert p.returncode != 0
    assert waited < 30, f"mpirun took {waited:.0f} s to notice"
    # Open MPI (prterun) names the rank and its pid: "process rank 1 with PID N on node X exited on signal 9"
    both = " ".join((out + err).split())
    assert f"rank 1 with PID {pids[1]}" in both and "signal 9" in both, (out + err)[-3000:]
    deadline = time.monotonic() + 10  # every rank gone (or a zombie awaiting its reaper)
    while not all(not Path(f"/proc/{q}").exists() or "Z" in Path(f"/proc/{q}/stat").read_text().split()[2]
                  for q in pids.values()):
        assert time.monotonic() < deadline, f"ranks {pids} still running after mpirun exited"
        time.sleep(0.05)
    last = checkpoint.list_checkpoints(killed)[-1]
    meta = json.loads(last.with_suffix(".json").read_text())
    assert meta["next"][0] == 1 and 10 <= meta["next"][1] < 2048 // 32, meta  # killed inside epoch 1

    resumed = mpirun(2, *ucluster_args(*uneven, killed, *args, "--resume"), env=env_with(), timeout=1200)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("epoch   1") == 1 and "epoch   0" not in resumed.stdout  # only rank 0 logs
    reference, root = two_ranks
    finished(reference, root / "err")
    ref = root / "run"
    a, recs_a = final(killed)
    b, recs_b = final(ref)
    assert [r["epoch"] for r in recs_a] == [r["epoch"] for r in recs_b] == [0, 1]
    assert recs_a[1]["resumed_at_step"] == meta["next"][1] and recs_a[1]["steps"] == 64 - meta["next"][1]
    assert recs_a[-1]["step"] == recs_b[-1]["step"] == 2 * 64
    np.testing.assert_array_equal(a, b)  # the same world size: the same numbers
    assert recs_a[-1]["test_acc"] == recs_b[-1]["test_acc"]
    # and every leaf of the train state: params, BN statistics, Adam slots, counters
    cfg = load_config(REPO / "configs/demo.yaml", TINY)
    la, lb = (jax.tree_util.tree_leaves(checkpoint.load_latest(r, jax.device_get(create_state(cfg)))[0])
              for r in (killed, ref))
    assert len(la) == len(lb)
    worst = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0))
                for x, y in zip(la, lb))
    assert worst <= 1e-6, worst
