"""Shared features, mass bins and the built-in toy generator."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import shared_file
from ucluster_jax.cli import main as cli_main
from ucluster_jax.data.features import (
    FEATURE_NAMES, HLS4ML_PARTICLE_NAMES, constituents_to_hls4ml, hls4ml_particle_features, mass_bin,
)
from ucluster_jax.data.prepare import prepare
from ucluster_jax.data.reader import ParquetDataset
from ucluster_jax.data.toy import toy_hls4ml, toy_jets, write_hls4ml_h5, write_toy

SAMPLE = "samples/pythia_wztop_600.h5"  # in ../shared (conftest.shared_file)


def test_features_by_name_logs_and_infinities():
    names = [b"j1_" + n.encode() for n in ("pt", "e", "costhetarel", "etarel", "erel", "deltaR", "ptrel",
                                           "phirel", "px")]  # shuffled order, bytes, extra column
    c = np.zeros((2, 3, len(names)), np.float32)
    col = {n.decode()[3:]: i for i, n in enumerate(names)}
    c[0, 0] = [100, 200, 0.01, 0.1, 0.2, 0.3, 0.1, -0.2, 5]
    c[0, 1, col["etarel"]] = np.inf
    c[0, 1, col["pt"]] = np.inf
    c[1, 0, col["ptrel"]] = np.nan
    x = hls4ml_particle_features(c, names)
    assert x.shape == (2, 3, 8) and x.dtype == np.float32 and len(FEATURE_NAMES) == 8
    np.testing.assert_allclose(x[0, 0], [0.1, -0.2, np.log(0.1), 0.3, np.log(200), np.log(0.2), np.log(100), 0.01],
                               rtol=1e-6)
    assert (x[0, 2] == 0).all()  # padded row: log(0) -> 0
    assert x[0, 1, 0] == 0 and x[0, 1, 6] == 0  # +inf (also log(+inf)) -> 0
    assert np.isnan(x[1, 0, 2])  # NaN kept: prepare drops the jet
    with pytest.raises(ValueError, match="costhetarel"):
        hls4ml_particle_features(c[..., :2], names[:2])


def test_mass_bins_fixed_edges():
    m = np.array([-1, 0, 10.5, 10.6, 80.4, 91.2, 172.5, 199.99, 200, 250, 1e5, np.inf])
    np.testing.assert_array_equal(mass_bin(m), [0, 0, 0, 1, 7, 8, 16, 18, 19, 19, 19, 19])
    assert mass_bin(m).dtype == np.int32


def test_hls4ml_columns_match_external_generator():
    """Our definitions of the relative columns agree with the independently written sample."""
    with h5py.File(shared_file(SAMPLE)) as f:
        c = f["jetConstituentList"][:100]
        names = [n.decode() for n in f["particleFeatureNames"][()]]
    assert tuple(names) == HLS4ML_PARTICLE_NAMES
    const, _ = constituents_to_hls4ml(c[..., 0], c[..., 1], c[..., 2], c[..., 3])
    for name in ("pt", "eta", "phi", "etarel", "phirel", "deltaR", "costhetarel", "ptrel", "erel"):
        k = names.index("j1_" + name)
        np.testing.assert_allclose(const[..., k], c[..., k], atol=1e-2, err_msg=name)  # sample: all constituents


def test_toy_reproducible_balanced_and_physical():
    a = toy_jets(6000, seed=4)
    b, c = toy_jets(600, seed=4), toy_jets(600, seed=4)
    assert all(np.array_equal(b[k], c[k]) for k in b)
    assert not np.array_equal(toy_jets(600, seed=5)["label"], b["label"])
    assert a["x"].shape == (6000, 100, 8) and a["x"].dtype == np.float32 and np.isfinite(a["x"]).all()
    assert np.bincount(a["label"]).tolist() == [2000, 2000, 2000]
    assert len(set(a["label"][:30].tolist())) == 3 and not (np.diff(a["label"][:30]) == 1).all()  # shuffled
    np.testing.assert_array_equal(a["target"], mass_bin(a["mass"]))
    med = [np.median(a["mass"][a["label"] == k]) for k in range(3)]
    assert 78 < med[0] < 92 and 88 < med[1] < 102 and 165 < med[2] < 185 and med[1] - med[0] > 6
    iqr_w = np.subtract(*np.percentile(a["mass"][a["label"] == 0], [75, 25]))
    assert 5 < iqr_w < 25  # a smeared peak several GeV wide
    mult = (a["x"][..., 4] != 0).sum(-1)  # log(e) is nonzero on real constituents
    mw, mt = mult[a["label"] == 0].mean(), mult[a["label"] == 2].mean()
    assert 25 < mw < 55 and mt > mw + 8
    # W/Z separable but not trivially (by mass alone); top clearly apart
    wz = a["label"] < 2
    acc = ((a["mass"][wz] > (med[0] + med[1]) / 2) == (a["label"][wz] == 1)).mean()
    assert 0.6 < acc < 0.95
    assert ((a["mass"] > 130) == (a["label"] == 2)).mean() > 0.9
    # padded rows are exactly zero, real ones have finite log(pt) above the 1 GeV threshold
    assert (a["x"][mult < 100][:, -1] == 0).all() and (a["x"][..., 6][a["x"][..., 4] != 0] > 0).all()


def test_write_toy_cli_and_roundtrip(tmp_path, capsys):
    assert cli_main(["toy", "--out", str(tmp_path / "t"), "--n", "500", "--seed", "2", "--row-group-size", "64",
                     "--shard-size", "200"]) == 0  # rounded up to 4 row groups: 2 shards
    assert "500 jets" in capsys.readouterr().out
    ds = ParquetDataset(tmp_path / "t", rank=0, world=2)
    assert ds.num_jets == 500 and len(ds.files) == 2 and ds.meta.num_points == 100
    whole = ParquetDataset(tmp_path / "t").read_all()
    ref = toy_jets(500, seed=2)
    for k in ref:
        np.testing.assert_array_equal(whole[k], ref[k])
    assert cli_main(["toy", "--out", str(tmp_path / "t"), "--n", "5"]) == 2  # refuses to overwrite
    assert cli_main(["toy", "--out", str(tmp_path / "t"), "--n", "5", "--overwrite"]) == 0
    assert ParquetDataset(tmp_path / "t").num_jets == 5
    files = write_toy(tmp_path / "small", 40, 1, num_points=30, row_group_size=16)
    assert len(files) == 1 and ParquetDataset(tmp_path / "small").read_all()["x"].shape == (40, 30, 8)


def test_toy_through_hls4ml_file_and_prepare_matches(tmp_path):
    """The toy in hls4ml layout, converted by prepare, gives the toy's own model inputs (same code path)."""
    h = toy_hls4ml(300, seed=7)
    assert h["const"].shape == (300, 100, 16) and h["jets"].shape == (300, 59)
    path = write_hls4ml_h5(tmp_path / "toy.h5", 300, seed=7)
    rep = prepare([path], tmp_path / "out", row_group_size=64, log=lambda s: None)
    r = rep["files"][0]
    keep = (h["jets"][:, 3] > 10) & (h["jets"][:, 3] < 200)
    assert (r.read, r.kept, r.mass_window, r.not_wzt) == (300, keep.sum(), (~keep).sum(), 0)
    got = ParquetDataset(tmp_path / "out").read_all()
    ref = toy_jets(300, seed=7)
    for k in ("x", "label", "target"):
        np.testing.assert_array_equal(got[k], ref[k][keep])
    np.testing.assert_allclose(hls4ml_particle_features(h["const"], HLS4ML_PARTICLE_NAMES), ref["x"])
