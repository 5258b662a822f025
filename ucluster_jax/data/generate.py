"""`ucluster generate`: simulated boosted W, Z and top jets (optionally light-quark and gluon jets).

Pythia 8 (13 TeV pp) + FastJet (anti-kT R=0.8) on the visible final state, written in the hls4ml
raw layout of SPEC section 1 (`jetConstituentList` [N,100,16], `jets` [N,59] and the two name
arrays), one HDF5 file per completed chunk, or as parquet shards. See docs/GENERATE.md.

Work is split into chunks (default 1000 jets, mixed over the requested processes). Every chunk
starts fresh Pythia instances seeded from (seed, rank, chunk, process), so a chunk's content
depends only on those and the settings: the same command gives identical files, and a rerun after
an interruption skips the chunks already written and regenerates exactly the missing ones.
Each chunk file is written under a hidden temporary name and renamed when complete.

pythia8mc and fastjet are an optional extra (`pip install 'ucluster-jax[generate]'`) and are
imported only inside the functions that need them.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ucluster_jax.errors import UserError
from ucluster_jax.progress import Progress

INSTALL_HINT = "pip install 'ucluster-jax[generate]'"
PYTHIA_SEED_MAX = 900_000_000  # Pythia accepts Random:seed in 0..900_000_000; 0 means "from the clock"
MAX_CONSTITUENTS = 100

# hls4ml jet dataset column names, in file order (SPEC section 1 indices: j_ptfrac 0, j_pt 1,
# j_eta 2, j_mass 3, j_zlogz 12, j_c1_b0 13, j_multiplicity 52, j_g..j_undef 53..58).
JET_FEATURE_NAMES: tuple[str, ...] = (
    "j_ptfrac", "j_pt", "j_eta", "j_mass",
    "j_tau1_b1", "j_tau2_b1", "j_tau3_b1", "j_tau1_b2", "j_tau2_b2", "j_tau3_b2",
    "j_tau32_b1", "j_tau32_b2", "j_zlogz",
    "j_c1_b0", "j_c1_b1", "j_c1_b2", "j_c2_b1", "j_c2_b2",
    "j_d2_b1", "j_d2_b2", "j_d2_a1_b1", "j_d2_a1_b2", "j_m2_b1", "j_m2_b2", "j_n2_b1", "j_n2_b2",
    "j_tau1_b1_mmdt", "j_tau2_b1_mmdt", "j_tau3_b1_mmdt", "j_tau1_b2_mmdt", "j_tau2_b2_mmdt",
    "j_tau3_b2_mmdt", "j_tau32_b1_mmdt", "j_tau32_b2_mmdt",
    "j_c1_b0_mmdt", "j_c1_b1_mmdt", "j_c1_b2_mmdt", "j_c2_b1_mmdt", "j_c2_b2_mmdt",
    "j_d2_b1_mmdt", "j_d2_b2_mmdt", "j_d2_a1_b1_mmdt", "j_d2_a1_b2_mmdt",
    "j_m2_b1_mmdt", "j_m2_b2_mmdt", "j_n2_b1_mmdt", "j_n2_b2_mmdt",
    "j_mass_trim", "j_mass_mmdt", "j_mass_prun", "j_mass_sdb2", "j_mass_sdm1",
    "j_multiplicity", "j_g", "j_q", "j_w", "j_z", "j_t", "j_undef",
)
assert len(JET_FEATURE_NAMES) == 59

PARTICLE_FEATURES: tuple[str, ...] = (
    "px", "py", "pz", "e", "erel", "pt", "ptrel", "eta", "etarel", "etarot",
    "phi", "phirel", "phirot", "deltaR", "costheta", "costhetarel",
)
PARTICLE_FEATURE_NAMES: tuple[str, ...] = tuple("j1_" + n for n in PARTICLE_FEATURES)

_JET_COL = {n: i for i, n in enumerate(JET_FEATURE_NAMES)}


@dataclass(frozen=True)
class ProcessSpec:
    """One jet class: the Pythia processes that make it and how its jets are truth-matched."""

    name: str
    label: int  # class index: 0=W, 1=Z, 2=top (SPEC), 3=q, 4=g (extra classes)
    onehot: str  # hls4ml one-hot truth column
    settings: tuple[str, ...]
    truth_ids: tuple[int, ...]  # |PDG id| of the object a jet must be matched to
    resonance: bool  # True: last copy of a hadronically decaying W/Z/top; False: outgoing hard parton


_HADRONIC_W = ("24:onMode = off", "24:onIfAny = 1 2 3 4 5")
PROCESSES: dict[str, ProcessSpec] = {
    "w": ProcessSpec("w", 0, "j_w", ("WeakDoubleBoson:ffbar2WW = on",) + _HADRONIC_W, (24,), True),
    "z": ProcessSpec(
        "z", 1, "j_z",
        ("WeakDoubleBoson:ffbar2gmZgmZ = on", "WeakZ0:gmZmode = 2", "23:onMode = off",
         "23:onIfAny = 1 2 3 4 5"),
        (23,), True),
    "top": ProcessSpec("top", 2, "j_t", ("Top:gg2ttbar = on", "Top:qqbar2ttbar = on") + _HADRONIC_W,
                       (6,), True),
    "q": ProcessSpec("q", 3, "j_q",
                     ("HardQCD:qq2qq = on", "HardQCD:qqbar2qqbarNew = on", "HardQCD:gg2qqbar = on"),
                     (1, 2, 3), False),
    "g": ProcessSpec("g", 4, "j_g", ("HardQCD:gg2gg = on", "HardQCD:qqbar2gg = on"), (21,), False),
}
PROCESS_ORDER: tuple[str, ...] = ("w", "z", "top", "q", "g")  # fixed: seeds use the index here
LABELS: dict[str, int] = {k: v.label for k, v in PROCESSES.items()}


@dataclass(frozen=True)
class GenConfig:
    """Physics and selection settings (the defaults are documented in docs/GENERATE.md)."""

    processes: tuple[str, ...] = ("w", "z", "top")
    pt_min: float = 850.0  # jet pT window [GeV]
    pt_max: float = 1250.0
    pthat_min: float | None = None  # None: pt_min + 100 (see pthat_window)
    pthat_max: float | None = None  # None: pt_max - 100
    jet_eta_max: float = 2.5
    jet_r: float = 0.8
    match_dr: float = 0.6
    pt_threshold: float = 1.0  # constituent pT threshold [GeV]
    particle_eta_max: float = 4.0  # constituent acceptance |eta|
    smear: float = 0.0  # stochastic energy resolution a in sigma_E/E = a/sqrt(E/GeV); 0 = off
    ecm: float = 13000.0
    pythia_settings: tuple[str, ...] = ()  # extra "Key = value" strings, applied last

    def pthat_window(self) -> tuple[float, float]:
        lo, hi = self.pt_min + 100.0, self.pt_max - 100.0
        if hi - lo < 100.0:  # narrow jet window: generate over the window itself
            lo, hi = self.pt_min, self.pt_max
        if self.pthat_min is not None:
            lo = self.pthat_min
        if self.pthat_max is not None:
            hi = self.pthat_max
        return lo, hi

    def validate(self) -> None:
        bad = [p for p in self.processes if p not in PROCESSES]
        if bad or not self.processes:
            raise UserError(f"unknown process(es) {bad or '(none)'}; choose from {','.join(PROCESS_ORDER)}")
        if len(set(self.processes)) != len(self.processes):
            raise UserError(f"process listed twice: {','.join(self.processes)}")
        if not 0 <= self.pt_min < self.pt_max:
            raise UserError(f"need 0 <= --pt-min < --pt-max, got {self.pt_min} and {self.pt_max}")
        lo, hi = self.pthat_window()
        if not 0 <= lo < hi:
            raise UserError(f"need 0 <= pTHatMin < pTHatMax, got {lo} and {hi}")
        if self.pt_threshold < 0 or self.particle_eta_max <= 0 or self.jet_eta_max <= 0:
            raise UserError("--pt-threshold must be >= 0 and the eta limits > 0")
        if self.smear < 0:
            raise UserError(f"--smear must be >= 0, got {self.smear}")
        if self.jet_r <= 0 or self.match_dr <= 0:
            raise UserError("jet radius and matching radius must be > 0")

    def pythia_strings(self, process: str, pythia_seed: int) -> list[str]:
        lo, hi = self.pthat_window()
        return [
            f"Beams:eCM = {self.ecm:g}",
            *PROCESSES[process].settings,
            f"PhaseSpace:pTHatMin = {lo:g}",
            f"PhaseSpace:pTHatMax = {hi:g}",
            "Random:setSeed = on",
            f"Random:seed = {pythia_seed}",
            "Print:quiet = on",
            *self.pythia_settings,
        ]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["processes"] = list(self.processes)
        d["pythia_settings"] = list(self.pythia_settings)
        d["pthat_window"] = list(self.pthat_window())
        return d


# ----------------------------------------------------------------------------------- backends

def import_backends():
    """Import pythia8mc and fastjet, or raise UserError naming the optional extra."""
    try:
        import fastjet  # noqa: F401
        import pythia8mc  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"`ucluster generate` needs pythia8mc and fastjet ({e.name or e} is missing): "
            f"{INSTALL_HINT}") from None
    _silence_fastjet_banner(fastjet)
    return pythia8mc, fastjet


_BANNER_SILENCED = False


def _silence_fastjet_banner(fastjet) -> None:
    """FastJet prints a banner on stdout at its first clustering: do that first one into /dev/null."""
    global _BANNER_SILENCED
    if _BANNER_SILENCED:
        return
    _BANNER_SILENCED = True
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - non-glibc platform: live with the banner
        libc = None
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        cs = fastjet.ClusterSequence([fastjet.PseudoJet(1.0, 0.0, 0.0, 1.0)],
                                     fastjet.JetDefinition(fastjet.antikt_algorithm, 0.8))
        cs.inclusive_jets()
        if libc is not None:
            libc.fflush(None)
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def check_pythia_settings(config: GenConfig) -> None:
    """Have Pythia parse every setting of every requested process (no initialisation)."""
    pythia8mc, _ = import_backends()
    pythia = pythia8mc.Pythia("", False)  # one instance: only the parsing is checked here
    for process in config.processes:
        for s in config.pythia_strings(process, 1):
            if not pythia.readString(s):
                raise UserError(f"Pythia rejected the setting {s!r}")


def pythia_seed(seed: int, rank: int, chunk: int, process: str) -> int:
    """Pythia seed in 1..900_000_000 for one (run seed, rank, chunk, process); never 0 (= clock)."""
    code = PROCESS_ORDER.index(process)
    state = np.random.SeedSequence([seed, rank, chunk, code]).generate_state(2, np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) % PYTHIA_SEED_MAX) + 1


def _aux_rng(seed: int, rank: int, chunk: int, code: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, rank, chunk, 100 + code]))


# ----------------------------------------------------------------------------------- physics

def _wrap_phi(dphi: np.ndarray | float):
    return (np.asarray(dphi) + np.pi) % (2.0 * np.pi) - np.pi


def constituent_features(p4: np.ndarray, max_constituents: int = MAX_CONSTITUENTS):
    """hls4ml per-particle features of one jet from its constituents' (px, py, pz, E) [M,4].

    Returns (features [max_constituents,16] float32 in PARTICLE_FEATURE_NAMES order, sorted by pT
    and zero-padded; jet (pt, eta, phi, mass, multiplicity)). The jet is the E-scheme sum of all
    M constituents (also those beyond max_constituents). etarot/phirot are not rotated: they repeat
    etarel/phirel (the project reads only etarel, phirel, ptrel, deltaR, e, erel, pt, costhetarel).
    """
    p4 = np.asarray(p4, dtype=np.float64)
    jpx, jpy, jpz, je = p4.sum(axis=0)
    jpt = math.hypot(jpx, jpy)
    jp = math.sqrt(jpt * jpt + jpz * jpz)
    jeta = math.asinh(jpz / jpt)
    jphi = math.atan2(jpy, jpx)
    jmass = math.sqrt(max(je * je - jp * jp, 0.0))
    jcos = jpz / jp

    px, py, pz, e = p4.T
    pt = np.hypot(px, py)
    order = np.argsort(-pt, kind="stable")[:max_constituents]
    px, py, pz, e, pt = px[order], py[order], pz[order], e[order], pt[order]
    p = np.sqrt(pt * pt + pz * pz)
    eta = np.arcsinh(pz / pt)
    phi = np.arctan2(py, px)
    etarel = eta - jeta
    phirel = _wrap_phi(phi - jphi)
    costheta = pz / p
    cols = {
        "px": px, "py": py, "pz": pz, "e": e, "erel": e / je, "pt": pt, "ptrel": pt / jpt,
        "eta": eta, "etarel": etarel, "etarot": etarel, "phi": phi, "phirel": phirel,
        "phirot": phirel, "deltaR": np.hypot(etarel, phirel), "costheta": costheta,
        "costhetarel": costheta - jcos,
    }
    out = np.zeros((max_constituents, len(PARTICLE_FEATURES)), dtype=np.float32)
    out[: len(order)] = np.stack([cols[n] for n in PARTICLE_FEATURES], axis=1)
    return out, (jpt, jeta, jphi, jmass, int(p4.shape[0]))


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
        pythia8mc, fastjet = import_backends()
        self.fastjet = fastjet
        self.spec = PROCESSES[process]
        self.process = process
        self.config = config
        self.rng = rng
        self.pythia = pythia8mc.Pythia("", False)
        for s in config.pythia_strings(process, seed):
            if not self.pythia.readString(s):
                raise UserError(f"Pythia rejected the setting {s!r}")
        if not self.pythia.init():
            raise UserError(f"Pythia initialisation failed for process {process!r} (check --pythia settings)")
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
        if cfg.smear > 0 and len(p4):
            sigma = cfg.smear / np.sqrt(np.maximum(p4[:, 3], 1e-12))
            p4 = p4 * np.maximum(1.0 + sigma * self.rng.standard_normal(len(p4)), 0.0)[:, None]
        pt = np.hypot(p4[:, 0], p4[:, 1])
        keep = pt > max(cfg.pt_threshold, 1e-9)
        p4, pt = p4[keep], pt[keep]
        keep = np.abs(np.arcsinh(p4[:, 2] / pt)) < cfg.particle_eta_max
        p4 = p4[keep]
        if not truth or len(p4) == 0:
            return []
        fj = self.fastjet
        pjs = []
        for k, (px, py, pz, e) in enumerate(p4.tolist()):
            pj = fj.PseudoJet(px, py, pz, e)
            pj.set_user_index(k)
            pjs.append(pj)
        cs = fj.ClusterSequence(pjs, self.jetdef)
        jets = fj.sorted_by_pt(cs.inclusive_jets())[:2]
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
                dr = math.hypot(jeta - teta, float(_wrap_phi(jphi - tphi)))
                if dr < best_dr:
                    best, best_dr = t, dr
            if best < 0:
                continue
            used.add(best)
            idx = [c.user_index() for c in jet.constituents()]
            feats, (cpt, ceta, _, cmass, mult) = constituent_features(p4[idx])
            out.append((feats, jet_row(self.process, cpt, ceta, cmass, mult)))
        return out


# ----------------------------------------------------------------------------------- chunks

@dataclass(frozen=True)
class Chunk:
    rank: int
    index: int
    quotas: dict  # process -> jets (mode "jets") or events (mode "events")

    def key(self, job: "Job") -> dict:
        """Everything the chunk's content depends on (stored in the file; resume compares it)."""
        return {
            "format_version": 1,
            "seed": job.seed,
            "rank": self.rank,
            "chunk": self.index,
            "mode": job.mode,
            "quotas": {p: self.quotas[p] for p in job.config.processes},
            "config": job.config.to_json(),
        }


@dataclass(frozen=True)
class Job:
    """A whole generation run: what to make and where."""

    out_dir: Path
    seed: int
    mode: str  # "jets" or "events"
    total: int
    world: int
    config: GenConfig
    chunk_size: int = 1000

    def chunks(self, rank: int) -> list[Chunk]:
        n = self.total // self.world + (rank < self.total % self.world)
        sizes = [self.chunk_size] * (n // self.chunk_size)
        if n % self.chunk_size:
            sizes.append(n % self.chunk_size)
        procs = self.config.processes
        P = len(procs)
        chunks = []
        for c, size in enumerate(sizes):
            extra = size % P
            quotas = {p: size // P + (((i - c - rank) % P) < extra) for i, p in enumerate(procs)}
            chunks.append(Chunk(rank, c, quotas))
        return chunks

    def path(self, chunk: Chunk) -> Path:
        return self.out_dir / f"shard-{chunk.rank:04d}-{chunk.index:04d}.h5"


def generate_chunk(job: Job, chunk: Chunk,
                   on_event: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Simulate one chunk: (constituents [N,100,16], jets [N,59], stats), rows shuffled."""
    cfg = job.config
    consts, rows = [], []
    stats = {"events": {}, "jets": {}, "failed_events": {}}
    for process in cfg.processes:
        quota = chunk.quotas[process]
        if quota == 0:
            stats["events"][process] = stats["jets"][process] = stats["failed_events"][process] = 0
            continue
        code = PROCESS_ORDER.index(process)
        sim = JetSimulator(process, cfg, pythia_seed(job.seed, chunk.rank, chunk.index, process),
                           _aux_rng(job.seed, chunk.rank, chunk.index, code))
        events = jets = 0
        while True:
            if job.mode == "events" and events >= quota:
                break
            if job.mode == "jets" and jets >= quota:
                break
            if job.mode == "jets" and events >= 1000 + 50 * quota and jets < quota:
                raise UserError(
                    f"process {process}: only {jets} jets passed the selection in {events} events; "
                    f"check --pt-min/--pt-max against the pTHat window {cfg.pthat_window()}")
            if sim.failed > 100 + events // 10:
                raise UserError(f"process {process}: Pythia failed on {sim.failed} events")
            res = sim.next_event()
            if res is None:
                continue
            events += 1
            if job.mode == "jets":
                res = res[: quota - jets]
            for f, r in res:
                consts.append(f)
                rows.append(r)
            jets += len(res)
            if on_event is not None:
                on_event(len(res))
        stats["events"][process] = events
        stats["jets"][process] = jets
        stats["failed_events"][process] = sim.failed
        del sim
    if consts:
        c = np.stack(consts).astype(np.float32)
        j = np.stack(rows).astype(np.float32)
    else:
        c = np.zeros((0, MAX_CONSTITUENTS, len(PARTICLE_FEATURES)), np.float32)
        j = np.zeros((0, len(JET_FEATURE_NAMES)), np.float32)
    perm = _aux_rng(job.seed, chunk.rank, chunk.index, 99).permutation(len(j))
    return c[perm], j[perm], stats


# ----------------------------------------------------------------------------------- files

def _names(names) -> np.ndarray:
    return np.array([n.encode() for n in names])  # fixed-length bytes, as the hls4ml files


def write_h5_atomic(path: Path, constituents: np.ndarray, jets: np.ndarray,
                    attrs: dict | None = None) -> None:
    """Write one hls4ml-layout file under a hidden temporary name, then rename it into place."""
    import h5py

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w", track_order=False) as f:
            kw = dict(compression="gzip", compression_opts=4, track_times=False)
            f.create_dataset("jetConstituentList", data=constituents.astype(np.float32),
                             chunks=(max(1, min(len(jets), 256)), MAX_CONSTITUENTS, len(PARTICLE_FEATURES))
                             if len(jets) else None, **kw)
            f.create_dataset("jets", data=jets.astype(np.float32), **kw)
            f.create_dataset("jetFeatureNames", data=_names(JET_FEATURE_NAMES), track_times=False)
            f.create_dataset("particleFeatureNames", data=_names(PARTICLE_FEATURE_NAMES), track_times=False)
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def read_chunk_key(path: Path) -> dict | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("ucluster_generate_key")
            return json.loads(raw) if raw is not None else None
    except (OSError, ValueError):
        return None


def read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(jetConstituentList, jets) of one file written here (or any hls4ml-layout file)."""
    import h5py

    with h5py.File(path, "r") as f:
        return f["jetConstituentList"][:], f["jets"][:]


# ----------------------------------------------------------------------------------- ranks

def mpi_rank_size() -> tuple[int, int]:
    """(rank, size) under mpirun/mpiexec (Open MPI, MPICH/Hydra, PMIx), else (0, 1). No MPI init."""
    for r, s in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                 ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE"), ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE")):
        if os.environ.get(r) is not None and os.environ.get(s) is not None:
            try:
                return int(os.environ[r]), int(os.environ[s])
            except ValueError:
                pass
    return 0, 1


def _run_ranks(job: Job, ranks: list[int], overwrite: bool,
               report: Callable[[str, object], None]) -> None:
    """Generate all chunks of the given ranks in this process, reporting through `report`:
    ("event", jets) per event, ("chunk", info dict) per finished or skipped chunk."""
    for rank in ranks:
        for chunk in job.chunks(rank):
            path = job.path(chunk)
            key = chunk.key(job)
            if path.exists():
                old = read_chunk_key(path)
                if old == key:
                    report("chunk", {"path": str(path), "skipped": True, "jets": None})
                    continue
                if not overwrite:
                    raise UserError(f"{path} exists from a different run (other seed or settings); "
                                    "use --overwrite or another --out")
            c, j, stats = generate_chunk(job, chunk, on_event=lambda n: report("event", n))
            attrs = {
                "ucluster_generate_key": json.dumps(key, sort_keys=True),
                "ucluster_generate_stats": json.dumps(stats, sort_keys=True),
            }
            write_h5_atomic(path, c, j, attrs)
            report("chunk", {"path": str(path), "skipped": False, "jets": len(j), "stats": stats})


def _prepare_out_dir(job: Job, ranks: list[int], overwrite: bool, check_all_ranks: bool) -> None:
    """Remove temporary files a killed run of these ranks left behind; refuse (or, with --overwrite,
    remove) shard files that are not part of this run, so the folder holds exactly this run."""
    for rank in ranks:
        for p in job.out_dir.glob(f".shard-{rank:04d}-*.h5.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    wanted = {job.path(c) for r in ranks for c in job.chunks(r)}
    mine = {p for r in ranks for p in job.out_dir.glob(f"shard-{r:04d}-*.h5")}
    if check_all_ranks:  # also shards of ranks this run does not have (an earlier, wider run)
        for p in job.out_dir.glob("shard-*-*.h5"):
            with contextlib.suppress(ValueError, IndexError):
                if int(p.name.split("-")[1]) >= job.world:
                    mine.add(p)
    foreign = sorted(mine - wanted)
    if foreign and not overwrite:
        raise UserError(f"{job.out_dir} holds {len(foreign)} shard file(s) that are not part of this run "
                        f"(e.g. {foreign[0].name}); use --overwrite or another --out")
    for p in foreign:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _sigterm_to_interrupt(signum, frame):  # pragma: no cover - exercised via subprocess
    raise KeyboardInterrupt


def _worker_main(job: Job, ranks: list[int], overwrite: bool, queue) -> None:
    """Body of a --workers subprocess: generate its ranks, send progress to the parent."""
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    signal.signal(signal.SIGINT, _sigterm_to_interrupt)
    pending = [0, 0]  # events, jets not yet sent
    last = [time.monotonic()]

    def report(kind, payload):
        if kind == "event":
            pending[0] += 1
            pending[1] += payload
            now = time.monotonic()
            if now - last[0] > 0.25:
                queue.put(("progress", tuple(pending)))
                pending[0] = pending[1] = 0
                last[0] = now
        else:
            if pending[0]:
                queue.put(("progress", tuple(pending)))
                pending[0] = pending[1] = 0
            queue.put(("chunk", payload))

    try:
        _run_ranks(job, ranks, overwrite, report)
        message = ("done", None)
    except KeyboardInterrupt:
        message = ("interrupted", None)
    except UserError as e:
        message = ("error", str(e))
    except BaseException as e:  # noqa: BLE001 - forwarded to the parent
        message = ("error", f"{type(e).__name__}: {e}")
    # nothing left to clean up: a late SIGTERM/SIGINT may end the process quietly
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    queue.put(message)
    queue.close()
    if message[0] == "interrupted":
        queue.cancel_join_thread()  # the parent may have stopped reading: do not block on exit
    else:
        queue.join_thread()


@dataclass
class GenerateResult:
    out: Path
    files: list[Path] = field(default_factory=list)  # chunk files (or the merged file)
    jets: int = 0  # jets written by this call (skipped chunks not counted)
    events: int = 0
    seconds: float = 0.0
    skipped_chunks: int = 0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def generate(out: str | Path, *, jets: int | None = None, events: int | None = None, seed: int = 0,
             config: GenConfig = GenConfig(), workers: int = 1, chunk_size: int = 1000,
             fmt: str = "h5", overwrite: bool = False, progress: bool = True) -> GenerateResult:
    """Simulate jets and write them under `out` (see the module docstring and docs/GENERATE.md).

    `out` is a folder of chunk files `shard-<rank>-<chunk>.h5`; a path ending in .h5/.hdf5 gives
    one merged file instead (chunks are kept in `<out>.parts/` until the merge). Exactly one of
    `jets` (total jets, split evenly over processes) or `events` (total Pythia events, likewise)
    is required. Under mpirun each MPI rank does its share; `workers` subprocesses split each
    rank's share further (shard rank = mpi_rank * workers + worker).
    """
    config.validate()
    if (jets is None) == (events is None):
        raise UserError("give exactly one of --jets N or --events N")
    total = jets if jets is not None else events
    if total is None or total < 1:
        raise UserError(f"--jets/--events must be >= 1, got {total}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if chunk_size < 1:
        raise UserError(f"--chunk must be >= 1, got {chunk_size}")
    if fmt not in ("h5", "parquet"):
        raise UserError(f"--format must be h5 or parquet, got {fmt!r}")
    check_pythia_settings(config)  # fail early: missing extra, or a setting Pythia does not know

    out = Path(out)
    mpi_rank, mpi_size = mpi_rank_size()
    merge_to: Path | None = None
    if fmt == "h5" and out.suffix.lower() in (".h5", ".hdf5"):
        if mpi_size > 1:
            raise UserError("under mpirun --out must be a folder (each rank writes its own shards)")
        merge_to = out
        out_dir = out.with_name(out.name + ".parts")
        if out.exists() and not overwrite:
            raise UserError(f"{out} exists; use --overwrite or another --out")
    elif fmt == "parquet":
        if mpi_size > 1:
            raise UserError("--format parquet writes one dataset from one process: use --workers, or "
                            "generate h5 under mpirun and convert with `ucluster prepare`")
        extra = [p for p in config.processes if PROCESSES[p].label > 2]
        if extra:
            raise UserError(f"the parquet dataset holds W/Z/top only; {','.join(extra)} jets need --format h5")
        if out.is_dir() and any(out.glob("*.parquet")) and not overwrite:
            raise UserError(f"{out} already holds parquet files; use --overwrite or another --out")
        out_dir = out / ".h5chunks"  # chunk files (resumable) until the conversion at the end
    else:
        out_dir = out
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    world = mpi_size * workers
    job = Job(out_dir=out_dir, seed=seed, mode="jets" if jets is not None else "events",
              total=total, world=world, config=config, chunk_size=chunk_size)
    my_ranks = [mpi_rank * workers + w for w in range(workers)]
    _prepare_out_dir(job, my_ranks, overwrite, check_all_ranks=mpi_rank == 0)

    # progress: totals for this MPI rank's share
    share = sum(sum(c.quotas.values()) for r in my_ranks for c in job.chunks(r))
    prefix = "generate" if mpi_size == 1 else f"generate rank {mpi_rank}/{mpi_size}"
    bar = Progress(share, job.mode, prefix + ":", enabled=progress and mpi_rank == 0, log_interval=30.0)
    result = GenerateResult(out=out)
    counts = {"events": 0, "jets": 0}

    def show():
        ev, jt = counts["events"], counts["jets"]
        bar.update(jt if job.mode == "jets" else ev, f"{ev} events, {jt} jets, {bar.rate(ev):.1f} events/s")

    def on_report(kind, payload):
        if kind == "event":
            counts["events"] += 1
            counts["jets"] += payload
            show()
        elif kind == "progress":
            counts["events"] += payload[0]
            counts["jets"] += payload[1]
            show()
        elif kind == "chunk":
            result.files.append(Path(payload["path"]))
            if payload["skipped"]:
                result.skipped_chunks += 1

    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _sigterm_to_interrupt) if main_thread else None
    t0 = time.monotonic()
    try:
        if workers == 1:
            _run_ranks(job, my_ranks, overwrite, on_report)
        else:
            _run_workers(job, my_ranks, overwrite, on_report)
    except KeyboardInterrupt:
        done = sorted(job.out_dir.glob("shard-*.h5"))
        bar.close(f"{prefix}: interrupted after {counts['events']} events; {len(done)} complete chunk "
                f"file(s) kept in {job.out_dir} (rerun the same command to finish)")
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
    result.seconds = time.monotonic() - t0
    result.events = counts["events"]
    result.jets = counts["jets"]
    result.files.sort()

    if merge_to is not None:
        merge_h5(result.files, merge_to)
        for p in result.files:
            p.unlink()
        with contextlib.suppress(OSError):
            out_dir.rmdir()
        result.files = [merge_to]
    elif fmt == "parquet":
        result.files = h5_to_parquet(result.files, out, overwrite=overwrite)
        for p in job.out_dir.glob("shard-*.h5"):
            p.unlink()
        with contextlib.suppress(OSError):
            job.out_dir.rmdir()

    skipped = f", {result.skipped_chunks} chunk(s) already there" if result.skipped_chunks else ""
    bar.enabled = progress  # every rank reports its own end line
    bar.close(f"{prefix}: {result.jets} jets from {result.events} events in {result.seconds:.1f} s "
            f"({result.events_per_s:.1f} events/s{skipped}) -> {out}")
    return result


def _run_workers(job: Job, ranks: list[int], overwrite: bool, on_report) -> None:
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(job, [r], overwrite, q), daemon=True) for r in ranks]
    for p in procs:
        p.start()
    running = len(procs)
    error: str | None = None
    try:
        while running:
            try:
                kind, payload = q.get(timeout=0.5)
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs):
                    # drain anything left, then stop
                    try:
                        while True:
                            kind, payload = q.get(timeout=0.2)
                            if kind in ("done", "interrupted", "error"):
                                running -= 1
                                error = error or (payload if kind == "error" else None)
                            else:
                                on_report(kind, payload)
                    except queue_mod.Empty:
                        pass
                    if running:
                        error = error or "a worker process died without finishing"
                    break
                continue
            if kind in ("done", "interrupted"):
                running -= 1
                if kind == "interrupted" and error is None:
                    raise KeyboardInterrupt
            elif kind == "error":
                running -= 1
                error = payload
                break
            else:
                on_report(kind, payload)
    finally:
        if running or error:
            for p in procs:
                if p.is_alive():
                    p.terminate()  # SIGTERM: the worker removes its temporary file and exits
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if error:
        raise UserError(error)


def merge_h5(files: list[Path], out: Path) -> None:
    """Concatenate chunk files into one hls4ml-layout file (written atomically)."""
    import h5py

    n = 0
    for p in files:
        with h5py.File(p, "r") as f:
            n += f["jets"].shape[0]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as g:
            kw = dict(compression="gzip", compression_opts=4, track_times=False)
            dc = g.create_dataset("jetConstituentList", shape=(n, MAX_CONSTITUENTS, len(PARTICLE_FEATURES)),
                                  dtype=np.float32, chunks=(min(n, 256), MAX_CONSTITUENTS, len(PARTICLE_FEATURES))
                                  if n else None, **kw)
            dj = g.create_dataset("jets", shape=(n, len(JET_FEATURE_NAMES)), dtype=np.float32, **kw)
            g.create_dataset("jetFeatureNames", data=_names(JET_FEATURE_NAMES), track_times=False)
            g.create_dataset("particleFeatureNames", data=_names(PARTICLE_FEATURE_NAMES), track_times=False)
            i = 0
            keys = []
            for p in files:
                with h5py.File(p, "r") as f:
                    m = f["jets"].shape[0]
                    dc[i:i + m] = f["jetConstituentList"][:]
                    dj[i:i + m] = f["jets"][:]
                    keys.append(json.loads(f.attrs.get("ucluster_generate_key", "null")))
                    i += m
            g.attrs["ucluster_generate_chunks"] = json.dumps(keys, sort_keys=True)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def h5_to_parquet(files: list[Path], out: Path, overwrite: bool = False) -> list[Path]:
    """Convert chunk files into the project's parquet dataset, with the SPEC section 1 preparation:
    W/Z/top jets with 10 < j_mass < 200 GeV, the 8 model features, fixed mass bins, label 0/1/2."""
    from ucluster_jax.data.features import hls4ml_particle_features, mass_bin
    from ucluster_jax.data.schema import DatasetMeta, ShardWriter

    w_col, z_col, t_col = (_JET_COL[n] for n in ("j_w", "j_z", "j_t"))
    with ShardWriter(out, DatasetMeta(), overwrite=overwrite) as writer:
        for path in files:
            const, jets = read_h5(path)
            onehot = jets[:, [w_col, z_col, t_col]]
            mass = jets[:, _JET_COL["j_mass"]]
            keep = (onehot.sum(axis=1) > 0) & (mass > 10.0) & (mass < 200.0)
            writer.add({
                "x": hls4ml_particle_features(const[keep], PARTICLE_FEATURE_NAMES),
                "target": mass_bin(mass[keep]),
                "label": onehot[keep].argmax(axis=1),
                "mass": mass[keep],
            })
        return writer.commit()


# ----------------------------------------------------------------------------------- CLI

def add_args(parser: argparse.ArgumentParser) -> None:
    d = GenConfig()
    parser.add_argument("--out", required=True,
                        help="output folder (one file per chunk: shard-<rank>-<chunk>.h5), or a file "
                             "name ending in .h5 for one merged file")
    n = parser.add_mutually_exclusive_group(required=True)
    n.add_argument("--jets", type=int, help="total number of jets, split evenly over the processes")
    n.add_argument("--events", type=int, help="total number of Pythia events, split evenly over the processes")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0); same seed, same files")
    parser.add_argument("--processes", default=",".join(d.processes),
                        help="comma list of w,z,top,q,g (default w,z,top)")
    parser.add_argument("--pt-min", type=float, default=d.pt_min, help="jet pT window low edge, GeV (850)")
    parser.add_argument("--pt-max", type=float, default=d.pt_max, help="jet pT window high edge, GeV (1250)")
    parser.add_argument("--pthat-min", type=float, default=None,
                        help="Pythia PhaseSpace:pTHatMin (default: --pt-min + 100)")
    parser.add_argument("--pthat-max", type=float, default=None,
                        help="Pythia PhaseSpace:pTHatMax (default: --pt-max - 100)")
    parser.add_argument("--pt-threshold", type=float, default=d.pt_threshold,
                        help="constituent pT threshold, GeV (default 1)")
    parser.add_argument("--eta-acceptance", type=float, default=d.particle_eta_max,
                        help="constituent |eta| acceptance (default 4)")
    parser.add_argument("--smear", type=float, default=d.smear,
                        help="energy resolution a in sigma_E/E = a/sqrt(E/GeV) per constituent (default 0: off)")
    parser.add_argument("--pythia", action="append", default=[], metavar="'KEY = VALUE'",
                        help="extra Pythia setting, applied last (repeatable)")
    parser.add_argument("--format", dest="fmt", choices=("h5", "parquet"), default="h5",
                        help="h5: hls4ml raw layout (default); parquet: project shards")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    parser.add_argument("--chunk", type=int, default=1000,
                        help="jets (with --jets) or events (with --events) per chunk file (default 1000)")
    parser.add_argument("--overwrite", action="store_true", help="replace files of a different earlier run")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def config_from_args(args: argparse.Namespace) -> GenConfig:
    procs = tuple(p.strip().lower() for p in args.processes.split(",") if p.strip())
    procs = tuple("top" if p in ("t", "tt", "ttbar") else p for p in procs)
    return GenConfig(
        processes=procs, pt_min=args.pt_min, pt_max=args.pt_max, pthat_min=args.pthat_min,
        pthat_max=args.pthat_max, pt_threshold=args.pt_threshold,
        particle_eta_max=args.eta_acceptance, smear=args.smear, pythia_settings=tuple(args.pythia),
    )


def run(args: argparse.Namespace) -> int:
    import_backends()  # UserError with the install hint; the CLI prints it as one line
    generate(args.out, jets=args.jets, events=args.events, seed=args.seed, config=config_from_args(args),
             workers=args.workers, chunk_size=args.chunk, fmt=args.fmt, overwrite=args.overwrite,
             progress=not args.quiet)
    return 0
