"""Reliability (issue 4): checkpoints, incompatible resumes, non-finite training, code-free loading,
bad input through the CLI, fuzzed readers and converters, flat memory. docs/RELIABILITY.md lists the
faults tried here and what happens. The SIGKILL-under-mpirun test is in test_data_global.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle  # only to craft a hostile file; the package itself never imports it (test below)
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ucluster_jax import checkpoint
from ucluster_jax.config import ConfigError, load_config
from ucluster_jax.data.prepare import prepare
from ucluster_jax.data.reader import ParquetDataset
from ucluster_jax.data.toy import toy_hls4ml, write_hls4ml_h5, write_toy
from ucluster_jax.errors import CheckpointError, DataError, UserError
from ucluster_jax.parallel.runtime import Mpi, Runtime
from ucluster_jax.train.loop import resume_state, train
from ucluster_jax.train.state import create_state

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A very small model: every train() here compiles a step, and the CI machine has two shared cores.
TINY = ["model.num_points=10", "model.k=3", "model.conv1_widths=[8,8]", "model.conv2_widths=[8,8]",
        "model.head_widths=[8,8]", "model.gap1_width=4", "model.gap2_width=8", "train.batch_size=32",
        "train.epochs=1", "train.pretrain_epochs=1", "train.kmeans_restarts=1", "train.kmeans_iters=5"]


def tiny(*more: str):
    return load_config(None, TINY + list(more))


@pytest.fixture(scope="module")
def toy10(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rel") / "toy10"
    write_toy(d, 192, 3, num_points=10, row_group_size=32)
    return d


def files_under(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file()] if d.exists() else []


# -- 2. checkpoints: checksum, config, fallback, incompatible resumes ---------------------------------
def test_checkpoint_checksum_config_and_fallback(tmp_path, capsys):
    cfg = tiny()
    state = jax.device_get(create_state(cfg))
    meta = {"epoch": 0, "config": cfg.to_dict(), "world": 1}
    p1 = checkpoint.save(tmp_path, state, step=6, meta=meta)
    p2 = checkpoint.save(tmp_path, state.replace(step=np.int32(12)), step=12, meta={**meta, "epoch": 1})
    side = json.loads(p2.with_suffix(".json").read_text())
    assert side["sha256"] == hashlib.sha256(p2.read_bytes()).hexdigest()
    assert side["config"] == json.loads(json.dumps(cfg.to_dict())) and side["epoch"] == 1
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # atomic writes leave no temporaries

    good = p2.read_bytes()
    for damage in (good[: len(good) // 2],  # truncated
                   good[:100] + bytes([good[100] ^ 0xFF]) + good[101:]):  # one flipped byte, same size
        p2.write_bytes(damage)
        restored, m = checkpoint.load_latest(tmp_path, state)
        assert m["step"] == 6 and int(restored.step) == 0
        err = capsys.readouterr().err
        assert str(p2) in err and "checksum mismatch" in err and "previous checkpoint" in err
    p2.write_bytes(good)
    p2.with_suffix(".json").unlink()  # a checkpoint without its sidecar is not trusted either
    assert checkpoint.load_latest(tmp_path, state)[1]["step"] == 6
    assert "missing or unreadable checkpoint metadata" in capsys.readouterr().err
    p1.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        checkpoint.load_latest(tmp_path, state)
    # newest by step number, not by listing order or mtime
    for s in (3, 100, 20):
        checkpoint.save(tmp_path / "order", state, step=s, meta=meta, keep=0)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "order")] == \
        [f"ckpt-{s:010d}.msgpack" for s in (3, 20, 100)]
    assert checkpoint.load_latest(tmp_path / "order", state)[1]["step"] == 100


def test_resume_drops_records_logged_after_its_checkpoint(tmp_path, toy10):
    """A run killed at step 11 of 12 has logged test points at steps 8 and 10 but has its newest
    checkpoint at step 9 (every 3 steps); the resumed run logs step 10 again. Its metrics.jsonl and
    curve.jsonl must read as the uninterrupted run's, each point once."""
    more = ("train.epochs=2", "train.eval_every_samples=64", "train.checkpoint_every_steps=3",
            "train.keep_checkpoints=100")
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    train(tiny(*more), toy10, ref, test_data=toy10, engine="single")  # 6 steps per epoch; joint epoch 1
    records = {f: (ref / f).read_text().splitlines() for f in ("metrics.jsonl", "curve.jsonl")}
    # points every 2 steps of joint epoch 1 (steps 7-12); 12: its end
    assert [json.loads(r)["step"] for r in records["curve.jsonl"]] == [8, 10, 12]
    # what the killed run left behind: checkpoints up to step 9, points up to step 10, no epoch-1 record
    for ck in checkpoint.list_checkpoints(ref)[:3]:
        for f in (ck, ck.with_suffix(".json")):
            (killed / "checkpoints").mkdir(parents=True, exist_ok=True)
            (killed / "checkpoints" / f.name).write_bytes(f.read_bytes())
    assert checkpoint.list_checkpoints(killed)[-1].name == "ckpt-0000000009.msgpack"
    (killed / "metrics.jsonl").write_text(records["metrics.jsonl"][0] + "\n")
    (killed / "curve.jsonl").write_text("\n".join(records["curve.jsonl"][:2]) + "\n")
    rec = train(tiny(*more), toy10, killed, test_data=toy10, resume=True, engine="single")
    assert rec["resumed_at_step"] == 3
    for f, lines in records.items():
        got = [json.loads(r) for r in (killed / f).read_text().splitlines()]
        want = [json.loads(r) for r in lines]
        assert [r["step"] for r in got] == [r["step"] for r in want], f
        assert [r.get("test_acc") for r in got] == [r.get("test_acc") for r in want], f  # a bitwise resume


def test_resume_with_incompatible_config_is_a_clear_error(tmp_path, toy10):
    cfg = tiny()
    meta = {"epoch": 0, "config": cfg.to_dict(), "world": 1}
    checkpoint.save(tmp_path, jax.device_get(create_state(cfg)), step=6, meta=meta)
    other = tiny("model.latent_dim=4")
    with pytest.raises(CheckpointError, match=r"different model configuration: latent_dim 3 \(config: 4\)") as e:
        train(other, toy10, tmp_path, resume=True, engine="single")
    assert "ckpt-0000000006.msgpack" in str(e.value)
    # only the model must match: a stored train value that today's rules refuse (an older version's run)
    # does not make the checkpoint unreadable
    old = tmp_path / "old"
    checkpoint.save(old, jax.device_get(create_state(cfg)), step=6,
                    meta={**meta, "config": {**meta["config"], "train": {**meta["config"]["train"],
                                                                         "select_from_epoch": 99}}})
    with pytest.raises(ConfigError, match="train.select_from_epoch"):  # refused today
        load_config(None, TINY + ["train.select_from_epoch=99"])
    _, epoch, step = resume_state(Runtime(Mpi(), rank=0, world=1, comm=None), cfg, old,
                                   jax.device_get(create_state(cfg)))
    assert (epoch, step) == (1, 0)  # after epoch 0
    # a world size that the data lanes (and the global batch) cannot be split over: refused before
    # anything is loaded or written
    rt3 = Runtime(Mpi(), rank=0, world=3, comm=None)
    with pytest.raises(UserError, match="train.data_lanes=8 is not a multiple of the 3 processes"):
        train(cfg, toy10, tmp_path / "w3", resume=True, rt=rt3)
    assert not (tmp_path / "w3").exists()
    # nothing to resume from
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(cfg, toy10, tmp_path / "empty", resume=True, engine="single")


# -- 3. non-finite gradients --------------------------------------------------------------------------
def test_nonfinite_gradients_stop_naming_step_and_checkpoint_or_are_skipped(tmp_path, toy10):
    """A learning rate of 1e30 makes the first update finite but huge (|w| ~ 1e30); the next forward
    pass overflows, so the loss and gradients of step 7 (the 2nd of epoch 1) are non-finite."""
    run = tmp_path / "run"
    train(tiny(), toy10, run, engine="single")  # epoch 0: 6 healthy steps, ckpt-0000000006
    last = checkpoint.list_checkpoints(run)[-1]
    with pytest.raises(UserError, match=r"non-finite loss or gradients at step 7 \(5 update\(s\) skipped\); "
                                        r"stopped\. Last good checkpoint: .*ckpt-0000000006\.msgpack"):
        train(tiny("train.epochs=2", "train.learning_rate=1e30"), toy10, run, resume=True, engine="single")
    assert checkpoint.list_checkpoints(run) == [last]  # nothing written after the failure
    rec = train(tiny("train.epochs=2", "train.learning_rate=1e30", "train.nonfinite=skip"), toy10, run,
                resume=True, engine="single")
    assert rec["nonfinite_skipped"] == 5 and rec["epoch"] == 1
    restored, meta = checkpoint.load_latest(run, jax.device_get(create_state(tiny())))
    assert meta["step"] == 7 and int(restored.nonfinite_steps) == 5
    flat = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(restored.params)])
    assert np.isfinite(flat).all()  # skipped updates never reach the parameters


# -- 6. loading never runs code ------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (str(self.marker), "w"))


def test_several_cpu_devices_wait_for_each_step(toy10, monkeypatch):
    """With the host running ahead, XLA's CPU client deadlocked 2 runs in 40 under load (CI: SIGABRT
    after 40 s; scripts/stress_local_devices.py, docs/RELIABILITY.md): the loop waits for every step."""
    from ucluster_jax.parallel.runtime import setup
    from ucluster_jax.train.loop import run_epoch

    waits = []
    wait = jax.block_until_ready
    monkeypatch.setattr(jax, "block_until_ready", lambda x: waits.append(x) or wait(x))
    cfg = tiny("train.shuffle=false")
    rt = setup("local", num_devices=2)
    _, rec = run_epoch(rt, cfg, rt.make_step(cfg), rt.put_state(create_state(cfg)), ParquetDataset(toy10), 0)
    assert rt.settle_each_step and rec["steps"] == 192 // 32
    assert sum(isinstance(w, dict) and "loss" in w for w in waits) == rec["steps"]  # each step's metric sums
    assert not setup("single").settle_each_step


def test_package_source_has_no_code_running_loaders():
    banned = re.compile(r"\bimport pickle\b|\bpickle\.|allow_pickle\s*=\s*True|\byaml\.(unsafe_)?load\(|"
                        r"\byaml\.full_load|Loader\s*=|\bmarshal\.|\bshelve\b|\bdill\b|\bcloudpickle\b|"
                        r"\beval\(|\bexec\(|shell\s*=\s*True|os\.system\(|os\.popen\(|expandvars\(")
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in sorted((REPO / "ucluster_jax").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if banned.search(line)]
    assert not hits, hits
    assert "yaml.safe_load" in (REPO / "ucluster_jax/config.py").read_text()


@pytest.mark.parametrize("form", ["pickle", "numpy object array"])
def test_pickle_checkpoint_with_forged_checksum_is_refused(tmp_path, form):
    cfg = tiny()
    marker = tmp_path / "PWNED"
    if form == "pickle":
        blob = pickle.dumps({"params": _Payload(marker)})
    else:  # an object array in .npy is a pickle too
        buf = io.BytesIO()
        np.save(buf, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
        blob = buf.getvalue()
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "ckpt-0000000006.msgpack").write_bytes(blob)
    (folder / "ckpt-0000000006.json").write_text(json.dumps(
        {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob), "step": 6, "epoch": 0,
         "config": cfg.to_dict(), "world": 1}))
    with pytest.raises(CheckpointError, match="ckpt-0000000006.msgpack: does not match"):
        checkpoint.load_latest(tmp_path / "run", jax.device_get(create_state(cfg)))
    assert not marker.exists()


def test_yaml_config_with_python_tags_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    for tag in (f"!!python/object/apply:os.system ['touch {marker}']",
                f"!!python/object/new:subprocess.Popen [['touch', '{marker}']]"):
        p = tmp_path / "evil.yaml"
        p.write_text(f"train:\n  seed: {tag}\n")
        with pytest.raises(ConfigError, match=f"{p}: not valid YAML"):
            load_config(p)
        with pytest.raises(ConfigError):
            load_config(None, [f"train.seed={tag}"])
    assert not marker.exists()


# -- 4. bad input through the CLI: one line naming the file, no traceback, nothing written ------------
def test_cli_train_bad_data_is_one_line_naming_the_file(tmp_path, toy10):
    bad = tmp_path / "bad"
    bad.mkdir()
    good = pq.read_table(next(toy10.glob("*.parquet")))
    pq.write_table(good, bad / "part-00000.parquet", row_group_size=32)
    truncated = bad / "part-00001.parquet"
    truncated.write_bytes((bad / "part-00000.parquet").read_bytes()[:-200])
    marker = tmp_path / "PWNED"
    cases = [(bad, str(truncated), "not a readable parquet file"),
             (Path(f"$(touch {marker})"), f"$(touch {marker})", "no such dataset")]  # no shell expansion
    for data, name, what in cases:
        out = tmp_path / "run"
        r = subprocess.run([str(BIN / "ucluster"), "train", "--config", str(REPO / "configs/demo.yaml"),
                            "--data", str(data), "--out", str(out), "--set", "model.num_points=10",
                            "--set", "model.k=3"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith("ucluster train: error: ") and name in lines[0] and what in lines[0]
        assert "Traceback" not in r.stderr + r.stdout
        assert not out.exists()
    assert not marker.exists()


# -- 4. fuzzing: the parquet reader and the HDF5 converters fail only with DataError -------------------
@pytest.fixture(scope="module")
def parquet_bytes(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("fuzzsrc") / "ds"
    write_toy(d, 48, 5, num_points=4, row_group_size=16)
    return next(d.glob("*.parquet")).read_bytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_damaged_parquet_is_read_or_named_dataerror(tmp_path_factory, parquet_bytes, data):
    """Truncation, flipped bytes or overwritten spans anywhere in a shard: the reader either returns
    finite, in-range jets of the declared shape or raises DataError naming the file, nothing else."""
    raw = bytearray(parquet_bytes)
    kind = data.draw(st.sampled_from(["truncate", "flip", "span"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            raw[i] ^= data.draw(st.integers(1, 255))
    else:
        start = data.draw(st.integers(0, len(raw) - 1))
        fill = data.draw(st.binary(min_size=1, max_size=64))
        raw[start:start + len(fill)] = fill
    d = tmp_path_factory.mktemp("fuzz")
    f = d / "part-00000.parquet"
    f.write_bytes(bytes(raw))
    try:
        ds = ParquetDataset(d)
        got = ds.read_all()
    except DataError as e:
        assert str(f) in str(e) or str(d) in str(e)
        return
    m = ds.meta
    assert got["x"].shape[1:] == (m.num_points, m.num_features) and np.isfinite(got["x"]).all()
    assert ((got["target"] >= 0) & (got["target"] < m.num_targets)).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(["hls4ml", "prepared"]),
    n=st.integers(0, 12),
    points=st.integers(1, 6),
    drop_key=st.one_of(st.none(), st.integers(0, 3)),
    bad_shape=st.booleans(),
    poison=st.sampled_from([None, np.nan, np.inf, -np.inf, 1e39]),
    poison_at=st.integers(0, 10_000),
)
def test_property_converters_fail_only_with_named_dataerror(tmp_path_factory, fmt, n, points, drop_key,
                                                             bad_shape, poison, poison_at):
    """Arbitrary damage to an HDF5 input (a missing key, a wrong axis size, NaN/inf/overflow values,
    no jets): prepare either writes a complete, finite dataset or raises DataError naming the input,
    and then leaves no file behind."""
    d = tmp_path_factory.mktemp("conv")
    path, out = d / "in.h5", d / "out"
    rng = np.random.default_rng(poison_at)
    if fmt == "hls4ml":
        a = toy_hls4ml(max(n, 1), 0, num_points=points)
        arrays = {"const": a["const"][:n].astype(np.float64), "jets": a["jets"][:n].astype(np.float64)}
        if bad_shape:
            arrays["const"] = arrays["const"][..., :-1]
        target = arrays["const"]
        keys = ("jetConstituentList", "jets", "particleFeatureNames", "jetFeatureNames")
    else:
        arrays = {"data": rng.normal(size=(n, points, 8 if not bad_shape else 7)),
                  "pid": rng.integers(0, 20, n).astype(np.float64), "label": np.eye(3)[rng.integers(0, 3, n)],
                  "masses": rng.uniform(20, 190, n)}
        target = arrays["data"]
        keys = tuple(arrays)
    if poison is not None and target.size:
        target.reshape(-1)[poison_at % target.size] = poison
    if fmt == "hls4ml":
        write_hls4ml_h5(path, arrays=arrays)
    else:
        with h5py.File(path, "w") as f:
            for k, v in arrays.items():
                f[k] = v
    if drop_key is not None:
        with h5py.File(path, "a") as f:
            del f[keys[drop_key]]
    try:
        prepare([path], out, row_group_size=4, log=lambda s: None)
    except DataError as e:
        assert str(path) in str(e)
        assert not files_under(out)
        return
    got = ParquetDataset(out).read_all()
    assert 0 < len(got["x"]) <= n and np.isfinite(got["x"]).all() and got["x"].shape[1] == points


# -- 5. memory stays flat over epochs ------------------------------------------------------------------
MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from ucluster_jax.config import load_config
    from ucluster_jax.train import loop

    def rss_mb():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    samples = []
    orig = loop.Logger.epoch
    def epoch(self, rec):
        orig(self, rec)
        samples.append(rss_mb())
    loop.Logger.epoch = epoch
    data, out, *ov = sys.argv[1:]
    loop.train(load_config(None, ov), Path(data), Path(out), engine="single")
    print("RSS " + json.dumps(samples))
""")


def test_memory_flat_over_epochs(tmp_path):
    """Ten short epochs (each re-reads the whole dataset, k-means at epoch 2, a checkpoint every epoch):
    the resident size after warm-up must not grow with the epochs."""
    data = tmp_path / "data"
    write_toy(data, 640, 7, num_points=10, row_group_size=32)  # 20 row groups, streamed 4 at a time
    ov = [o for o in TINY if not o.startswith(("train.epochs", "train.pretrain"))] + \
        ["train.epochs=10", "train.pretrain_epochs=2", "train.batch_size=64", "train.shuffle=true"]
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(data), str(tmp_path / "run"), *ov],
                       capture_output=True, text=True, timeout=240,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    rss = json.loads(r.stdout.rsplit("RSS ", 1)[1])
    assert len(rss) == 10
    growth = max(rss[4:]) - rss[3]  # after warm-up (compiles, k-means) at epoch 3
    assert growth < 12, f"RSS per epoch (MB): {[round(v, 1) for v in rss]}"
