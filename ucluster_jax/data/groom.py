"""Jet masses rebuilt from the model's particle features (`ucluster prepare --mass massless|softdrop`).

The massless mass: the invariant mass of the kept particles taken massless. Why: the jet mass sums the
hadrons' four-vectors with their masses (pions, kaons, protons), which moves a W or Z jet's mass by about
2 GeV and scatters it by 1.8 GeV with the hadron species, a scatter the particle features barely show;
trained on the massless mass, the network's own mass estimate follows it to 1.4 GeV instead of 2.1
(docs/RESULTS.md, "The network's own mass caps the clusters").

The soft-drop mass. Why: with multiparton interactions and ISR on, soft wide-angle radiation smears the
W and Z jet masses upwards and their peaks overlap; soft drop (Larkoski, Marzani, Soyez, Thaler 2014)
removes that radiation and narrows them: best W/Z/top mass cuts 80-81 % instead of 76 % on generated
jets (docs/RESULTS.md, "The soft-drop mass").

FastJet's SoftDrop (Cambridge/Aachen reclustering, declustering along the harder branch until
min(pt1, pt2) / (pt1 + pt2) > z_cut (dR12 / R0)^beta) on massless four-vectors rebuilt from (etarel,
phirel, pt): the rapidity shift to the jet axis leaves the mass unchanged.
"""
from __future__ import annotations

import numpy as np

from ucluster_jax.data.fastjet_quiet import fastjet
from ucluster_jax.data.features import FEATURE_NAMES

Z_CUT = 0.1
BETA = 2.0   # milder than beta 0 (mMDT): best cuts 80 % against 74 % (docs/RESULTS.md)
R0 = 0.8     # the jets' radius
_ETA, _PHI, _LOG_PT = (FEATURE_NAMES.index(n) for n in ("etarel", "phirel", "log_pt"))


def _four_vectors(points: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """[N, P, F] particle features -> (mask of real particles [N, P], massless px, py, pz, E [N, P] in GeV,
    float64, zero on the padding rows: log_pt 0)."""
    mask = points[..., _LOG_PT] != 0
    pt = np.where(mask, np.exp(points[..., _LOG_PT].astype(np.float64)), 0.0)
    eta, phi = points[..., _ETA].astype(np.float64), points[..., _PHI].astype(np.float64)
    return mask, {"px": pt * np.cos(phi), "py": pt * np.sin(phi), "pz": pt * np.sinh(eta), "E": pt * np.cosh(eta)}


def massless_mass(points: np.ndarray) -> np.ndarray:
    """[N, P, F] particle features (zero-padded rows: log_pt 0) -> [N] massless masses in GeV, float32."""
    px, py, pz, e = (v.sum(1) for v in _four_vectors(points)[1].values())
    return np.sqrt(np.maximum(e * e - px * px - py * py - pz * pz, 0.0)).astype(np.float32)


def softdrop_mass(points: np.ndarray, z_cut: float = Z_CUT, beta: float = BETA, r0: float = R0) -> np.ndarray:
    """[N, P, F] particle features (zero-padded rows: log_pt 0) -> [N] soft-drop masses in GeV, float32.
    A jet without particles gets 0."""
    import awkward as ak  # here, not at import: `ucluster prepare` without --mass softdrop never needs it

    fj = fastjet()
    mask, p4 = _four_vectors(points)
    counts = mask.sum(axis=1)
    out = np.zeros(len(points), np.float32)
    full = counts > 0
    if full.any():
        jets = ak.zip({k: ak.unflatten(v[mask], counts[full]) for k, v in p4.items()})
        seq = fj.ClusterSequence(jets, fj.JetDefinition(fj.cambridge_algorithm, 10.0))
        groomed = seq.exclusive_jets_softdrop_grooming(njets=1, beta=beta, symmetry_cut=z_cut, R0=r0)
        out[full] = ak.to_numpy(groomed.msoftdrop)
    return out
