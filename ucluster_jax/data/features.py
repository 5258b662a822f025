"""Per-particle features and mass bins (SPEC section 1), shared by `prepare`, the toy and `generate`.

One implementation for every source, so the toy exercises exactly the code that real data goes through.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The 8 model inputs, in the original's order.
FEATURE_NAMES: tuple[str, ...] = (
    "etarel", "phirel", "log_ptrel", "deltaR", "log_e", "log_erel", "log_pt", "costhetarel",
)
# (hls4ml column, take the log) for each of FEATURE_NAMES.
_SOURCES: tuple[tuple[str, bool], ...] = (
    ("etarel", False), ("phirel", False), ("ptrel", True), ("deltaR", False),
    ("e", True), ("erel", True), ("pt", True), ("costhetarel", False),
)
# The 16 per-particle columns of the hls4ml raw files, in their usual order.
HLS4ML_PARTICLE_NAMES: tuple[str, ...] = tuple(
    "j1_" + n for n in (
        "px", "py", "pz", "e", "erel", "pt", "ptrel", "eta", "etarel", "etarot", "phi", "phirel",
        "phirot", "deltaR", "costheta", "costhetarel",
    )
)

# What a dataset's `mass` column can hold (DatasetMeta.mass, loss.mass, `ucluster prepare --mass`).
MASS_KINDS: tuple[str, ...] = ("jet", "massless", "softdrop")

# Auxiliary target: 20 mass bins, edges linspace(0, 200, 20) plus an overflow edge.
NUM_TARGETS = 20
MASS_EDGES = np.linspace(0.0, 200.0, 20)


def clean_name(name: str | bytes) -> str:
    """hls4ml files store names as bytes with a `j1_` prefix; compare them as plain strings."""
    if isinstance(name, (bytes, np.bytes_)):
        name = name.decode("utf-8", "replace")
    name = str(name).strip()
    return name[3:] if name.startswith("j1_") else name


def missing_particle_columns(names: Sequence[str | bytes]) -> list[str]:
    """Columns needed for the 8 features that `names` lacks (lets callers report the file)."""
    have = {clean_name(n) for n in names}
    return [src for src, _ in _SOURCES if src not in have]


def _safe_log(v: np.ndarray) -> np.ndarray:
    """log on positive entries, 0 on zero/negative (padded rows), NaN kept so callers can drop the jet."""
    pos = v > 0
    out = np.log(np.where(pos, v, 1.0))
    out[np.isnan(v)] = np.nan
    return out


def hls4ml_particle_features(const16: np.ndarray, names: Sequence[str | bytes]) -> np.ndarray:
    """[N,P,16] hls4ml constituents -> [N,P,8] float32 model features, columns looked up by name.

    log(0) -> 0 on padded rows and +-inf -> 0, as the original prepare did; NaN is left in place
    (the caller decides: `prepare` drops such jets). No standardisation.
    """
    const16 = np.asarray(const16)
    index = {clean_name(n): i for i, n in enumerate(names)}
    missing = missing_particle_columns(names)
    if missing:
        raise ValueError(f"particle feature(s) {missing} not among {sorted(index)}")
    if const16.ndim != 3 or const16.shape[-1] != len(names):
        raise ValueError(f"constituents of shape {const16.shape} do not match {len(names)} feature names")
    out = np.empty(const16.shape[:2] + (len(_SOURCES),), np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # overflow -> inf -> 0 below
        for k, (src, log) in enumerate(_SOURCES):
            col = const16[..., index[src]].astype(np.float32, copy=False)
            out[..., k] = _safe_log(col) if log else col
    out[np.isinf(out)] = 0.0
    return out


def mass_bin(mass: np.ndarray | float) -> np.ndarray:
    """Fixed mass bin 0..19: bin i holds MASS_EDGES[i] <= m < MASS_EDGES[i+1]; m >= 200 -> 19 (overflow).

    Same edges as the original (linspace(0,200,20) + [10000]) but never renumbered per file;
    masses above the original's 10000 edge also go to 19 and negative masses to 0.
    """
    m = np.asarray(mass, dtype=np.float64)
    return np.clip(np.digitize(m, MASS_EDGES) - 1, 0, NUM_TARGETS - 1).astype(np.int32)


# Anomaly task (LHC Olympics): the jet-mass bin of each particle's jet, as the original's MASSRANGE:
# edges linspace(10, 1000, 20) plus an overflow edge, bin = first i with edges[i] >= m, 21 classes.
ANOMALY_MASS_EDGES = np.append(np.linspace(10.0, 1000.0, 20), 1e5)
ANOMALY_NUM_TARGETS = len(ANOMALY_MASS_EDGES)


def anomaly_mass_bin(mass: np.ndarray | float) -> np.ndarray:
    """Bin 0..20 of the anomaly task: the first i with ANOMALY_MASS_EDGES[i] >= m (m <= 10 -> 0).

    Masses above the overflow edge, where the original found no bin and failed, also go to 20.
    """
    m = np.asarray(mass, dtype=np.float64)
    return np.minimum(np.searchsorted(ANOMALY_MASS_EDGES, m, side="left"), ANOMALY_NUM_TARGETS - 1).astype(np.int32)


def wrap_phi(dphi):
    """An angle difference in [-pi, pi)."""
    return (dphi + np.pi) % (2 * np.pi) - np.pi


def constituents_to_hls4ml(
    px: np.ndarray, py: np.ndarray, pz: np.ndarray, e: np.ndarray, jet_p4: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Constituent four-momenta [N,P] (padding: e <= 0) -> hls4ml [N,P,16] and jet pt/eta/phi/mass/e.

    The jet is the sum of the given constituents, or `jet_p4` [N,4] (px, py, pz, E) when the jet has more
    constituents than are kept (the generator). `*rel` are differences to the jet axis (phi wrapped),
    ptrel/erel ratios to the jet; etarot/phirot copy etarel/phirel (no model uses them). Padded rows are 0.
    """
    px, py, pz, e = (np.asarray(a, np.float64) for a in (px, py, pz, e))
    valid = e > 0
    px, py, pz, e = (np.where(valid, a, 0.0) for a in (px, py, pz, e))
    if jet_p4 is None:
        jpx, jpy, jpz, je = (a.sum(axis=1, keepdims=True) for a in (px, py, pz, e))
    else:
        jpx, jpy, jpz, je = np.asarray(jet_p4, np.float64).T[..., None]
    jpt = np.hypot(jpx, jpy)
    jp = np.sqrt(jpt**2 + jpz**2)
    with np.errstate(invalid="ignore", divide="ignore"):
        jeta = np.arcsinh(jpz / np.maximum(jpt, 1e-12))
        jphi = np.arctan2(jpy, jpx)
        jcos = jpz / np.maximum(jp, 1e-12)
        pt = np.hypot(px, py)
        p = np.sqrt(pt**2 + pz**2)
        eta = np.arcsinh(pz / np.maximum(pt, 1e-12))
        phi = np.arctan2(py, px)
        etarel = eta - jeta
        phirel = wrap_phi(phi - jphi)
        cos = pz / np.maximum(p, 1e-12)
        cols = (
            px, py, pz, e, e / np.maximum(je, 1e-12), pt, pt / np.maximum(jpt, 1e-12), eta, etarel, etarel,
            phi, phirel, phirel, np.hypot(etarel, phirel), cos, cos - jcos,
        )
    const = np.empty(px.shape + (len(cols),), np.float32)
    for k, c in enumerate(cols):
        const[..., k] = np.where(valid, c, 0.0)
    jet = {
        "pt": jpt[:, 0], "eta": jeta[:, 0], "phi": jphi[:, 0], "e": je[:, 0],
        "mass": np.sqrt(np.maximum(je**2 - jp**2, 0.0))[:, 0],
    }
    return const, jet
