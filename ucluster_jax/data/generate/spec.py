"""What to simulate: the processes, the hls4ml column names, the generation settings."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ucluster_jax.data.features import HLS4ML_PARTICLE_NAMES
from ucluster_jax.errors import UserError


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

PARTICLE_FEATURE_NAMES: tuple[str, ...] = HLS4ML_PARTICLE_NAMES  # one list: data/features.py
PARTICLE_FEATURES: tuple[str, ...] = tuple(n.removeprefix("j1_") for n in PARTICLE_FEATURE_NAMES)

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
