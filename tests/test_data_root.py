"""`ucluster prepare` on ROOT files written with uproot: the JetClass layout through prepare, train and
evaluate, a YAML mapping of other branch names, and bad files that fail in one line."""
from __future__ import annotations

import json
from pathlib import Path

import awkward as ak
import numpy as np
import pytest

from conftest import REPO, TINY, tb_events
from rootfiles import jet_four_momentum, jetclass_branches, make_jets, write_rntuple, write_tree
from ucluster_jax.cli import main as cli_main
from ucluster_jax.data.features import mass_bin
from ucluster_jax.data.reader import ParquetDataset
from ucluster_jax.data.toy import write_hls4ml_h5


def masses(j: dict) -> np.ndarray:
    p4 = jet_four_momentum(j)
    return np.sqrt(np.maximum(p4[:, 3] ** 2 - (p4[:, :3] ** 2).sum(1), 0))


def no_files(d: Path) -> bool:
    return not d.exists() or not [p for p in d.rglob("*") if p.is_file()]


def test_jetclass_files_prepare_train_evaluate(tmp_path, capsys):
    """Two JetClass-layout files, read 100 jets at a time, give the W/Z/top task: QCD dropped, the
    features of the 30 hardest particles, the mass-bin target; a tiny training separates the classes
    and TensorBoard holds its latent."""
    jets = [make_jets(n, seed) for n, seed in ((450, 0), (350, 1))]
    files = [str(write_tree(tmp_path / f"jetclass_{i}.root", jetclass_branches(j))) for i, j in enumerate(jets)]
    data = tmp_path / "data"
    assert cli_main(["prepare", *files, "--out", str(data), "--split", "train=0.75,test=0.25", "--num-points", "30",
                     "--chunk", "100", "--ranks", "2", "--row-group-size", "64"]) == 0
    report = capsys.readouterr().out
    cls = np.concatenate([j["cls"] for j in jets])
    mass = np.concatenate([masses(j) for j in jets])
    keep = (cls < 3) & (mass > 10) & (mass < 200)
    assert f"read 450, kept {keep[:450].sum()}; dropped: not W/Z/top {(cls[:450] == 3).sum()}" in report
    assert "total: read 800, kept %d" % keep.sum() in report
    train, test = ParquetDataset(data / "train"), ParquetDataset(data / "test")
    assert train.meta.class_names == ("W", "Z", "top") and train.meta.num_points == 30
    assert len(train.groups) % 2 == 0 and len({g.rows for g in train.groups[:-1]}) == 1  # sized for 2 ranks
    got = {k: np.concatenate([train.read_all()[k], test.read_all()[k]]) for k in ("x", "label", "mass", "target")}
    np.testing.assert_array_equal(got["label"], cls[keep])  # file order, file 0 first
    np.testing.assert_allclose(got["mass"], mass[keep], rtol=1e-4)
    np.testing.assert_array_equal(got["target"], mass_bin(got["mass"]))
    # log(pT) of the 30 hardest particles, zero-padded, recomputed from the generated particles
    pts = [p for j in jets for p in j["pt"]]
    want = np.zeros((len(pts), 30))
    for i, p in enumerate(pts):
        top = np.sort(p)[::-1][:30]
        want[i, :len(top)] = np.log(top)
    np.testing.assert_allclose(got["x"][..., 6], want[keep], atol=2e-5)

    run = tmp_path / "run"
    more = ["train.epochs=7", "train.pretrain_epochs=3", "train.eval_batch_size=512",
            "train.tensorboard_latent_every=2"]
    sets = [a for s in TINY + more for a in ("--set", s)]
    assert cli_main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--data", str(data / "train"),
                     "--test-data", str(data / "test"), "--out", str(run), *sets]) == 0
    assert cli_main(["evaluate", "--run", str(run), "--data", str(data / "test"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "columns: W Z top" in out
    s = json.loads((run / "eval" / "summary.json").read_text())
    assert s["n_jets"] == test.num_jets and s["accuracy_global"] > 0.5  # one class of three: about 0.35
    images = tb_events(run, "image")["latent"]
    assert [step for step, _ in images] == [3, 5]  # every 2nd epoch once the centroids exist (epoch 3)
    img = images[0][1]
    assert img.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and img.height > 300 and img.width > 600


def test_jetclass_qcd_class_and_yaml_mapping(tmp_path, capsys):
    """--classes adds QCD to JetClass's W/Z/top; a YAML mapping reads other names (pt/eta/phi/E particles,
    the jet as their sum, int and bool labels) to the same features."""
    j = make_jets(300, 2)
    jc = write_tree(tmp_path / "jetclass.root", jetclass_branches(j))
    assert cli_main(["prepare", str(jc), "--out", str(tmp_path / "four"), "--classes", "W,Z,top,QCD"]) == 0
    four = ParquetDataset(tmp_path / "four")
    assert four.meta.class_names == ("W", "Z", "top", "QCD") and four.meta.num_points == 100
    keep = (masses(j) > 10) & (masses(j) < 200)
    np.testing.assert_array_equal(four.read_all()["label"], j["cls"][keep])
    h5 = write_hls4ml_h5(tmp_path / "wzt.h5", 20, seed=0)  # W/Z/top: cannot join a W/Z/top/QCD dataset
    assert cli_main(["prepare", str(jc), str(h5), "--out", str(tmp_path / "mixed"), "--classes", "W,Z,top,QCD"]) == 2
    assert "classes W/Z/top/QCD, " in capsys.readouterr().err and no_files(tmp_path / "mixed")

    pf = ak.zip({k: ak.Array(j[k]) for k in ("pt", "eta", "phi", "e")})
    write_tree(tmp_path / "other.root", {"pf": pf, "is_w": j["cls"] == 0, "is_z": (j["cls"] == 1).astype(np.int32),
                                         "is_top": (j["cls"] == 2).astype(np.int32)}, tree="Events")
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("tree: Events\nparticles: {pt: pf_pt, eta: pf_eta, phi: pf_phi, energy: pf_e}\n"
                       "classes: {W: is_w, Z: is_z, top: is_top}\nselect: [top, W]\n")
    capsys.readouterr()
    assert cli_main(["prepare", str(tmp_path / "other.root"), "--out", str(tmp_path / "mapped"),
                     "--root-mapping", str(mapping)]) == 0
    assert "dropped: not top/W %d" % ((j["cls"] == 1) | (j["cls"] == 3)).sum() in capsys.readouterr().out
    mapped = ParquetDataset(tmp_path / "mapped")
    assert mapped.meta.class_names == ("top", "W")
    got = mapped.read_all()
    sel = four.read_all()
    tw = np.isin(sel["label"], (0, 2))  # the same jets read through the JetClass layout
    np.testing.assert_array_equal(got["label"], np.where(sel["label"][tw] == 2, 0, 1))
    np.testing.assert_allclose(got["mass"], sel["mass"][tw], rtol=1e-4)
    np.testing.assert_allclose(got["x"], sel["x"][tw], rtol=1e-3, atol=1e-3)

    mapping.write_text("tree: Events\nparticles: {pt: pf_pt, eta: pf_eta, energy: pf_e}\nclasses: {W: is_w}\n")
    assert cli_main(["prepare", str(tmp_path / "other.root"), "--out", str(tmp_path / "x"),
                     "--root-mapping", str(mapping)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(mapping) in err and "particles: has pt, eta, energy" in err


def bad_branches(kind: str, b: dict, j: dict) -> dict:
    if kind == "missing":
        return {k: v for k, v in b.items() if k != "label_Tbqq"}
    if kind == "jagged jet_pt":
        return {**b, "jet_pt": ak.values_astype(ak.Array(j["pt"]), np.float32)}
    part = ak.zip({f: b["part"][f] for f in b["part"].fields if f != "energy"})
    return {**b, "part": part, "part_energy": b["jet_energy"]}  # one number per jet, not per particle


@pytest.mark.parametrize("kind, names", [
    ("missing", "lacks branch(es) label_Tbqq"),
    ("jagged jet_pt", "branch jet_pt is var * float32, expected one number per jet"),
    ("flat part_energy", "branch part_energy is float32, expected jagged numbers, one per particle"),
    ("not ROOT", "not a ROOT file"),
    ("truncated", "read failed, truncated or corrupt?"),
])
def test_bad_root_file_fails_in_one_line_and_writes_nothing(tmp_path, capsys, kind, names):
    """After a good file, a bad one: exit 2, one line naming the file and the branch or problem, no output."""
    j = make_jets(200, 3)
    good = write_tree(tmp_path / "good.root", jetclass_branches(j))
    bad = tmp_path / "bad.root"
    if kind == "not ROOT":
        bad.write_text("jet,pt\n1,500\n")
    elif kind == "truncated":  # the header and first entries read, later baskets cut off
        bad.write_bytes(good.read_bytes()[:int(good.stat().st_size * 0.9)])
    else:
        write_tree(bad, bad_branches(kind, jetclass_branches(j), j))
    out = tmp_path / "out"
    assert cli_main(["prepare", str(good), str(bad), "--out", str(out), "--row-group-size", "16",
                     "--chunk", "50"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ucluster prepare: error: {bad}: ") and names in err, err
    assert no_files(out)


def test_rntuple_reads_like_the_ttree(tmp_path):
    b = jetclass_branches(make_jets(200, 4))
    got = []
    for write in (write_tree, write_rntuple):
        path = write(tmp_path / f"{write.__name__}.root", b)
        assert cli_main(["prepare", str(path), "--out", str(tmp_path / write.__name__), "--chunk", "64"]) == 0
        got.append(ParquetDataset(tmp_path / write.__name__).read_all())
    assert len(got[0]["label"]) > 100 and all(np.array_equal(got[0][k], got[1][k]) for k in got[0])
