"""LHC Olympics 2020 R&D events (`events_anomalydetection.h5`) -> the anomaly dataset (docs/DATA.md).

The public file is a pandas fixed-format frame: `df/block0_values` [N, 2101] holds up to 700 particles
as (pT, eta, phi), zero-padded, and the truth label last. Each event becomes two anti-kT R = 1.0 jets
and their particles, as the original's clustering_anomaly (scripts/prepare_data_unsup.py), with FastJet's
multi-event interface clustering a whole chunk in one call (a per-event Python loop is the slow part
of the original). Differences: dphi is wrapped, tau21 uses a phi-wrapped dR, the signal subsample is
exact and seeded (`--signal-fraction`) instead of a 10 % coin flip per signal event.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import awkward as ak
import h5py
import numpy as np

from ucluster_jax.data.fastjet_quiet import fastjet
from ucluster_jax.data.features import ANOMALY_NUM_TARGETS, anomaly_mass_bin, wrap_phi
from ucluster_jax.data.schema import DatasetMeta
from ucluster_jax.errors import DataError
from ucluster_jax.progress import Progress

KEY = "df/block0_values"
MAX_PARTICLES = 700
WIDTH = 3 * MAX_PARTICLES + 1  # (pT, eta, phi) per particle, then the label
NUM_POINTS = 100  # particles per event: jet 1's, then jet 2's
DEFAULT_CHUNK = 1024  # events per read: clustering a chunk of 4096 takes ~1 GB, no faster
JET_R, JET_PTMIN, JET_MMIN, SUBJET_R = 1.0, 20.0, 10.0, 0.2
CLASS_NAMES = ("background", "signal")
# the 7 particle features; names from features.FEATURE_NAMES' vocabulary where the quantity is the same
FEATURE_NAMES = ("etarel", "phirel", "log_ptrel", "log_erel", "log_pt", "log_e", "deltaR")
GLOBAL_NAMES = ("log_m1", "tau21_1", "log_m2", "tau21_2")


def meta(num_points: int = NUM_POINTS) -> DatasetMeta:
    return DatasetMeta(num_points=num_points, num_features=len(FEATURE_NAMES), feature_names=FEATURE_NAMES,
                       num_targets=ANOMALY_NUM_TARGETS, class_names=CLASS_NAMES, num_global=len(GLOBAL_NAMES),
                       target_per_point=True)


def is_lhco(f: h5py.File) -> bool:
    return isinstance(f.get("df"), h5py.Group) and KEY in f


def inspect(f: h5py.File, path) -> int:
    """Check the layout without reading the events; the number of events."""
    d = f[KEY]
    if not isinstance(d, h5py.Dataset) or d.ndim != 2 or d.shape[1] != WIDTH or d.dtype.kind not in "fiu":
        raise DataError(f"{path}: {KEY} is {getattr(d, 'shape', 'not a dataset')}, expected numbers [N, {WIDTH}] "
                        f"({MAX_PARTICLES} particles x (pT, eta, phi) and the truth label; unlabelled black-box "
                        "files are not supported)")
    return d.shape[0]


@dataclass
class LhcoReport:
    """Per-input counts of `prepare`'s report; an event is counted under the first reason that drops it."""

    path: str
    format: str = "lhco"
    num_points: int = NUM_POINTS
    class_names: tuple[str, ...] = CLASS_NAMES
    read: int = 0
    kept: int = 0
    few_jets: int = 0  # fewer than 2 jets with pT > JET_PTMIN
    light_jets: int = 0  # fewer than 2 of them with m >= JET_MMIN
    signal_dropped: int = 0  # signal left out for --signal-fraction
    per_class: list[int] = field(default_factory=lambda: [0, 0])
    unknown_label: int = 0  # always 0: labels other than 0/1 are a DataError

    def line(self) -> str:
        return (f"{self.path} ({self.format}): read {self.read}, kept {self.kept}; dropped: < 2 jets with pT > "
                f"{JET_PTMIN:g} GeV {self.few_jets}, < 2 of them with m >= {JET_MMIN:g} GeV {self.light_jets}, "
                f"signal subsampled {self.signal_dropped}; "
                + ", ".join(f"{n} {c}" for n, c in zip(self.class_names, self.per_class)))

    @classmethod
    def total(cls, reports: list[LhcoReport]) -> LhcoReport:
        sums = {k: sum(getattr(r, k) for r in reports) for k in _COUNTS}
        return cls("total", per_class=[sum(c) for c in zip(*(r.per_class for r in reports))], **sums)


_COUNTS = ("read", "kept", "few_jets", "light_jets", "signal_dropped", "unknown_label")


class SignalSampler:
    """Keeps all background and a seeded random subset of the selected signal events, so that signal is
    `fraction` of the kept events; called on the label chunks of the writing pass, in pass-1 order."""

    def __init__(self, labels: np.ndarray, fraction: float, seed: int) -> None:
        n_sig, n_bkg = int((labels == 1).sum()), int((labels == 0).sum())
        k = int(round(fraction * n_bkg / (1.0 - fraction)))
        if k > n_sig:
            raise DataError(f"--signal-fraction {fraction:g} needs {k} signal events next to {n_bkg} background, but "
                            f"only {n_sig} pass the selection (at most {n_sig / max(n_sig + n_bkg, 1):.4g})")
        self.keep = np.zeros(n_sig, bool)
        self.keep[np.random.default_rng(seed).choice(n_sig, k, replace=False)] = True
        self.num_kept = n_bkg + k
        self._pos = 0

    def __call__(self, label: np.ndarray) -> np.ndarray:
        mask = np.ones(len(label), bool)
        sig = label == 1
        mask[sig] = self.keep[self._pos:self._pos + int(sig.sum())]
        self._pos += int(sig.sum())
        return mask


def _jagged(rows: np.ndarray) -> tuple[ak.Array, ak.Array, ak.Array]:
    """[n, 2100] (pT, eta, phi) columns -> jagged pT, eta, phi of the pT > 0 particles, in file order."""
    p = rows[:, :3 * MAX_PARTICLES].reshape(len(rows), MAX_PARTICLES, 3)
    real = p[..., 0] > 0
    counts = real.sum(axis=1)
    return tuple(ak.unflatten(p[..., k][real], counts) for k in range(3))


def _p4(pt, eta, phi) -> ak.Array:
    """Massless four-momenta, the records FastJet's multi-event interface takes."""
    return ak.zip({"px": pt * np.cos(phi), "py": pt * np.sin(phi), "pz": pt * np.sinh(eta), "E": pt * np.cosh(eta)})


def _kinematics(px, py, pz, e) -> dict[str, np.ndarray]:
    pt = np.hypot(px, py)
    return {"px": px, "py": py, "pz": pz, "e": e, "pt": pt, "eta": np.arcsinh(pz / pt), "phi": np.arctan2(py, px),
            "m": np.sqrt(np.maximum(e**2 - px**2 - py**2 - pz**2, 0.0))}


def _dr(eta, phi, axis_eta, axis_phi):
    return np.sqrt((eta - axis_eta) ** 2 + wrap_phi(phi - axis_phi) ** 2)


def _tau21(pt, eta, phi) -> np.ndarray:
    """tau2/tau1 of each jet from its constituents (jagged), axes the exclusive kt (R = 0.2) subjets, as the
    original; 0 for a one-particle jet (and where tau1 = 0)."""
    out = np.zeros(len(pt))
    multi = np.flatnonzero(ak.num(pt) >= 2)
    if not len(multi):
        return out
    pt, eta, phi = pt[multi], eta[multi], phi[multi]
    fj = fastjet()
    seq = fj.ClusterSequence(_p4(pt, eta, phi), fj.JetDefinition(fj.kt_algorithm, SUBJET_R))
    tau = []
    for n in (1, 2):
        with warnings.catch_warnings():  # fastjet warns about exclusive jets even for kt
            warnings.simplefilter("ignore", UserWarning)
            axes = seq.exclusive_jets(n_jets=n)
        a = _kinematics(*(ak.to_numpy(axes[c]).reshape(-1, n) for c in ("px", "py", "pz", "E")))
        dr = _dr(eta, phi, a["eta"][:, 0], a["phi"][:, 0])
        if n == 2:
            dr = np.minimum(dr, _dr(eta, phi, a["eta"][:, 1], a["phi"][:, 1]))
        tau.append(ak.to_numpy(ak.sum(pt * dr, axis=1) / ak.sum(pt, axis=1)))
    out[multi] = np.divide(tau[1], tau[0], out=np.zeros_like(tau[0]), where=tau[0] > 0)
    return out


def _pad(jagged: ak.Array, num_points: int) -> np.ndarray:
    return ak.to_numpy(ak.fill_none(ak.pad_none(jagged, num_points, axis=1, clip=True), 0))


def _empty(num_points: int) -> dict[str, np.ndarray]:
    return {"x": np.zeros((0, num_points, len(FEATURE_NAMES)), np.float32),
            "target": np.zeros((0, num_points), np.int32), "label": np.zeros(0, np.int32),
            "mass": np.zeros(0, np.float32), "global": np.zeros((0, len(GLOBAL_NAMES)), np.float32)}


def events(rows: np.ndarray, num_points: int = NUM_POINTS) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One chunk of raw rows [n, 2101] -> (the kept events' dataset arrays, per-row drop masks).

    Kept: 2 or more anti-kT R = 1.0 jets with pT > 20 GeV and m >= 10 GeV; the two heaviest give the
    particles (jet 1's then jet 2's, each by decreasing pT, cut or zero-padded to `num_points`), the
    per-particle target (its jet's mass bin, 0 on padding), the globals and the dijet mass.
    """
    pt, eta, phi = _jagged(rows)
    fj = fastjet()
    seq = fj.ClusterSequence(_p4(pt, eta, phi), fj.JetDefinition(fj.antikt_algorithm, JET_R))
    jets, const = seq.inclusive_jets(JET_PTMIN), seq.constituent_index(JET_PTMIN)
    jm = _kinematics(*(jets[c] for c in ("px", "py", "pz", "E")))["m"]
    by_mass = ak.argsort(jm, axis=1, ascending=False, stable=True)
    heavy = by_mass[jm[by_mass] >= JET_MMIN]
    few = ak.to_numpy(ak.num(jets)) < 2
    ok = ak.to_numpy(ak.num(heavy)) >= 2
    drops = {"few_jets": few, "light_jets": ~few & ~ok}
    sel = np.flatnonzero(ok)
    if not len(sel):
        return _empty(num_points), drops
    top2 = heavy[sel][:, :2]
    j = _kinematics(*(ak.to_numpy(jets[sel][top2][c]) for c in ("px", "py", "pz", "E")))  # [s, 2] each
    cols, target, glob = [], [], []
    for k in range(2):
        idx = const[sel][top2][:, k]
        order = ak.argsort(pt[sel][idx], axis=1, ascending=False, stable=True)
        ppt, peta, pphi = (v[sel][idx][order] for v in (pt, eta, phi))
        pe = ppt * np.cosh(peta)
        deta = peta - j["eta"][:, k]
        dphi = -wrap_phi(j["phi"][:, k] - pphi)  # in (-pi, pi]
        cols.append([deta, dphi, np.log(ppt / j["pt"][:, k]), np.log(pe / j["e"][:, k]), np.log(ppt), np.log(pe),
                     np.sqrt(deta**2 + dphi**2)])
        target.append(ak.ones_like(ppt, dtype=np.int32) * anomaly_mass_bin(j["m"][:, k]))
        glob += [np.log(j["m"][:, k]), _tau21(ppt, peta, pphi)]
    x = np.stack([_pad(ak.concatenate([a, b], axis=1), num_points) for a, b in zip(*cols)], axis=-1)
    dijet = _kinematics(*(j[c].sum(axis=1) for c in ("px", "py", "pz", "e")))["m"]
    return ({"x": x.astype(np.float32), "target": _pad(ak.concatenate(target, axis=1), num_points).astype(np.int32),
             "label": rows[sel, -1].astype(np.int32), "mass": dijet.astype(np.float32),
             "global": np.stack(glob, axis=1).astype(np.float32)}, drops)


def _check(rows: np.ndarray, path, start: int) -> None:
    """Non-finite values, negative pT or labels other than 0/1 make the file unusable: name the first row."""
    pt = rows[:, :3 * MAX_PARTICLES:3]
    bad = ~np.isfinite(rows).all(axis=1) | (pt < 0).any(axis=1) | ~np.isin(rows[:, -1], (0, 1))
    if bad.any():
        r = int(np.argmax(bad))
        what = ("a non-finite value" if not np.isfinite(rows[r]).all() else "a negative pT" if (pt[r] < 0).any()
                else f"label {rows[r, -1]:g} (expected 0 or 1)")
        raise DataError(f"{path}: row {start + r} of {KEY} has {what}")


def read_chunks(f: h5py.File, path, rep: LhcoReport, chunk: int, sampler: SignalSampler | None = None
                ) -> Iterator[dict[str, np.ndarray]]:
    """The kept events of one file, `chunk` rows at a time, counted in `rep` (progress on stderr)."""
    d = f[KEY]
    bar = Progress(d.shape[0], "events", f"{path}:")
    for s in range(0, d.shape[0], chunk):
        rows = np.asarray(d[s:s + chunk], np.float64)
        _check(rows, path, s)
        a, drops = events(rows, rep.num_points)
        rep.read += len(rows)
        for k, v in drops.items():
            setattr(rep, k, getattr(rep, k) + int(v.sum()))
        if sampler is not None:
            keep = sampler(a["label"])
            rep.signal_dropped += int((~keep).sum())
            a = {k: v[keep] for k, v in a.items()}
        bar.update(rep.read)
        yield a
    bar.close()
