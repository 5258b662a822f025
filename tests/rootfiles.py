"""Real ROOT files for the tests, written with uproot: JetClass-like jets from simple kinematics.

Each jet is two (W, Z, QCD) or three (top) prongs of collinear massless particles around a random axis;
the prongs' opening angle sets the jet mass near the class's (60, 100, 170, 30 GeV), so that the
classes differ the way real W/Z/top jets do and a short training separates them.
"""
from __future__ import annotations

from pathlib import Path

import awkward as ak
import numpy as np
import uproot

CLASSES = ("W", "Z", "top", "QCD")
MASS = {"W": 60.0, "Z": 100.0, "top": 170.0, "QCD": 30.0}
LABELS = {"W": "label_Wqq", "Z": "label_Zqq", "top": "label_Tbqq", "QCD": "label_QCD"}


def make_jets(n: int, seed: int) -> dict[str, np.ndarray]:
    """{'cls': [n] index into CLASSES, 'pt'/'eta'/'phi'/'e': [n] lists of particle arrays}."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, len(CLASSES), n)
    out: dict = {"cls": cls, "pt": [], "eta": [], "phi": [], "e": []}
    for c in cls:
        name = CLASSES[c]
        jet_pt, jet_eta, jet_phi = rng.uniform(450, 550), rng.uniform(-1.5, 1.5), rng.uniform(-np.pi, np.pi)
        prongs = 3 if name == "top" else 2
        radius = MASS[name] / jet_pt * rng.uniform(0.9, 1.1)
        turn = rng.uniform(0, 2 * np.pi)
        pts, etas, phis = [], [], []
        for k in range(prongs):
            a = turn + 2 * np.pi * k / prongs
            m = rng.integers(4, 12)
            pts.append(jet_pt / prongs * rng.dirichlet(np.ones(m)))
            etas.append(jet_eta + radius * np.cos(a) + rng.normal(0, 0.01, m))
            phis.append(jet_phi + radius * np.sin(a) + rng.normal(0, 0.01, m))
        pt, eta, phi = (np.concatenate(v) for v in (pts, etas, phis))
        order = rng.permutation(len(pt))  # unsorted, as files need not be
        out["pt"].append(pt[order])
        out["eta"].append(eta[order])
        out["phi"].append(phi[order])
        out["e"].append(pt[order] * np.cosh(eta[order]))
    return out


def jet_four_momentum(j: dict) -> np.ndarray:
    """[n, 4] (px, py, pz, E): the sum of each jet's particles."""
    return np.array([[np.sum(pt * np.cos(phi)), np.sum(pt * np.sin(phi)), np.sum(pt * np.sinh(eta)), np.sum(e)]
                     for pt, eta, phi, e in zip(j["pt"], j["eta"], j["phi"], j["e"])])


def jetclass_branches(j: dict) -> dict:
    """The JetClass branches (float32, as in its files) of jets from make_jets, plus unused ones."""
    pt, eta, phi, e = (ak.Array(j[k]) for k in ("pt", "eta", "phi", "e"))
    p4 = jet_four_momentum(j)
    jpt = np.hypot(p4[:, 0], p4[:, 1])
    jeta = np.arcsinh(p4[:, 2] / jpt)
    f32 = lambda a: ak.values_astype(a, np.float32)  # noqa: E731
    part = ak.zip({"px": f32(pt * np.cos(phi)), "py": f32(pt * np.sin(phi)), "pz": f32(pt * np.sinh(eta)),
                   "energy": f32(e), "deta": f32(eta - jeta), "charge": f32(0 * pt)})
    out = {"part": part, "jet_pt": jpt, "jet_eta": jeta, "jet_phi": np.arctan2(p4[:, 1], p4[:, 0]),
           "jet_energy": p4[:, 3],
           "jet_nparticles": np.array([len(v) for v in j["pt"]]), "jet_sdmass": np.zeros(len(jpt))}
    for k, name in enumerate(CLASSES):
        out[LABELS[name]] = (j["cls"] == k)
    return {k: (v.astype(np.float32) if isinstance(v, np.ndarray) else v) for k, v in out.items()}


def write_tree(path: Path, branches: dict, tree: str = "tree", baskets: int = 3) -> Path:
    """A TTree of `branches`, filled in `baskets` parts as real files are (several baskets per branch)."""
    n = len(next(iter(branches.values())))
    with uproot.recreate(path) as f:
        f.mktree(tree, {k: (v.type.content if isinstance(v, ak.Array) else v.dtype) for k, v in branches.items()})
        for s in np.array_split(np.arange(n), baskets):
            f[tree].extend({k: v[s[0]:s[-1] + 1] for k, v in branches.items()})
    return path


def write_rntuple(path: Path, branches: dict, name: str = "tree") -> Path:
    """The same branches as an RNTuple (ROOT's successor of TTree; uproot's default when writing)."""
    flat = {k: v for k, v in branches.items() if not (isinstance(v, ak.Array) and v.fields)}
    for k, v in branches.items():
        if k not in flat:
            flat.update({f"{k}_{f}": v[f] for f in v.fields})
    with uproot.recreate(path) as f:
        f[name] = flat
    return path
