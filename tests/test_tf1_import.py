"""Importing the original UCluster TF1 checkpoint: complete mapping, exact values, TF-equal outputs, CLI.

Uses the shipped checkpoint (../shared/original_ucluster_ckpt/cluster.ckpt; the tests that need it
fail without it, see conftest.shared_file) and tests/data/tf1_reference.npz, the original TF graph
restored from that checkpoint and run in evaluation mode (scripts/tf1_reference.py).
"""
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import SHARED
from ucluster_jax import checkpoint, cli
from ucluster_jax.config import config_from_dict, load_config
from ucluster_jax.errors import CheckpointError
from ucluster_jax.model.gap import ConvBN
from ucluster_jax.model.knn import eta_phi_distance, knn_indices, pairwise_sq_dist
from ucluster_jax.model.networks import UCluster
from ucluster_jax.tf1_import import _leaves, _transform, build_table, convert, import_tf1, table_markdown
from ucluster_jax.train.state import create_state

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "wztop.yaml"
CKPT = SHARED / "original_ucluster_ckpt" / "cluster.ckpt"
REF = REPO / "tests" / "data" / "tf1_reference.npz"
needs_ckpt = pytest.mark.usefixtures("tf1_checkpoint")


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG)


@pytest.fixture(scope="module")
def tensors(tf1_checkpoint):
    from ucluster_jax.tf1.bundle import read_tf1_checkpoint

    return read_tf1_checkpoint(tf1_checkpoint)


@pytest.fixture(scope="module")
def imported(tensors, cfg):
    return convert(tensors, cfg)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(REF))


def test_table_is_one_to_one(cfg):
    table = build_table(cfg.model)
    names = [r.tf_name for r in table]
    targets = [t for r in table for t in r.targets]
    assert len(names) == len(set(names)) == 222
    assert len(targets) == len(set(targets))
    # every leaf of our state that a checkpoint can hold has exactly one rule
    ours = _leaves(jax.eval_shape(lambda: create_state(cfg)))
    assert set(targets) == set(ours)
    md = table_markdown(cfg.model)
    assert md.count("\n") == 222 + 1 and "`gapnet01/weights` | `params/gapnet01/dense/kernel`" in md
    assert md in (REPO / "docs" / "TF1_IMPORT.md").read_text(), "regenerate: python -m ucluster_jax.tf1_import"


@needs_ckpt
def test_shipped_checkpoint_maps_completely(tensors, imported, cfg, ref):
    state, rep = imported
    assert len(tensors) == 222
    assert rep.complete, rep.problems()
    assert len(rep.mapped) == 222 and not rep.unmapped and not rep.missing and not rep.no_rule and not rep.bad_shape
    assert rep.step == int(ref["step"]) == 118_200
    assert int(state.step) == int(state.opt_state.count) == 118_200
    assert int(state.samples_seen) == 118_200 * 512
    assert rep.epoch == 199 and float(state.alpha) == 900.0 and float(state.cluster_weight) == 10.0  # the 81 % run
    assert int(state.nonfinite_steps) == 0 and int(state.first_nonfinite_step) == -1
    powers = [n for n in rep.notes if n.startswith("beta")]
    assert len(powers) == 2 and all(n.endswith(": consistent") for n in powers), powers
    assert any("200 epochs x 591 steps" in n for n in rep.notes)


@needs_ckpt
def test_every_value_lands_where_the_table_says(tensors, imported, cfg):
    state, _ = imported
    leaves = _leaves(state)
    for rule in build_table(cfg.model):
        for target in rule.targets:
            got = np.asarray(leaves[target])
            want = _transform(np.asarray(tensors[rule.tf_name]), rule.op, got.shape)
            assert got.dtype == want.dtype and np.array_equal(got, want), (rule.tf_name, target)
    # the 1x1 conv kernel is the [1,1,Cin,Cout] tensor without its leading ones
    assert np.array_equal(state.params["gapnet01"]["dense"]["kernel"], tensors["gapnet01/weights"][0, 0])
    assert np.array_equal(state.opt_state.nu["gap2"]["bias"], tensors["BiasAdd_1/biases/Adam_1"])
    assert np.array_equal(state.batch_stats["gap1"]["edge_bn"]["var"],
                          tensors["layerfilter0_edgefea_0/bn/layerfilter0_edgefea_0/bn/moments/Squeeze_1/"
                                  "ExponentialMovingAverage"])


@needs_ckpt
def test_centroids_equal_the_logs_final_mu(imported):
    text = (CKPT.parent / "log_dkm.txt").read_text()
    last = re.findall(r"mu: (\[\[.*?\]\])", text, flags=re.S)[-1]
    logged = np.array([[float(v) for v in row.split()] for row in re.findall(r"\[([^\[\]]+)\]", last)])
    assert logged.shape == (3, 3)
    # numpy printed at most 8 decimals: the stored float32 is within half a unit of the last one
    np.testing.assert_allclose(np.asarray(imported[0].params["mu"]), logged, rtol=0, atol=5.01e-9)


@needs_ckpt
def test_written_run_round_trips_bit_for_bit(tensors, imported, cfg, tmp_path):
    state, _ = imported
    path, rep = import_tf1(CKPT, cfg, tmp_path / "run")
    assert path.name == "ckpt-0000118200.msgpack"
    assert config_from_dict(json.loads((tmp_path / "run" / "config.json").read_text())) == cfg
    loaded, meta = checkpoint.load_latest(tmp_path / "run", jax.device_get(state))
    assert meta["epoch"] == 199 and meta["step"] == 118_200 and config_from_dict(meta["config"]) == cfg
    a, b = jax.tree_util.tree_leaves_with_path(state), jax.tree_util.tree_leaves_with_path(loaded)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (p, x), (_, y) in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), jax.tree_util.keystr(p)
    # and against the checkpoint's own bytes
    assert np.array_equal(np.asarray(loaded.params["fc3"]["kernel"]), tensors["fc3/weights"])
    assert np.array_equal(np.asarray(loaded.opt_state.mu["mu"]), tensors["mu/Adam"])


@needs_ckpt
def test_imported_model_matches_the_tf1_graph(imported, cfg, ref):
    state, _ = imported
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    out, inter = UCluster(cfg.model).apply(variables, jnp.asarray(ref["x"]), train=False, capture_intermediates=True)
    out = {k: np.asarray(v) for k, v in out.items()}
    np.testing.assert_allclose(out["z"], ref["z"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["dist"], ref["dist"], rtol=1e-4, atol=1e-5)
    assert np.array_equal(np.argmin(out["dist"], axis=1), ref["cluster"])
    # Logits: the head amplifies z's float32 rounding (|d logit / d z| up to ~800, logits up to ~520),
    # so compare end to end at 1e-3 absolute (2e-6 of their scale) and the head itself, fed the TF
    # graph's own z, at the strict tolerance.
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-4, atol=1e-3)
    h = jnp.asarray(ref["z"])
    for name in ("fc1", "fc2"):
        width = state.params[name]["dense"]["kernel"].shape[1]
        h = ConvBN(width).apply({"params": state.params[name], "batch_stats": state.batch_stats[name]}, h,
                                train=False, decay=0.0)
    logits = nn.Dense(cfg.model.num_targets).apply({"params": state.params["fc3"]}, h)
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], rtol=1e-4, atol=1e-5)
    # the graphs pick the same neighbours, and the per-point latent agrees before pooling
    sel = ref["knn_jets"]
    knn1 = np.asarray(knn_indices(eta_phi_distance(jnp.asarray(ref["x"]), cfg.model.padding_penalty), cfg.model.k))
    assert np.array_equal(knn1[sel], ref["knn1"])
    net02 = inter["intermediates"]["gapnet02"]["__call__"][0]
    assert np.array_equal(np.asarray(knn_indices(pairwise_sq_dist(net02), cfg.model.k))[sel], ref["knn2"])
    agg = np.asarray(inter["intermediates"]["agg"]["__call__"][0])[sel]
    np.testing.assert_allclose(agg, ref["agg_points"], rtol=1e-4, atol=1e-5)


def _tampered(tensors, drop=(), reshape=None, extra=None):
    t = {k: v for k, v in tensors.items() if k not in drop}
    if reshape:
        name, shape = reshape
        t[name] = np.zeros(shape, t[name].dtype)
    if extra:
        t[extra] = np.zeros(2, np.float32)
    return t


@needs_ckpt
@pytest.mark.parametrize("kind", ["drop", "reshape", "extra"])
def test_partial_import_is_refused_naming_the_variable(tensors, cfg, kind):
    args, names = {
        "drop": (dict(drop=["layerfilter1_edgefea_0/biases"]),
                 ["layerfilter1_edgefea_0/biases", "params/gap2/edge_bias"]),
        "reshape": (dict(reshape=("fc3/weights", (128, 21))), ["fc3/weights", "params/fc3/kernel", "[128, 21]"]),
        "extra": (dict(extra="gapnet13/weights"), ["gapnet13/weights", "unmapped"]),
    }[kind]
    with pytest.raises(CheckpointError, match="refusing a partial import") as e:
        convert(_tampered(tensors, **args), cfg)
    for n in names:
        assert n in str(e.value)


@needs_ckpt
def test_allow_partial_keeps_initial_values(tensors, cfg):
    t = _tampered(tensors, drop=["layerfilter1_edgefea_0/weights", "layerfilter1_edgefea_0/weights/Adam"],
                  extra="gapnet13/weights")
    state, rep = convert(t, cfg, allow_partial=True, epoch=5)
    assert not rep.complete and rep.unmapped == ["gapnet13/weights"] and len(rep.mapped) == 220
    assert rep.missing == ["params/gap2/edge_kernel (from layerfilter1_edgefea_0/weights)",
                           "opt_state/mu/gap2/edge_kernel (from layerfilter1_edgefea_0/weights/Adam)"]
    assert any(n.startswith("PARTIAL import") for n in rep.notes)
    fresh = create_state(cfg)
    assert np.array_equal(state.params["gap2"]["edge_kernel"], fresh.params["gap2"]["edge_kernel"])
    assert not np.any(state.opt_state.mu["gap2"]["edge_kernel"])
    assert np.array_equal(state.opt_state.nu["gap2"]["edge_kernel"],
                          tensors["layerfilter1_edgefea_0/weights/Adam_1"][0, 0])
    assert float(state.cluster_weight) == 0.0 and float(state.alpha) == 0.0  # epoch 5: pre-training phase


@needs_ckpt
def test_cli_import_then_evaluate(cfg, ref, tmp_path, capsys):
    from ucluster_jax.data.schema import DatasetMeta, write_shards

    n = len(ref["x"])
    data = tmp_path / "jets"
    write_shards(data, {"x": ref["x"], "target": np.zeros(n, np.int32), "label": ref["labels"].astype(np.int32),
                        "mass": np.zeros(n, np.float32)}, DatasetMeta())
    run = tmp_path / "run"
    assert cli.main(["import-tf1", str(CKPT), "--config", str(CONFIG), "--out", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "222 checkpoint tensors mapped, 0 unmapped, 0 variables without a source, 0 shape disagreements" in printed
    assert "global step 118200, epoch 199" in printed
    # a second import into the same run is refused with a one-line error
    assert cli.main(["import-tf1", str(CKPT), "--config", str(CONFIG), "--out", str(run)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err

    assert cli.main(["evaluate", "--run", str(run), "--data", str(data), "--no-plots"]) == 0
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["n_jets"] == n and summary["checkpoint_step"] == 118_200 and summary["checkpoint_epoch"] == 199
    per_jet = pq.read_table(run / "eval" / "per_jet.parquet").to_pydict()
    assert np.array_equal(np.asarray(per_jet["cluster"]), ref["cluster"])
    dist = np.stack([per_jet[f"dist_{k}"] for k in range(3)], 1)
    np.testing.assert_allclose(dist, ref["dist"], rtol=1e-4, atol=1e-5)


@needs_ckpt
def test_train_resume_accepts_the_import(imported, cfg, tmp_path):
    from ucluster_jax.parallel.runtime import setup
    from ucluster_jax.train.loop import resume_state

    import_tf1(CKPT, cfg, tmp_path / "run", epoch=150)
    resumed, start, step = resume_state(setup("single"), cfg, tmp_path / "run", jax.device_get(imported[0]))
    assert (start, step) == (151, 0) and int(resumed.step) == 118_200 and float(resumed.alpha) == 5 * (150 - 21 + 2)


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    code = cli.main(["import-tf1", str(tmp_path / "nope.ckpt"), "--config", str(CONFIG), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nope.ckpt" in err
