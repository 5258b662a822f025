"""`ucluster generate`: Pythia 8 + FastJet jets in the hls4ml layout (SPEC section 1), and events
in the LHC Olympics R&D layout (qcd-dijet, resonance).

Tests that simulate need the optional extra (pythia8mc) and are skipped without it;
`make test` installs the extra so they run. Samples are tiny (tens of jets) to stay fast.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ucluster_jax.data import generate as gen
from ucluster_jax.errors import UserError


def _have_backends() -> bool:
    try:
        import pythia8mc  # noqa: F401
    except ImportError:
        return False
    return True


needs_pythia = pytest.mark.skipif(not _have_backends(),
                                  reason="needs the [generate] extra (pythia8mc)")

REPO = Path(__file__).resolve().parents[1]
COL = {n: i for i, n in enumerate(gen.JET_FEATURE_NAMES)}
PCOL = {n: i for i, n in enumerate(gen.PARTICLE_FEATURE_NAMES)}


def _read_dir(d: Path):
    files = sorted(Path(d).glob("shard-*.h5"))
    cs, js = [], []
    for f in files:
        c, j = gen.read_h5(f)
        cs.append(c)
        js.append(j)
    return files, np.concatenate(cs), np.concatenate(js)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """30 jets per W/Z/top class, seed 7, one chunk."""
    out = tmp_path_factory.mktemp("gen") / "wzt"
    res = gen.generate(out, jets=90, seed=7, progress=False)
    return out, res


# ------------------------------------------------------------------- no Pythia needed

def test_names_match_spec():
    names = gen.JET_FEATURE_NAMES
    assert len(names) == 59 and len(set(names)) == 59
    for i, n in {0: "j_ptfrac", 1: "j_pt", 2: "j_eta", 3: "j_mass", 12: "j_zlogz", 13: "j_c1_b0",
                 14: "j_c1_b1", 15: "j_c1_b2", 16: "j_c2_b1", 52: "j_multiplicity", 53: "j_g",
                 54: "j_q", 55: "j_w", 56: "j_z", 57: "j_t", 58: "j_undef"}.items():
        assert names[i] == n
    assert gen.PARTICLE_FEATURE_NAMES == tuple("j1_" + n for n in (
        "px", "py", "pz", "e", "erel", "pt", "ptrel", "eta", "etarel", "etarot", "phi", "phirel",
        "phirot", "deltaR", "costheta", "costhetarel"))


def test_constituent_features_by_hand():
    # three massless particles near eta=0.5, phi=pi (phi wraps around)
    pts = np.array([30.0, 100.0, 5.0])
    etas = np.array([0.52, 0.5, 0.3])
    phis = np.array([3.1, -3.1, 3.0])
    p4 = np.stack([pts * np.cos(phis), pts * np.sin(phis), pts * np.sinh(etas), pts * np.cosh(etas)], 1)
    feats, (jpt, jeta, jphi, jmass, mult) = gen.constituent_features(p4, max_constituents=5)
    assert feats.shape == (5, 16) and feats.dtype == np.float32
    assert mult == 3
    np.testing.assert_array_equal(feats[3:], 0.0)  # zero padding
    np.testing.assert_allclose(feats[:3, PCOL["j1_pt"]], [100, 30, 5], rtol=1e-6)  # sorted by pT
    s = p4.sum(0)
    assert jpt == pytest.approx(math.hypot(s[0], s[1]))
    assert jmass == pytest.approx(math.sqrt(s[3] ** 2 - (s[:3] ** 2).sum()))
    np.testing.assert_allclose(feats[:3, PCOL["j1_ptrel"]], np.array([100, 30, 5]) / jpt, rtol=1e-5)
    np.testing.assert_allclose(feats[:3, PCOL["j1_erel"]].sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(feats[:3, PCOL["j1_eta"]], [0.5, 0.52, 0.3], rtol=1e-5)
    phirel = feats[:3, PCOL["j1_phirel"]]
    assert np.all(np.abs(phirel) < 0.3)  # wrapped around +-pi
    np.testing.assert_allclose(feats[:3, PCOL["j1_deltaR"]],
                               np.hypot(feats[:3, PCOL["j1_etarel"]], phirel), rtol=1e-5)
    cos = feats[:3, PCOL["j1_costheta"]]
    np.testing.assert_allclose(cos, np.tanh([0.5, 0.52, 0.3]), rtol=1e-5)
    np.testing.assert_allclose(feats[:3, PCOL["j1_costhetarel"]], cos - s[2] / np.linalg.norm(s[:3]),
                               atol=1e-6)


def test_pythia_seeds_in_range_and_distinct():
    seeds = {gen.pythia_seed(s, r, c, p) for s in (0, 1, 2**40) for r in range(3) for c in range(3)
             for p in gen.PROCESS_ORDER}
    assert len(seeds) == 3 * 3 * 3 * len(gen.PROCESS_ORDER)
    assert gen.PROCESS_ORDER[:5] == ("w", "z", "top", "q", "g")  # new processes go after: old seeds stay
    assert all(1 <= s <= gen.PYTHIA_SEED_MAX for s in seeds)
    assert gen.pythia_seed(5, 1, 2, "w") == gen.pythia_seed(5, 1, 2, "w")


def test_chunk_plan_splits_evenly():
    job = gen.Job(out_dir=Path("."), seed=0, mode="jets", total=1001, world=2, config=gen.GenConfig(),
                  chunk_size=200)
    per_rank = [sum(sum(c.quotas.values()) for c in job.chunks(r)) for r in range(2)]
    assert per_rank == [501, 500]
    per_class = {p: sum(c.quotas[p] for r in range(2) for c in job.chunks(r)) for p in ("w", "z", "top")}
    assert sum(per_class.values()) == 1001 and max(per_class.values()) - min(per_class.values()) <= 1
    assert [sum(c.quotas.values()) for c in job.chunks(0)] == [200, 200, 101]


def test_missing_backends_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pythia8mc", None)  # makes `import pythia8mc` fail
    with pytest.raises(UserError, match=r"pip install 'ucluster-jax\[generate\]'"):
        gen.import_backends()


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown process"):
        gen.GenConfig(processes=("w", "higgs")).validate()
    with pytest.raises(UserError, match="pt-min"):
        gen.GenConfig(pt_min=900, pt_max=800).validate()
    with pytest.raises(UserError, match="exactly one"):
        gen.generate(tmp_path / "x", jets=10, events=10)
    assert gen.GenConfig().pthat_window() == (950.0, 1150.0)


# ------------------------------------------------------------------- simulation

@needs_pythia
def test_layout_matches_spec(sample):
    out, res = sample
    files = sorted(out.glob("*"))
    assert [f.name for f in files] == ["shard-0000-0000.h5"]  # nothing else (no temporary files)
    with h5py.File(files[0], "r") as f:
        assert set(f.keys()) == {"jetConstituentList", "jets", "jetFeatureNames", "particleFeatureNames"}
        assert f["jetConstituentList"].shape == (90, 100, 16)
        assert f["jets"].shape == (90, 59)
        assert f["jetConstituentList"].dtype == np.float32 and f["jets"].dtype == np.float32
        assert [n.decode() for n in f["jetFeatureNames"][:]] == list(gen.JET_FEATURE_NAMES)
        assert [n.decode() for n in f["particleFeatureNames"][:]] == list(gen.PARTICLE_FEATURE_NAMES)
    assert res.jets == 90 and res.events > 0 and res.files == files


@needs_pythia
def test_labels_kinematics_and_masses(sample):
    out, _ = sample
    _, c, j = _read_dir(out)
    onehot = j[:, [COL["j_g"], COL["j_q"], COL["j_w"], COL["j_z"], COL["j_t"], COL["j_undef"]]]
    np.testing.assert_array_equal(onehot.sum(1), 1.0)
    label = np.argmax(j[:, [COL["j_w"], COL["j_z"], COL["j_t"]]], axis=1)
    assert np.bincount(label, minlength=3).tolist() == [30, 30, 30]
    assert not np.any(onehot[:, [0, 1, 5]])
    pt, eta, mass, mult = (j[:, COL[k]] for k in ("j_pt", "j_eta", "j_mass", "j_multiplicity"))
    assert np.all((pt > 850) & (pt < 1250)) and np.all(np.abs(eta) < 2.5)
    # medians: a few jets in a small sample sit in the long tail (extra hard radiation in the cone)
    med = [float(np.median(mass[label == k])) for k in range(3)]
    assert 70 < med[0] < 100, med  # W, peak near 80 plus a few GeV of underlying event
    assert 80 < med[1] < 110, med  # Z
    assert 145 < med[2] < 200, med  # top
    assert np.mean((mass[label == 0] > 60) & (mass[label == 0] < 110)) > 0.6
    assert np.mean((mass[label == 2] > 120) & (mass[label == 2] < 220)) > 0.6
    nmean = [mult[label == k].mean() for k in range(3)]
    assert 20 < nmean[0] < 60 and 20 < nmean[1] < 65 and 40 < nmean[2] < 95, nmean
    assert nmean[2] > nmean[0]


@needs_pythia
def test_constituents_consistent_with_jets(sample):
    out, _ = sample
    _, c, j = _read_dir(out)
    pt = c[..., PCOL["j1_pt"]]
    n = (pt > 0).sum(1)
    mult = j[:, COL["j_multiplicity"]].astype(int)
    np.testing.assert_array_equal(n, np.minimum(mult, 100))
    for i in range(len(j)):
        assert np.all(np.diff(pt[i, : n[i]]) <= 0)  # sorted by pT
        assert np.all(pt[i, : n[i]] > 1.0)  # constituent threshold
        assert np.all(np.abs(c[i, : n[i], PCOL["j1_eta"]]) < 4.0)
        np.testing.assert_array_equal(c[i, n[i]:], 0.0)  # zero padding
        assert np.all(c[i, : n[i], PCOL["j1_deltaR"]] < 0.8 * 1.5)
    full = mult <= 100
    px, py = c[full, :, PCOL["j1_px"]].sum(1), c[full, :, PCOL["j1_py"]].sum(1)
    np.testing.assert_allclose(np.hypot(px, py), j[full, COL["j_pt"]], rtol=1e-4)
    np.testing.assert_allclose(c[full, :, PCOL["j1_ptrel"]].sum(1) >= 0.99, True)
    assert np.isfinite(c).all() and np.isfinite(j).all()


@needs_pythia
def test_same_seed_same_content_other_seed_differs(sample, tmp_path):
    out, _ = sample
    _, c0, j0 = _read_dir(out)
    gen.generate(tmp_path / "again", jets=90, seed=7, progress=False)
    f1, c1, j1 = _read_dir(tmp_path / "again")
    np.testing.assert_array_equal(c0, c1)
    np.testing.assert_array_equal(j0, j1)
    gen.generate(tmp_path / "other", jets=9, seed=8, progress=False)
    _, c2, _ = _read_dir(tmp_path / "other")
    assert not np.array_equal(c0[:9], c2)
    # rerunning into the same folder finds the chunk done and keeps it
    res = gen.generate(tmp_path / "again", jets=90, seed=7, progress=False)
    assert res.skipped_chunks == 1 and res.jets == 0
    with pytest.raises(UserError, match="different run"):
        gen.generate(tmp_path / "again", jets=90, seed=9, progress=False)


@needs_pythia
def test_workers_write_one_shard_each(tmp_path):
    res = gen.generate(tmp_path / "w2", jets=24, seed=3, workers=2, progress=False)
    files, c, j = _read_dir(tmp_path / "w2")
    assert [f.name for f in files] == ["shard-0000-0000.h5", "shard-0001-0000.h5"]
    assert res.jets == 24 and len(j) == 24
    a, b = (gen.read_h5(f)[0] for f in files)
    assert len(a) == len(b) == 12 and not np.array_equal(a, b)
    assert not list((tmp_path / "w2").glob(".*"))  # no temporary files left


@needs_pythia
def test_events_mode_and_extra_classes(tmp_path):
    cfg = gen.GenConfig(processes=("q", "g"))
    res = gen.generate(tmp_path / "qg", events=16, seed=1, config=cfg, progress=False)
    _, c, j = _read_dir(tmp_path / "qg")
    assert res.events == 16
    with h5py.File(res.files[0], "r") as f:
        import json
        stats = json.loads(f.attrs["ucluster_generate_stats"])
    assert stats["events"] == {"q": 8, "g": 8}
    assert len(j) == stats["jets"]["q"] + stats["jets"]["g"] and len(j) > 0
    assert np.all(j[:, COL["j_q"]] + j[:, COL["j_g"]] == 1)
    assert (j[:, COL["j_q"]].sum(), j[:, COL["j_g"]].sum()) == (stats["jets"]["q"], stats["jets"]["g"])


@needs_pythia
def test_merged_file_and_parquet(tmp_path):
    res = gen.generate(tmp_path / "one.h5", jets=12, seed=5, chunk_size=6, progress=False)
    assert res.files == [tmp_path / "one.h5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.h5"]  # parts folder removed
    c, j = gen.read_h5(tmp_path / "one.h5")
    assert c.shape == (12, 100, 16) and j.shape == (12, 59)

    import pyarrow.parquet as pq

    res = gen.generate(tmp_path / "pq", jets=12, seed=5, chunk_size=6, fmt="parquet", progress=False)
    assert res.files and all(p.suffix == ".parquet" for p in res.files)
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == [p.name for p in res.files]
    t = pq.read_table(tmp_path / "pq")
    keep = (j[:, COL["j_mass"]] > 10) & (j[:, COL["j_mass"]] < 200)  # the SPEC preparation cut
    assert t.num_rows == keep.sum()
    assert set(t.column("label").to_pylist()) <= {0, 1, 2}
    x = np.asarray(t.column("particles").to_pylist(), np.float32).reshape(t.num_rows, 100, 8)
    assert np.isfinite(x).all()
    np.testing.assert_allclose(np.sort(t.column("mass").to_numpy()), np.sort(j[keep, COL["j_mass"]]))


@needs_pythia
def test_sigterm_keeps_only_complete_files_and_rerun_finishes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ucluster_jax.cli", "generate", "--out", str(out), "--jets", "60",
           "--chunk", "6", "--seed", "11"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600  # only a guard against a hang: the wait is for the first file
        while not list(out.glob("shard-*.h5")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()
    assert b"interrupted" in err
    names = sorted(p.name for p in out.iterdir())
    assert names and all(n.startswith("shard-") and n.endswith(".h5") for n in names), names
    assert len(names) < 10
    for p in out.iterdir():  # every file left is complete and readable
        c, j = gen.read_h5(p)
        assert c.shape == (6, 100, 16) and j.shape == (6, 59)
    first = (out / names[0]).stat().st_mtime_ns
    res = gen.generate(out, jets=60, seed=11, chunk_size=6, progress=False)
    assert res.skipped_chunks == len(names)
    assert len(list(out.glob("shard-*.h5"))) == 10
    assert (out / names[0]).stat().st_mtime_ns == first


def test_cli_reports_user_errors(tmp_path, capsys):
    from ucluster_jax import cli

    rc = cli.main(["generate", "--out", str(tmp_path / "x"), "--jets", "5", "--processes", "w,higgs"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown process" in err and "higgs" in err


# ------------------------------------------------------------------- event processes (LHCO R&D layout)

def test_event_chunk_plan_gives_the_exact_signal_count():
    cfg = gen.EventConfig(signal_fraction=0.1)
    job = gen.EventJob(out_dir=Path("."), seed=0, mode="events", total=1001, world=3, config=cfg, chunk_size=70)
    chunks = [c for r in range(3) for c in job.chunks(r)]
    assert sum(c.quotas["resonance"] for c in chunks) == round(0.1 * 1001)
    assert sum(sum(c.quotas.values()) for c in chunks) == 1001
    assert all(0 <= c.quotas["resonance"] <= 8 for c in chunks)  # spread, about 7 per chunk of 70
    only_qcd = gen.EventJob(out_dir=Path("."), seed=0, mode="events", total=10, world=1,
                            config=gen.EventConfig(processes=("qcd-dijet",), signal_fraction=0.0))
    assert [c.quotas for c in only_qcd.chunks(0)] == [{"qcd-dijet": 10}]


def test_event_row_sorted_padded_labelled():
    from ucluster_jax.data.generate.events import event_row

    pts, etas, phis = np.array([5.0, 300.0, 40.0]), np.array([0.3, -1.2, 2.0]), np.array([3.0, -0.5, 1.0])
    p4 = np.stack([pts * np.cos(phis), pts * np.sin(phis), pts * np.sinh(etas), pts * np.cosh(etas)], 1)
    row = event_row(p4, label=1, max_particles=4)
    assert row.shape == (13,) and row[-1] == 1
    np.testing.assert_allclose(row[:9].reshape(3, 3), [[300, -1.2, -0.5], [40, 2.0, 1.0], [5, 0.3, 3.0]])
    np.testing.assert_array_equal(row[9:12], 0.0)
    assert event_row(p4, label=0, max_particles=2)[:6].reshape(2, 3)[:, 0].tolist() == [300, 40]


def test_event_arguments_are_user_errors(tmp_path, capsys):
    from ucluster_jax import cli

    with pytest.raises(UserError, match="signal-fraction"):
        gen.EventConfig(signal_fraction=1.2).validate()
    with pytest.raises(UserError, match="does not fit"):
        gen.EventConfig(processes=("qcd-dijet",), signal_fraction=0.1).validate()
    with pytest.raises(UserError, match="X \\+ Y"):
        gen.EventConfig(x_mass=3000.0).validate()
    for argv, message in (
            (["--processes", "w,resonance", "--events", "5"], "cannot mix"),
            (["--processes", "qcd-dijet,resonance", "--events", "5", "--signal-fraction", "-0.1"], "[0, 1]"),
            (["--processes", "qcd-dijet,resonance", "--jets", "5"], "--jets"),
            (["--processes", "w", "--jets", "5", "--wprime-mass", "3000"], "--wprime-mass")):
        assert cli.main(["generate", "--out", str(tmp_path / "x.h5"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def _leading_jets(row: np.ndarray):
    """Leading two anti-kT R=1 jets (pt, eta, mass) and their invariant mass, from one LHCO row."""
    import fastjet

    x = row[:-1].reshape(-1, 3)
    x = x[x[:, 0] > 0]
    pjs = [fastjet.PseudoJet(pt * math.cos(phi), pt * math.sin(phi), pt * math.sinh(eta), pt * math.cosh(eta))
           for pt, eta, phi in x.tolist()]
    cs = fastjet.ClusterSequence(pjs, fastjet.JetDefinition(fastjet.antikt_algorithm, 1.0))
    jets = fastjet.sorted_by_pt(cs.inclusive_jets())[:2]
    return [(j.pt(), j.eta(), j.m()) for j in jets], (jets[0] + jets[1]).m()


@needs_pythia
def test_resonance_decays_in_the_event_record():
    from ucluster_jax.data.generate.events import EventSimulator

    sim = EventSimulator("resonance", gen.EventConfig(processes=("resonance",), signal_fraction=1.0),
                         seed=1, rng=np.random.default_rng(0))
    for _ in range(4):
        sim.next_accepted()
        ev = sim.pythia.event
        last = [ev[i] for i in range(ev.size()) if ev[i].idAbs() in (34, 36, 37) and ev[i].iBotCopyId() == i]
        byid = {p.idAbs(): p for p in last}
        assert sorted(byid) == [34, 36, 37] and len(last) == 3
        assert sorted(abs(ev[d].id()) for d in byid[34].daughterList()) == [36, 37]
        assert byid[34].id() * byid[37].id() > 0  # W'+ -> H+ A0: charge conserved
        assert abs(byid[34].m() - 3500) < 0.2 * 3500
        for pid, mass in ((37, 500.0), (36, 100.0)):
            assert abs(byid[pid].m() - mass) < 0.01 * mass
            quarks = [ev[d].id() for d in byid[pid].daughterList()]
            assert len(quarks) == 2 and all(1 <= abs(q) <= 4 for q in quarks), quarks
    assert sim.accepted == 4 and sim.generated >= 4


@pytest.fixture(scope="module")
def lhco_sample(tmp_path_factory):
    """32 events, half resonance, seed 5, two chunks merged into one file, through the command line."""
    from ucluster_jax import cli

    out = tmp_path_factory.mktemp("lhco") / "events.h5"
    rc = cli.main(["generate", "--processes", "qcd-dijet,resonance", "--events", "32", "--signal-fraction", "0.5",
                   "--seed", "5", "--chunk", "16", "--out", str(out), "--quiet"])
    assert rc == 0
    return out


@needs_pythia
def test_lhco_layout(lhco_sample):
    assert sorted(p.name for p in lhco_sample.parent.iterdir()) == ["events.h5"]  # parts folder removed
    with h5py.File(lhco_sample, "r") as f:
        assert list(f.keys()) == ["df"]
        g = f["df"]
        assert set(g.keys()) == {"axis0", "axis1", "block0_items", "block0_values"}
        v = g["block0_values"]
        assert v.shape == (32, 2101) and v.dtype == np.float64
        assert [n.decode() for n in g["axis0"][:]] == [str(i) for i in range(2101)]
        np.testing.assert_array_equal(g["block0_items"][:], g["axis0"][:])
        np.testing.assert_array_equal(g["axis1"][:], np.arange(32))
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.attrs.items()}
        for k, want in {"pandas_type": "frame", "encoding": "UTF-8", "ndim": 2, "nblocks": 1,
                        "block0_items_variety": "regular", "axis0_variety": "regular",
                        "axis1_variety": "regular"}.items():
            assert attrs[k] == want, k
        assert "pandas_version" in attrs and g["block0_values"].attrs["transposed"]
        values = v[:]
    assert np.isfinite(values).all()
    labels = values[:, -1]
    assert sorted(set(labels.tolist())) == [0.0, 1.0] and labels.sum() == 16
    assert 0 < labels[:16].sum() < 16  # shuffled within the chunk, not blocks of one process
    parts = values[:, :-1].reshape(32, 700, 3)
    pt, eta, phi = parts[..., 0], parts[..., 1], parts[..., 2]
    n = (pt > 0).sum(1)
    for i in range(32):
        assert 50 < n[i] <= 700
        assert np.all(np.diff(pt[i, : n[i]]) <= 0)  # decreasing pT
        np.testing.assert_array_equal(parts[i, n[i]:], 0.0)  # zero padding
        assert np.all(pt[i, : n[i]] > 0.5) and np.all(np.abs(eta[i, : n[i]]) < 2.5)
        assert np.all(np.abs(phi[i, : n[i]]) <= math.pi)


@needs_pythia
def test_lhco_resonance_and_qcd_physics(lhco_sample):
    values = h5py.File(lhco_sample, "r")["df/block0_values"][:]
    signal = {"mjj": [], "heavy": [], "light": []}
    for row in values:
        jets, mjj = _leading_jets(row)
        # every event passed the trigger (up to the particle masses, which the rows drop)
        assert any(pt > 1190 and abs(eta) < 2.5 for pt, eta, _ in jets), jets
        if row[-1] == 0:
            continue
        signal["mjj"].append(mjj)
        signal["heavy"].append(max(jets[0][2], jets[1][2]))
        signal["light"].append(min(jets[0][2], jets[1][2]))
    mjj, heavy, light = (np.array(signal[k]) for k in ("mjj", "heavy", "light"))
    assert len(mjj) == 16
    assert np.mean((mjj > 2500) & (mjj < 4200)) >= 0.8, mjj  # W' at 3.5 TeV
    # X at 500 GeV, Y at 100 GeV (+ underlying event). In 300 events: 78 % and 87 % in these windows
    # (the rest: X's quarks not both inside R=1), against 15 % and 70 % for QCD's leading two jets.
    assert np.mean((heavy > 400) & (heavy < 620)) >= 0.5, heavy
    assert np.mean((light > 60) & (light < 180)) >= 0.6, light


@needs_pythia
def test_lhco_same_seed_same_file_other_seed_differs(lhco_sample, tmp_path):
    cfg = gen.EventConfig(signal_fraction=0.5)
    res = gen.generate_events(tmp_path / "again.h5", events=32, seed=5, config=cfg, chunk_size=16, progress=False)
    assert res.events == 32 and res.jets >= 32  # Pythia events generated, trigger failures included
    again = gen.read_lhco(tmp_path / "again.h5")
    np.testing.assert_array_equal(again, h5py.File(lhco_sample, "r")["df/block0_values"][:])
    gen.generate_events(tmp_path / "other", events=4, seed=6, config=cfg, chunk_size=16, progress=False)
    other = gen.read_lhco(tmp_path / "other" / "shard-0000-0000.h5")
    assert other.shape == (4, 2101) and other[:, -1].sum() == 2
    assert not np.array_equal(other, again[:4])
    res = gen.generate_events(tmp_path / "other", events=4, seed=6, config=cfg, chunk_size=16, progress=False)
    assert res.skipped_chunks == 1 and res.events == 0  # resumed: the chunk is there
