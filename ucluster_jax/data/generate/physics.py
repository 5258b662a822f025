"""Pythia 8 + FastJet (imported on first use): events to jets, jets to hls4ml rows."""
from __future__ import annotations

import math

import numpy as np

from ucluster_jax.data.features import constituents_to_hls4ml, wrap_phi
from ucluster_jax.data.generate.spec import (
    GenConfig, INSTALL_HINT, JET_FEATURE_NAMES, MAX_CONSTITUENTS, PROCESSES, _JET_COL,
)
from ucluster_jax.data.fastjet_quiet import fastjet
from ucluster_jax.errors import UserError


def import_backends():
    """Import pythia8mc and fastjet (its banner silenced), or raise UserError naming the optional extra."""
    try:
        import pythia8mc  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"`ucluster generate` needs pythia8mc ({e.name or e} is missing): {INSTALL_HINT}") from None
    return pythia8mc, fastjet()


def check_pythia_settings(config: GenConfig) -> None:
    """Have Pythia parse every setting of every requested process (no initialisation)."""
    pythia8mc, _ = import_backends()
    pythia = pythia8mc.Pythia("", False)  # one instance: only the parsing is checked here
    for process in config.processes:
        _read_settings(pythia, config.pythia_strings(process, 1))


def _read_settings(pythia, settings: list[str]) -> None:
    for s in settings:
        if not pythia.readString(s):
            raise UserError(f"Pythia rejected the setting {s!r}")


def start_pythia(settings: list[str], process: str):
    """A Pythia instance with these settings, initialised (UserError if Pythia refuses)."""
    pythia8mc, _ = import_backends()
    pythia = pythia8mc.Pythia("", False)
    _read_settings(pythia, settings)
    if not pythia.init():
        raise UserError(f"Pythia initialisation failed for process {process!r} (check --pythia settings)")
    return pythia


def select_particles(p4: np.ndarray, config, rng: np.random.Generator) -> np.ndarray:
    """Optional energy smearing, then the pT threshold and |eta| acceptance of `config` (either
    GenConfig or EventConfig) on visible particles' (px, py, pz, E) [M,4]."""
    if config.smear > 0 and len(p4):
        sigma = config.smear / np.sqrt(np.maximum(p4[:, 3], 1e-12))
        p4 = p4 * np.maximum(1.0 + sigma * rng.standard_normal(len(p4)), 0.0)[:, None]
    pt = np.hypot(p4[:, 0], p4[:, 1])
    keep = pt > max(config.pt_threshold, 1e-9)
    p4, pt = p4[keep], pt[keep]
    return p4[np.abs(np.arcsinh(p4[:, 2] / pt)) < config.particle_eta_max]


def cluster(fastjet, p4: np.ndarray, jetdef):
    """Jets of particles p4 [M,4], hardest first, and their ClusterSequence (which must outlive
    any use of the jets' constituents); each constituent's user_index is its row in p4."""
    pjs = []
    for k, (px, py, pz, e) in enumerate(p4.tolist()):
        pj = fastjet.PseudoJet(px, py, pz, e)
        pj.set_user_index(k)
        pjs.append(pj)
    cs = fastjet.ClusterSequence(pjs, jetdef)
    return fastjet.sorted_by_pt(cs.inclusive_jets()), cs


def constituent_features(p4: np.ndarray, max_constituents: int = MAX_CONSTITUENTS):
    """hls4ml per-particle features of one jet from its constituents' (px, py, pz, E) [M,4].

    Returns (features [max_constituents,16] float32 in PARTICLE_FEATURE_NAMES order, sorted by pT
    and zero-padded; jet (pt, eta, phi, mass, multiplicity)). The jet is the E-scheme sum of all
    M constituents (also those beyond max_constituents): `features.constituents_to_hls4ml`.
    """
    p4 = np.asarray(p4, dtype=np.float64)
    order = np.argsort(-np.hypot(p4[:, 0], p4[:, 1]), kind="stable")[:max_constituents]
    kept = np.zeros((1, max_constituents, 4))
    kept[0, : len(order)] = p4[order]
    const, jet = constituents_to_hls4ml(*kept.transpose(2, 0, 1), jet_p4=p4.sum(axis=0)[None])
    return const[0], (jet["pt"][0], jet["eta"][0], jet["phi"][0], jet["mass"][0], int(p4.shape[0]))


def jet_row(process: str, pt: float, eta: float, mass: float, multiplicity: int) -> np.ndarray:
    row = np.zeros(len(JET_FEATURE_NAMES), dtype=np.float32)
    row[_JET_COL["j_pt"]] = pt
    row[_JET_COL["j_eta"]] = eta
    row[_JET_COL["j_mass"]] = mass
    row[_JET_COL["j_multiplicity"]] = multiplicity
    row[_JET_COL[PROCESSES[process].onehot]] = 1.0
    return row


def _decays_to_quarks(ev, p) -> bool:
    """A W/Z decays to quarks; a top's W does (followed through its recoil copies)."""
    daughters = [ev[d] for d in p.daughterList()]
    if p.idAbs() == 6:
        w = [d for d in daughters if d.idAbs() == 24]
        if not w:
            return False
        last = ev[w[0].iBotCopyId()]
        daughters = [ev[d] for d in last.daughterList()]
    return bool(daughters) and all(1 <= d.idAbs() <= 5 for d in daughters)


class JetSimulator:
    """One Pythia instance for one process; `next_event()` returns the event's selected jets."""

    def __init__(self, process: str, config: GenConfig, seed: int, rng: np.random.Generator):
        _, fastjet = import_backends()
        self.fastjet = fastjet
        self.spec = PROCESSES[process]
        self.process = process
        self.config = config
        self.rng = rng
        self.pythia = start_pythia(config.pythia_strings(process, seed), process)
        self.jetdef = fastjet.JetDefinition(fastjet.antikt_algorithm, config.jet_r)
        self.failed = 0

    def _read_event(self):
        ev = self.pythia.event
        parts = ev.particles()  # one list: cheaper than ev[i] per particle
        final = []
        candidates = []
        ids = self.spec.truth_ids
        for i, p in enumerate(parts):
            if p.isFinal():
                if p.isVisible():
                    final.append(p)
            elif p.idAbs() in ids:
                candidates.append(i)
        vis = [(p.px(), p.py(), p.pz(), p.e()) for p in final]
        truth: list[tuple[float, float]] = []
        for i in candidates:
            p = ev[i]  # the event's own particle: history methods need its event pointer
            if self.spec.resonance:
                if p.iBotCopyId() != i:
                    continue  # not the last copy (the one that decays)
                if not _decays_to_quarks(ev, p):
                    continue  # leptonic decay (not with the default decay settings)
            elif p.statusAbs() != 23:
                continue  # not an outgoing parton of the hard process
            truth.append((p.eta(), p.phi()))
        return np.asarray(vis, dtype=np.float64).reshape(-1, 4), truth

    def next_event(self) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """Generate one event; None if Pythia failed on it, else its (constituents, jet row) pairs."""
        if not self.pythia.next():
            self.failed += 1
            return None
        cfg = self.config
        p4, truth = self._read_event()
        p4 = select_particles(p4, cfg, self.rng)
        if not truth or len(p4) == 0:
            return []
        jets, cs = cluster(self.fastjet, p4, self.jetdef)  # cs keeps the constituents valid
        jets = jets[:2]
        out = []
        used: set[int] = set()
        for jet in jets:
            jpt, jeta = jet.pt(), jet.eta()
            if not (cfg.pt_min < jpt < cfg.pt_max and abs(jeta) < cfg.jet_eta_max):
                continue
            jphi = jet.phi()
            best, best_dr = -1, cfg.match_dr
            for t, (teta, tphi) in enumerate(truth):
                if t in used:
                    continue
                dr = math.hypot(jeta - teta, float(wrap_phi(jphi - tphi)))
                if dr < best_dr:
                    best, best_dr = t, dr
            if best < 0:
                continue
            used.add(best)
            idx = [c.user_index() for c in jet.constituents()]
            feats, (cpt, ceta, _, cmass, mult) = constituent_features(p4[idx])
            out.append((feats, jet_row(self.process, cpt, ceta, cmass, mult)))
        return out
