"""Data parallelism under a real mpirun: the distributed step is the single-process step on the global batch."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TINY, mpirun

SCRIPT = str(REPO / "tests" / "mpi" / "equivalence.py")


def run_single(engine, out, devices=None, *overrides):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    args = [sys.executable, SCRIPT, engine, str(out)] + ([str(devices)] if devices else []) + list(overrides)
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_single("single", tmp_path_factory.mktemp("eq") / "ref.npz")


def assert_equivalent(res, ref, replicas):
    assert int(res["replicas"]) == replicas
    g = ref["grads0"]
    # the gradient the step applied: averaged over replicas, BN moments over the global batch; every element
    np.testing.assert_allclose(res["grads0"], g, rtol=1e-4, atol=1e-5 * np.abs(g).max())
    # after one Adam step (lr * m/(sqrt(v)+eps) ~ lr * sign(g)) every parameter whose gradient stands
    # above float rounding moved identically; near-zero gradients (biases before BatchNorm, clipped
    # ReLUs) are rounding noise that Adam turns into +-lr steps in either direction.
    clear = np.abs(g) > 1e-4 * np.abs(g).max()
    assert clear.mean() > 0.5
    np.testing.assert_allclose(res["params1"][clear], ref["params1"][clear], rtol=0, atol=1e-6)
    assert np.abs(res["params1"] - ref["params1"]).max() <= 2.01e-3  # at most 2 lr apart anywhere
    # the same loss at the first step; later steps inherit that rounding noise, so only closely
    np.testing.assert_allclose(res["losses"][0], ref["losses"][0], rtol=1e-5)
    np.testing.assert_allclose(res["losses"], ref["losses"], rtol=2e-2)
    assert int(res["samples"]) == int(ref["samples"]) and int(res["step"]) == int(ref["step"])


def test_two_ranks_equal_one_process(reference, tmp_path):
    r = mpirun(2, sys.executable, SCRIPT, "mpi", str(tmp_path / "mpi.npz"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_equivalent(np.load(tmp_path / "mpi.npz"), reference, 2)


def test_two_local_devices_equal_one_device(reference, tmp_path):
    assert_equivalent(run_single("local", tmp_path / "local.npz", 2), reference, 2)


def test_two_ranks_times_two_devices_equal_one_process(reference, tmp_path):
    # engine hybrid: per-device gradients summed over local devices, then one mpi4jax allreduce;
    # BN moments over all 4 devices through jax.distributed; replicas checked bit-identical inside.
    r = mpirun(2, sys.executable, SCRIPT, "hybrid", str(tmp_path / "hybrid.npz"), "2",
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert_equivalent(np.load(tmp_path / "hybrid.npz"), reference, 4)


def test_two_ranks_through_jax_distributed_equal_one_process(reference, tmp_path):
    # engine jaxdist (the comparison engine): no mpi4jax in the step; BN moments and gradients are
    # psum'd by XLA's collectives (gloo here) over every device of the processes jax.distributed joined.
    r = mpirun(2, sys.executable, SCRIPT, "jaxdist", str(tmp_path / "jaxdist.npz"),
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = np.load(tmp_path / "jaxdist.npz")
    assert str(res["engine"]) == "jaxdist"
    assert_equivalent(res, reference, 4)  # 2 ranks x 2 devices


def test_per_replica_batchnorm_is_the_same_over_ranks_or_devices_and_differs_from_synchronised(reference, tmp_path):
    # parallel.sync_bn=false: every replica normalises with its own half of the batch (no BN allreduce);
    # 2 ranks and 2 local devices compute the same thing, which is not the synchronised step
    off = "parallel.sync_bn=false"
    local = run_single("local", tmp_path / "local.npz", 2, off)
    r = mpirun(2, sys.executable, SCRIPT, "mpi", str(tmp_path / "mpi.npz"), off)
    assert r.returncode == 0, r.stderr[-3000:]  # replicas' parameters checked bit-identical inside
    ranks = np.load(tmp_path / "mpi.npz")
    g = local["grads0"]
    np.testing.assert_allclose(ranks["grads0"], g, rtol=1e-4, atol=1e-5 * np.abs(g).max())
    np.testing.assert_allclose(ranks["losses"][0], local["losses"][0], rtol=1e-5)
    # after the first step the moving averages leave the devices averaged over the replicas, by either
    # route; the means of the halves' means are the global means, the halves' variances are not
    np.testing.assert_allclose(ranks["stats1"], local["stats1"], rtol=1e-5, atol=1e-7)
    assert np.abs(local["stats1"] - reference["stats1"]).max() > 1e-4
    assert np.abs(g - reference["grads0"]).max() > 1e-2 * np.abs(g).max()  # per-half moments: another step


COUNT_ALLREDUCES = """
import re, sys
import numpy as np
from ucluster_jax.config import load_config
from ucluster_jax.parallel.runtime import setup
from ucluster_jax.train.state import create_state
cfg = load_config(None, ["train.batch_size=8", "model.num_points=30", "model.k=5", sys.argv[1]])
rt = setup("mpi")
b = {"x": np.zeros((8, 30, 8), np.float32), "target": np.zeros(8, np.int32), "label": np.zeros(8, np.int32)}
text = rt.make_step(cfg).lower(rt.put_state(create_state(cfg)), rt.put_batch(b)).as_text()
print(len(re.findall(r"custom_call @mpi_allreduce", text)))
"""


@pytest.mark.parametrize("sync, allreduces", [("true", 54), ("false", 1)])
def test_per_replica_batchnorm_leaves_one_allreduce_per_step(sync, allreduces):
    # the mpi engine's step as lowered: synchronised BN reduces the BatchNorm moments forward and their
    # cotangents backward (53 allreduces), plus the one gradient allreduce; per-replica BN only the latter
    p = subprocess.run([sys.executable, "-c", COUNT_ALLREDUCES, f"parallel.sync_bn={sync}"], capture_output=True,
                       text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert int(p.stdout.split()[-1]) == allreduces


def test_fixed_slices_give_one_process_and_two_ranks_the_same_bits(toy_small, tmp_path):
    """parallel.slices=2: a run trained by one process, continued under mpirun -np 2 from its last
    pre-training checkpoint (each rank seeing the same cores), writes bit-identical checkpoints and the same
    losses and accuracies as the one process (issue #18): a checkpoint resumes at another world size; the
    k-means start and the joint phase run over both ranks; the same state is selected as the run's result
    (train.select_from_epoch: measured on rank 0, broadcast)."""
    more = ["parallel.slices=2", "train.select_from_epoch=2", "train.eval_every_samples=256", "train.select_jets=300"]
    sets = [a for s in TINY + more for a in ("--set", s)]
    args = ["-m", "ucluster_jax.cli", "train", "--config", "configs/demo.yaml", "--data", str(toy_small[0]),
            "--test-data", str(toy_small[1]), *sets]
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, *args, "--out", str(one)], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.copytree(one, two, ignore=shutil.ignore_patterns("selected"))
    last = sorted((two / "checkpoints").glob("ckpt-*"))[-2:]  # epoch 2's (.json, .msgpack): the joint epoch
    assert json.loads(last[0].read_text())["epoch"] == 2
    for f in last:
        f.unlink()
    r = mpirun(2, "--bind-to", "none", sys.executable, *args, "--out", str(two), "--resume", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    def ran(run):
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "jets_per_s"} for r in recs]

    assert ran(one) == ran(two)
    assert len(ran(one)) == 3 and ran(one)[-1]["test_acc"] is not None
    ckpts = [sorted((r / "checkpoints").glob("*.msgpack")) for r in (one, two)]
    assert [p.name for p in ckpts[0]] == [p.name for p in ckpts[1]] and ckpts[0]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*ckpts))
    meta = json.loads(ckpts[1][-1].with_suffix(".json").read_text())
    assert meta["epoch"] == 2 and meta["world"] == 2 and meta["replicas"] == 2  # written by the two ranks
    chosen = [sorted((r / "selected" / "checkpoints").glob("*.msgpack")) for r in (one, two)]
    assert len(chosen[0]) == 1 and chosen[0][0].name == chosen[1][0].name
    assert chosen[0][0].read_bytes() == chosen[1][0].read_bytes()


def test_fixed_slices_need_one_device_per_process_and_a_dividing_world():
    from ucluster_jax.config import load_config
    from ucluster_jax.errors import UserError
    from ucluster_jax.parallel.runtime import setup

    rt = setup("local", num_devices=2)
    with pytest.raises(UserError, match="parallel.slices=2 needs engine single or mpi"):
        rt.configure(load_config(None, ["parallel.slices=2"]))


def test_missing_mpi4jax_says_how_to_install_it(monkeypatch):
    from ucluster_jax.errors import UserError
    from ucluster_jax.parallel.runtime import setup

    monkeypatch.setitem(sys.modules, "mpi4jax", None)  # import fails, as when it is not installed
    with pytest.raises(UserError, match=r"mpi4jax is not installed.*pip install .*ucluster-jax\[mpi\]"):
        setup("mpi")
