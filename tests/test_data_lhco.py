"""`ucluster prepare` on LHC Olympics R&D-layout files built by hand with h5py (lhco.py)."""
from __future__ import annotations

import re
from pathlib import Path

import fastjet
import h5py
import numpy as np
import pytest

from ucluster_jax.cli import main as cli_main
from ucluster_jax.data.features import anomaly_mass_bin
from ucluster_jax.data.reader import ParquetDataset
from ucluster_jax.data.toy import write_hls4ml_h5

WIDTH = 2101
ORIGINAL_EDGES = np.append(np.linspace(10, 1000, 20), [100000])  # the original's MASSRANGE


def original_bin(m: float) -> int:
    return next(i for i, e in enumerate(ORIGINAL_EDGES) if e >= m)


def spray(rng, n: int, pt: float, eta: float, phi: float, width: float) -> np.ndarray:
    """n particles [n, 3] (pT, eta, phi) sharing `pt`, around (eta, phi); phi kept in (-pi, pi] as in the files."""
    p = np.stack([rng.dirichlet(np.ones(n)) * pt, rng.normal(eta, width, n), rng.normal(phi, width, n)], axis=1)
    p[:, 2] = np.angle(np.exp(1j * p[:, 2]))
    return p


def two_prong(rng, n: int, pt: float, eta: float, phi: float, sep: float) -> np.ndarray:
    return np.concatenate([spray(rng, n - n // 2, 0.6 * pt, eta + sep / 2, phi, 0.01),
                           spray(rng, n // 2, 0.4 * pt, eta - sep / 2, phi, 0.01)])


def junk(rng, n: int = 20) -> np.ndarray:
    """Soft particles far forward, more than 2 from every hard spray: their own jets, all below 20 GeV."""
    return np.stack([rng.uniform(0.2, 0.8, n), rng.uniform(4.0, 4.5, n), rng.uniform(-np.pi, np.pi, n)], axis=1)


def four(parts: np.ndarray) -> np.ndarray:
    pt, eta, phi = parts.T
    return np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), pt * np.cosh(eta)], axis=1)


def mass(p4: np.ndarray) -> float:
    px, py, pz, e = p4.reshape(-1, 4).sum(axis=0)
    return float(np.sqrt(e**2 - px**2 - py**2 - pz**2))


def write(path: Path, events: list[tuple[np.ndarray, int]]) -> Path:
    rows = np.zeros((len(events), WIDTH))
    for r, (parts, label) in enumerate(events):
        rows[r, :parts.size] = parts.reshape(-1)
        rows[r, -1] = label
    with h5py.File(path, "w") as f:
        f["df/block0_values"] = rows
    return path


def expected_features(parts: np.ndarray) -> np.ndarray:
    """The 7 features of a jet's particles, by decreasing pT, relative to the sum of their four-vectors."""
    parts = parts[np.argsort(-parts[:, 0], kind="stable")]
    jpx, jpy, jpz, je = four(parts).sum(axis=0)
    jpt = np.hypot(jpx, jpy)
    pt, eta, phi = parts.T
    e = pt * np.cosh(eta)
    deta = eta - np.arcsinh(jpz / jpt)
    dphi = np.angle(np.exp(1j * (phi - np.arctan2(jpy, jpx))))
    return np.stack([deta, dphi, np.log(pt / jpt), np.log(e / je), np.log(pt), np.log(e), np.hypot(deta, dphi)], 1)


def reference_tau21(parts: np.ndarray) -> float:
    """tau2/tau1 with FastJet's one-event interface (kt R = 0.2 exclusive axes), as the original computed it."""
    seq = fastjet.ClusterSequence([fastjet.PseudoJet(*map(float, v)) for v in four(parts)],
                                  fastjet.JetDefinition(fastjet.kt_algorithm, 0.2))
    pt, eta, phi = parts.T

    def tau(n: int) -> float:
        dr = [np.hypot(eta - a.eta(), np.angle(np.exp(1j * (phi - a.phi())))) for a in seq.exclusive_jets(n)]
        return float((pt * np.min(dr, axis=0)).sum() / pt.sum())

    return tau(2) / tau(1)


def prepare_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli_main(["prepare", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def no_files(d: Path) -> bool:
    return not d.exists() or not [p for p in d.rglob("*") if p.is_file()]


def test_mass_bins_follow_the_original_rule():
    rng = np.random.default_rng(0)
    masses = np.concatenate([ORIGINAL_EDGES[:-1], ORIGINAL_EDGES[:-1] + 1e-6, rng.uniform(10, 1200, 200)])
    assert list(anomaly_mass_bin(masses)) == [original_bin(m) for m in masses]
    assert anomaly_mass_bin(2e5) == 20


def test_events_by_hand(tmp_path, capsys):
    rng = np.random.default_rng(1)
    # event A (signal): a two-prong jet, the heaviest but softer; a one-prong spray across phi = pi; a
    # lighter third jet and a massless 50 GeV one, both left out
    a1 = two_prong(rng, 10, 250, 0.0, 0.0, 0.8)
    a2 = spray(rng, 30, 400, 0.5, np.pi, 0.05)
    a3 = spray(rng, 2, 60, -2.0, 1.5, 0.25)
    single = np.array([[50.0, 2.0, -1.5]])
    # event B (background): 70 + 60 particles, cut to 70 of jet 1 and the 30 hardest of jet 2
    b1 = two_prong(rng, 70, 300, 0.3, -1.0, 0.6)
    b2 = spray(rng, 60, 500, -0.5, 2.0, 0.04)
    m = {k: mass(four(v)) for k, v in dict(a1=a1, a2=a2, a3=a3, b1=b1, b2=b2).items()}
    assert m["a1"] > m["a2"] > m["a3"] >= 10 and m["b1"] > m["b2"] >= 10  # the events are what they should be
    assert np.ptp(a2[:, 2]) > 6  # jet A2's particles straddle phi = pi
    c = spray(rng, 20, 300, 0.0, 0.0, 0.05)  # one jet only
    d = np.concatenate([spray(rng, 20, 300, 0.0, 0.0, 0.05), single])  # the second jet is massless
    events = [(np.concatenate([a2, junk(rng), a3, a1, single]), 1), (np.concatenate([b2, b1, junk(rng)]), 0),
              (np.concatenate([c, junk(rng)]), 1), (d, 0), (np.zeros((0, 3)), 0)]
    path = write(tmp_path / "events.h5", events)

    rc, out, err = prepare_cli(capsys, path, "--out", tmp_path / "out", "--chunk", 2)
    assert rc == 0, err
    assert re.search(r"read 5, kept 2; dropped: < 2 jets with pT > 20 GeV 2, < 2 of them with m >= 10 GeV 1, "
                     r"signal subsampled 0; background 1, signal 1", out), out
    got = ParquetDataset(tmp_path / "out").read_all()
    assert got["x"].shape == (2, 100, 7) and got["target"].shape == (2, 100) and got["global"].shape == (2, 4)
    np.testing.assert_array_equal(got["label"], [1, 0])

    want_a = np.concatenate([expected_features(a1), expected_features(a2)])
    np.testing.assert_allclose(got["x"][0, :40], want_a, rtol=1e-5, atol=2e-5)
    assert not got["x"][0, 40:].any() and not got["target"][0, 40:].any()
    np.testing.assert_array_equal(got["target"][0, :40], [original_bin(m["a1"])] * 10 + [original_bin(m["a2"])] * 30)
    assert np.abs(got["x"][0, 10:40, 1]).max() < 0.5  # dphi wrapped across phi = pi
    want_b = np.concatenate([expected_features(b1), expected_features(b2)[:30]])
    np.testing.assert_allclose(got["x"][1], want_b, rtol=1e-5, atol=2e-5)
    np.testing.assert_array_equal(got["target"][1], [original_bin(m["b1"])] * 70 + [original_bin(m["b2"])] * 30)

    np.testing.assert_allclose(got["mass"], [mass(four(np.concatenate([a1, a2]))), mass(four(np.concatenate([b1, b2])))],
                               rtol=1e-5)
    np.testing.assert_allclose(got["global"][:, [0, 2]], np.log([[m["a1"], m["a2"]], [m["b1"], m["b2"]]]), rtol=1e-5)
    tau = got["global"][:, [1, 3]]
    np.testing.assert_allclose(tau, [[reference_tau21(v) for v in (a1, a2)], [reference_tau21(v) for v in (b1, b2)]],
                               rtol=1e-4, atol=1e-6)
    assert ((tau >= 0) & (tau < 1.5)).all()
    assert tau[0, 0] < 0.5 * tau[0, 1] and tau[1, 0] < 0.5 * tau[1, 1]  # two prongs: far smaller tau21


def sample(rng, n_sig: int, n_bkg: int) -> list[tuple[np.ndarray, int]]:
    """Events that all pass the selection, each with its own dijet mass; signal and background mixed."""
    labels = rng.permutation([1] * n_sig + [0] * n_bkg)
    return [(np.concatenate([two_prong(rng, 8, rng.uniform(200, 400), 0, 0, 0.8),
                             spray(rng, 8, rng.uniform(200, 400), 0.3, 3.0, 0.1)]), int(lab)) for lab in labels]


def test_signal_fraction_is_exact_and_seeded(tmp_path, capsys):
    path = write(tmp_path / "mix.h5", sample(np.random.default_rng(2), 100, 200))
    assert prepare_cli(capsys, path, "--out", tmp_path / "all")[0] == 0
    everything = ParquetDataset(tmp_path / "all").read_all()
    assert len(everything["label"]) == 300

    def sampled(name: str, fraction: float, seed: int, *extra: str) -> dict[str, np.ndarray]:
        rc, out, err = prepare_cli(capsys, path, "--out", tmp_path / name, "--signal-fraction", fraction,
                                   "--seed", seed, *extra)
        assert rc == 0, err
        parts = [tmp_path / name / p for p in ("train", "test")] if extra else [tmp_path / name]
        got = [ParquetDataset(p).read_all() for p in parts]
        return {k: np.concatenate([g[k] for g in got]) for k in got[0]}

    bkg_mass = everything["mass"][everything["label"] == 0]
    for fraction in (0.1, 0.01):
        got = sampled(f"f{fraction}", fraction, 1)
        k = round(fraction * 200 / (1 - fraction))
        assert (got["label"] == 1).sum() == k and abs(got["label"].mean() - fraction) < 1 / len(got["label"])
        np.testing.assert_array_equal(got["mass"][got["label"] == 0], bkg_mass)  # all background, in order
        assert set(got["mass"][got["label"] == 1]) <= set(everything["mass"][everything["label"] == 1])
    again = sampled("again", 0.1, 1, "--split", "train=0.5,test=0.5", "--ranks", "2")
    np.testing.assert_array_equal(again["mass"], sampled("f0.1b", 0.1, 1)["mass"])
    other = sampled("other", 0.1, 2)
    assert set(other["mass"][other["label"] == 1]) != set(again["mass"][again["label"] == 1])
    rc, out, err = prepare_cli(capsys, path, "--out", tmp_path / "toomuch", "--signal-fraction", 0.5)
    assert rc == 2 and "only 100 pass the selection" in err and no_files(tmp_path / "toomuch")


def test_bad_files_one_line_exit_2_nothing_written(tmp_path, capsys):
    rng = np.random.default_rng(3)
    good = sample(rng, 5, 5)
    bad = {}
    bad["text.h5"] = "not a readable HDF5"
    (tmp_path / "text.h5").write_text("hello")
    bad["narrow.h5"] = "expected numbers \\[N, 2101\\]"
    with h5py.File(tmp_path / "narrow.h5", "w") as f:
        f["df/block0_values"] = np.zeros((3, 2100))
    for name, row, value, why in (("nan.h5", 9, (0, 1, np.nan), "row 9 .* non-finite"),
                                  ("negative.h5", 4, (3, 0, -1.0), "row 4 .* negative pT"),
                                  ("label.h5", 7, (-1, 0, 2.0), "row 7 .* label 2")):
        path = write(tmp_path / name, good)
        with h5py.File(path, "r+") as f:
            f["df/block0_values"][row, value[0]] = value[2]
        bad[name] = why
    data = write(tmp_path / "whole.h5", sample(rng, 20, 20)).read_bytes()
    (tmp_path / "truncated.h5").write_bytes(data[:len(data) // 2])
    bad["truncated.h5"] = "HDF5|read failed"
    for name, why in bad.items():
        out = tmp_path / "out"
        rc, _, err = prepare_cli(capsys, tmp_path / name, "--out", out, "--chunk", 2, "--row-group-size", 1)
        assert rc == 2, name
        assert len(err.strip().splitlines()) == 1 and str(tmp_path / name) in err and re.search(why, err), err
        assert no_files(out), name
    rc, _, err = prepare_cli(capsys, tmp_path / "whole.h5", "--out", tmp_path / "out", "--mass", "softdrop")
    assert rc == 2 and f"{tmp_path / 'whole.h5'}: LHC Olympics events keep their dijet mass; --mass softdrop" in err
    assert no_files(tmp_path / "out")


def test_several_files_total_and_no_mixing(tmp_path, capsys):
    rng = np.random.default_rng(4)
    files = [write(tmp_path / f"{k}.h5", sample(rng, 2, 3)) for k in "ab"]
    rc, out, err = prepare_cli(capsys, *files, "--out", tmp_path / "out")
    assert rc == 0, err
    assert "total (lhco): read 10, kept 10;" in out and "background 6, signal 4" in out
    got = ParquetDataset(tmp_path / "out").read_all()
    one = [prepare_cli(capsys, f, "--out", tmp_path / f"one_{f.stem}") for f in files]
    assert all(r[0] == 0 for r in one)
    np.testing.assert_array_equal(got["x"], np.concatenate([ParquetDataset(tmp_path / f"one_{f.stem}").read_all()["x"]
                                                             for f in files]))
    write_hls4ml_h5(tmp_path / "jets.h5", 6, 0)
    rc, _, err = prepare_cli(capsys, files[0], tmp_path / "jets.h5", "--out", tmp_path / "mixed")
    assert rc == 2 and "cannot be mixed" in err and no_files(tmp_path / "mixed")
    rc, _, err = prepare_cli(capsys, tmp_path / "jets.h5", "--out", tmp_path / "mixed", "--signal-fraction", 0.1)
    assert rc == 2 and "LHC Olympics inputs only" in err and no_files(tmp_path / "mixed")
