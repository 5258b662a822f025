"""`ucluster prepare` on the externally written Pythia sample, toy hls4ml files and original-format files."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import shared_file
from ucluster_jax.cli import main as cli_main
from ucluster_jax.data.features import MASS_EDGES
from ucluster_jax.data.prepare import parse_split, prepare
from ucluster_jax.data.reader import ParquetDataset
from ucluster_jax.data.toy import JET_FEATURE_NAMES, toy_hls4ml, write_hls4ml_h5
from ucluster_jax.errors import DataError, UserError

SAMPLE = "samples/pythia_wztop_600.h5"  # in ../shared (conftest.shared_file)
JCOL = {n: i for i, n in enumerate(JET_FEATURE_NAMES)}


def names(f: h5py.File, key: str) -> list[str]:
    return [n.decode() for n in f[key][()]]


def no_files(d: Path) -> bool:
    return not d.exists() or not [p for p in d.rglob("*") if p.is_file()]


def test_prepare_shared_pythia_sample(tmp_path, capsys):
    sample = shared_file(SAMPLE)
    rc = cli_main(["prepare", str(sample), "--out", str(tmp_path / "out"), "--split", "train=0.8,test=0.2",
                   "--row-group-size", "100"])
    assert rc == 0
    report = capsys.readouterr().out
    with h5py.File(sample) as f:
        jets, const = f["jets"][()], f["jetConstituentList"][()]
        jn, pn = names(f, "jetFeatureNames"), [n[3:] for n in names(f, "particleFeatureNames")]
    mass = jets[:, jn.index("j_mass")]
    truth = jets[:, [jn.index("j_w"), jn.index("j_z"), jn.index("j_t")]]
    keep = (truth.sum(1) > 0) & (mass > 10) & (mass < 200)
    n_keep = int(keep.sum())
    counts = np.bincount(truth[keep].argmax(1), minlength=3)
    assert "read 600" in report and f"kept {n_keep}" in report and f"mass window {600 - n_keep}" in report
    assert f"W {counts[0]}, Z {counts[1]}, top {counts[2]}" in report
    train, test = (ParquetDataset(tmp_path / "out" / s).read_all() for s in ("train", "test"))
    assert len(train["x"]) == int(0.8 * n_keep) and len(train["x"]) + len(test["x"]) == n_keep
    got = {k: np.concatenate([train[k], test[k]]) for k in train}
    assert got["x"].shape == (n_keep, 100, 8) and got["x"].dtype == np.float32
    assert np.isfinite(got["x"]).all()
    np.testing.assert_array_equal(got["label"], truth[keep].argmax(1))  # original order, no shuffle
    np.testing.assert_allclose(got["mass"], mass[keep])
    # fixed bins, written out by hand: bin i holds [200 i / 19, 200 (i+1) / 19)
    np.testing.assert_array_equal(got["target"], np.minimum(np.floor(mass[keep] * 19 / 200), 19).astype(int))
    # features recomputed independently from the raw columns, looked up by name
    c = const[keep]
    pad = c[..., pn.index("e")] == 0
    with np.errstate(divide="ignore"):
        logpt = np.where(pad, 0, np.log(np.where(pad, 1, c[..., pn.index("pt")])))
    np.testing.assert_allclose(got["x"][..., 6], logpt, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got["x"][..., 0], c[..., pn.index("etarel")])
    np.testing.assert_array_equal(got["x"][..., 7], c[..., pn.index("costhetarel")])
    assert (got["x"][pad] == 0).all()


def toy_with_rejects(n: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Toy hls4ml jets plus jets that must be dropped, and the expected counts."""
    a = toy_hls4ml(n, seed)
    j, c = a["jets"], a["const"]
    j[:, JCOL["j_mass"]] = np.clip(j[:, JCOL["j_mass"]], 20, 190)
    j[0:6, JCOL["j_w"]: JCOL["j_t"] + 1] = 0
    j[0:4, JCOL["j_q"]] = 1  # quark jets
    j[4:6, JCOL["j_g"]] = 1  # gluon jets
    j[6:9, JCOL["j_mass"]] = [250.0, 200.0, 10.0]  # window is exclusive: all three dropped
    j[9, JCOL["j_mass"]] = 5.0
    c[10, 3, 8] = np.nan  # etarel feeds a feature -> dropped
    j[11, JCOL["j_mass"]] = np.nan
    c[12, 0, 0] = np.nan  # px feeds no feature -> kept
    c[13, 2, 8] = np.inf  # +-inf -> 0, kept
    c[0, 1, 8] = np.nan  # already dropped as not W/Z/top: counted once, under that reason
    return a, {"not_wzt": 6, "mass_window": 4, "nonfinite": 2}


def test_prepare_toy_hls4ml_selection_counts(tmp_path):
    a1, exp = toy_with_rejects(90, 1)
    f1 = write_hls4ml_h5(tmp_path / "a.h5", arrays=a1, compression="gzip")
    f2 = write_hls4ml_h5(tmp_path / "b.h5", 40, seed=2)
    lines: list[str] = []
    rep = prepare([f1, f2], tmp_path / "out", row_group_size=16, chunk=7, log=lines.append)
    r1, r2 = rep["files"]
    assert (r1.read, r1.not_wzt, r1.mass_window, r1.nonfinite) == (90, exp["not_wzt"], exp["mass_window"],
                                                                   exp["nonfinite"])
    assert r1.kept == 90 - sum(exp.values()) and (r2.read, r2.kept) == (40, 40)
    truth = a1["jets"][:, JCOL["j_w"]: JCOL["j_t"] + 1].argmax(1)
    kept_idx = np.r_[12:90]
    assert r1.per_class == np.bincount(truth[kept_idx], minlength=3).tolist()
    assert any(line.startswith("total: read 130, kept 118") for line in lines)
    ds = ParquetDataset(tmp_path / "out")
    assert ds.num_jets == 118 and len(ds.files) == 1 and ds.meta.num_points == 100
    got = ds.read_all()
    np.testing.assert_array_equal(got["label"][:78], truth[kept_idx])  # input order kept, file 1 first
    assert got["x"][1, 2, 0] == 0.0  # row 13: inf etarel -> 0
    assert np.isfinite(got["x"]).all()
    np.testing.assert_array_equal(got["target"], np.digitize(got["mass"], MASS_EDGES) - 1)


def test_prepare_split_is_ordered_and_atomic(tmp_path):
    f = write_hls4ml_h5(tmp_path / "a.h5", 50, seed=3)
    rep = prepare([f], tmp_path / "o", split=parse_split("train=0.7,val=0.1,test=0.2"), row_group_size=8,
                  log=lambda s: None)
    sizes = {Path(d).name: o["jets"] for d, o in rep["outputs"].items()}
    assert sizes == {"train": 35, "val": 5, "test": 10}
    m = np.concatenate([ParquetDataset(tmp_path / "o" / s).read_all()["mass"] for s in ("train", "val", "test")])
    with h5py.File(f) as h:
        np.testing.assert_allclose(m, h["jets"][:, JCOL["j_mass"]])
    with pytest.raises(UserError, match="already holds"):
        prepare([f], tmp_path / "o", split=parse_split("train=0.8,test=0.2"), log=lambda s: None)
    # a failure halfway through the second input leaves nothing behind
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as h:
        h["data"] = np.zeros((300, 100, 8), np.float32)
        h["pid"] = np.r_[np.ones(250), 25.0, np.ones(49)]
        h["label"] = np.eye(3)[np.arange(300) % 3]
        h["masses"] = np.full(300, 80.0)
    for split in (None, parse_split("train=0.5,test=0.5")):  # fails while writing / while counting
        with pytest.raises(DataError, match=r"bad.h5: pid\[250\] = 25.0"):
            prepare([f, bad], tmp_path / "new", split=split, row_group_size=8, chunk=64, log=lambda s: None)
        assert no_files(tmp_path / "new")
    for text in ("train=0.8", "train=0.5,train=0.5", "a=x,b=1", "train:0.8,test:0.2"):
        with pytest.raises(UserError):
            parse_split(text)


def test_prepare_original_prepared_format(tmp_path):
    n = 70
    rng = np.random.default_rng(0)
    data = rng.normal(size=(n, 100, 8)).astype(np.float32)
    data[5, 0, 0] = np.nan
    masses = rng.uniform(11, 199, n)
    pid = rng.integers(0, 19, n).astype(np.float64)  # per-file renumbered bins, kept as given
    onehot = np.eye(3)[rng.integers(0, 3, n)]
    onehot[7] = 0  # unknown truth -> label -1
    path = tmp_path / "train_multi_20v_100P.h5"
    with h5py.File(path, "w") as f:
        f["data"], f["pid"], f["label"], f["masses"] = data, pid, onehot, masses
        f["global"] = rng.normal(size=(n, 4))
    rep = prepare([path], tmp_path / "out", row_group_size=16, chunk=32, log=lambda s: None)
    r = rep["files"][0]
    assert (r.format, r.read, r.kept, r.nonfinite, r.unknown_label) == ("prepared", n, n - 1, 1, 1)
    got = ParquetDataset(tmp_path / "out").read_all()
    keep = np.arange(n) != 5
    np.testing.assert_array_equal(got["x"], data[keep])
    np.testing.assert_array_equal(got["target"], pid[keep])
    expect_label = np.where(onehot.sum(1) > 0, onehot.argmax(1), -1)
    np.testing.assert_array_equal(got["label"], expect_label[keep])
    prepare([path], tmp_path / "rebinned", mass_bins=True, log=lambda s: None)
    rebinned = ParquetDataset(tmp_path / "rebinned").read_all()
    np.testing.assert_array_equal(rebinned["target"], np.digitize(masses[keep], MASS_EDGES) - 1)


def test_prepare_rejects_bad_files(tmp_path):
    out = tmp_path / "out"

    def expect(path: Path, match: str) -> None:
        with pytest.raises(DataError, match=match) as e:
            prepare([path], out, log=lambda s: None)
        assert str(path) in str(e.value)
        assert no_files(out)

    p = tmp_path / "keys.h5"
    with h5py.File(p, "w") as f:
        f["jets"] = np.zeros((3, 59))
    expect(p, "unrecognised HDF5 layout")
    good = toy_hls4ml(6, 0)
    p = tmp_path / "shape.h5"
    write_hls4ml_h5(p, arrays={"const": good["const"][:, :, :15], "jets": good["jets"]})
    expect(p, "jetConstituentList has shape")
    p = tmp_path / "rows.h5"
    write_hls4ml_h5(p, arrays={"const": good["const"], "jets": good["jets"][:4]})
    expect(p, "jets has shape")
    p = tmp_path / "empty.h5"
    write_hls4ml_h5(p, arrays={"const": good["const"][:0], "jets": good["jets"][:0]})
    expect(p, "no jets")
    p = tmp_path / "names.h5"
    write_hls4ml_h5(p, arrays=good)
    with h5py.File(p, "r+") as f:
        del f["particleFeatureNames"]
        f["particleFeatureNames"] = np.array([b"j1_x%d" % i for i in range(16)])
    expect(p, r"particleFeatureNames lacks \['etarel'")
    p = tmp_path / "text.h5"
    p.write_text("hello")
    expect(p, "not a readable HDF5")
    p = tmp_path / "p50.h5"
    write_hls4ml_h5(p, 6, 0, num_points=50)
    p100 = write_hls4ml_h5(tmp_path / "p100.h5", 6, 0)
    with pytest.raises(DataError, match="same number of points"):
        prepare([p100, p], out, log=lambda s: None)
    allbad = good["jets"].copy()
    allbad[:, JCOL["j_mass"]] = 300
    p = tmp_path / "none.h5"
    write_hls4ml_h5(p, arrays={"const": good["const"], "jets": allbad})
    expect(p, "no jet passed")


def wz_cut_accuracy(m: np.ndarray, label: np.ndarray) -> float:
    """The best single W|Z mass cut's accuracy on the W and Z jets, fitted with the truth."""
    wz = label < 2
    return max(float(((m[wz] >= c) == (label[wz] == 1)).mean()) for c in np.arange(60, 110, 0.5))


def test_prepare_softdrop_mass_on_shared_sample(tmp_path):
    """`--mass softdrop`: the same jets and features, the groomed mass in `mass` and binned into the target,
    never above the jet mass, and a better W|Z separation than the jet mass on the generated jets."""
    sample = shared_file(SAMPLE)
    for kind in ("jet", "softdrop"):
        assert cli_main(["prepare", str(sample), "--out", str(tmp_path / kind), "--mass", kind]) == 0
    plain, sd = ParquetDataset(tmp_path / "jet"), ParquetDataset(tmp_path / "softdrop")
    assert (plain.meta.mass, sd.meta.mass) == ("jet", "softdrop")
    assert (plain.meta.mass_name, sd.meta.mass_name) == ("jet mass", "soft-drop mass")  # the plots' axis
    a, b = plain.read_all(), sd.read_all()
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert (b["mass"] <= a["mass"]).all() and (b["mass"] < a["mass"] - 1).mean() > 0.2  # grooming removes
    np.testing.assert_array_equal(b["target"], np.minimum(np.floor(b["mass"] * 19 / 200), 19).astype(int))
    assert wz_cut_accuracy(b["mass"], b["label"]) > wz_cut_accuracy(a["mass"], a["label"]) + 0.03


def test_prepare_massless_mass_on_shared_sample(tmp_path):
    """`--mass massless`: the same jets, the mass of the raw constituents' momenta taken massless (computed
    here from the file's own px, py, pz), never above the jet mass (which adds the hadrons' masses), and
    binned into the target."""
    sample = shared_file(SAMPLE)
    for kind in ("jet", "massless"):
        assert cli_main(["prepare", str(sample), "--out", str(tmp_path / kind), "--mass", kind]) == 0
    plain, ml = ParquetDataset(tmp_path / "jet"), ParquetDataset(tmp_path / "massless")
    assert (ml.meta.mass, ml.meta.mass_name) == ("massless", "massless jet mass")
    a, b = plain.read_all(), ml.read_all()
    np.testing.assert_array_equal(a["x"], b["x"])
    with h5py.File(sample, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["particleFeatureNames"][:]]
        c = f["jetConstituentList"][:].astype(np.float64)
        jet_names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["jetFeatureNames"][:]]
        jet_mass = f["jets"][:, jet_names.index("j_mass")].astype(np.float32)
    px, py, pz = (c[..., names.index(k)] for k in ("j1_px", "j1_py", "j1_pz"))
    p = np.sqrt(px ** 2 + py ** 2 + pz ** 2)
    ref = np.sqrt(np.maximum(p.sum(1) ** 2 - px.sum(1) ** 2 - py.sum(1) ** 2 - pz.sum(1) ** 2, 0))
    kept = []  # the selection is on the jet mass: the same jets, in file order
    for i, m in enumerate(jet_mass):
        if len(kept) < len(a["mass"]) and m == a["mass"][len(kept)]:
            kept.append(i)
    assert len(kept) == len(b["mass"])
    np.testing.assert_allclose(b["mass"], ref[kept], rtol=2e-3, atol=0.05)
    assert (b["mass"] <= a["mass"] + 1e-3).all() and 0.5 < np.mean(a["mass"] - b["mass"]) < 5
    np.testing.assert_array_equal(b["target"], np.minimum(np.floor(b["mass"] * 19 / 200), 19).astype(int))
