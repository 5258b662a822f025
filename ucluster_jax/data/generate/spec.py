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
# Event-level processes (LHC Olympics R&D layout, data/generate/events.py): truth label per event.
EVENT_PROCESSES: dict[str, int] = {"qcd-dijet": 0, "resonance": 1}
# fixed: seeds use the index here, so new processes only ever go at the end
PROCESS_ORDER: tuple[str, ...] = ("w", "z", "top", "q", "g", "qcd-dijet", "resonance")
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
            raise UserError(f"unknown process(es) {bad or '(none)'}; choose from {','.join(PROCESSES)} "
                            f"(event processes {','.join(EVENT_PROCESSES)}: events.generate_events)")
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


MAX_PARTICLES = 700  # LHCO R&D rows: 700 particles x (pT, eta, phi) + the label


@dataclass(frozen=True)
class EventConfig:
    """Event-level settings: QCD dijets and a W' -> X Y -> 4 quarks resonance, LHCO R&D style."""

    processes: tuple[str, ...] = ("qcd-dijet", "resonance")
    signal_fraction: float = 0.1  # share of resonance events (exact count: round(f * N))
    pthat_min: float = 1100.0  # QCD PhaseSpace:pTHatMin [GeV]
    wprime_mass: float = 3500.0  # W' (PDG 34), generated within +-20 % of this mass
    x_mass: float = 500.0  # X = H+ (37), the W' partner with the charge
    y_mass: float = 100.0  # Y = A0 (36)
    pt_threshold: float = 0.5  # particle pT threshold [GeV]
    particle_eta_max: float = 2.5
    max_particles: int = MAX_PARTICLES
    trigger_pt: float = 1200.0  # at least one anti-kT R=1 jet above this pT [GeV] ...
    trigger_eta: float = 2.5  # ... within this |eta|
    jet_r: float = 1.0
    smear: float = 0.0
    ecm: float = 13000.0
    pythia_settings: tuple[str, ...] = ()

    def validate(self) -> None:
        bad = [p for p in self.processes if p not in EVENT_PROCESSES]
        if bad or not self.processes or len(set(self.processes)) != len(self.processes):
            raise UserError(f"event processes must be one or both of {','.join(EVENT_PROCESSES)}, "
                            f"got {','.join(self.processes) or '(none)'}")
        if not 0.0 <= self.signal_fraction <= 1.0:
            raise UserError(f"--signal-fraction must be in [0, 1], got {self.signal_fraction}")
        needed = {"qcd-dijet": self.signal_fraction < 1.0, "resonance": self.signal_fraction > 0.0}
        for p, need in needed.items():
            if need != (p in self.processes):
                raise UserError(f"--signal-fraction {self.signal_fraction:g} does not fit --processes "
                                f"{','.join(self.processes)} (0 < f < 1 needs both, 0 only qcd-dijet, "
                                "1 only resonance)")
        if not (0 < self.y_mass and 0 < self.x_mass and self.x_mass + self.y_mass < 0.8 * self.wprime_mass):
            raise UserError("need masses > 0 and X + Y below 0.8 x the W' mass (the generated W' window), "
                            f"got W' {self.wprime_mass:g}, X {self.x_mass:g}, Y {self.y_mass:g}")
        if self.pthat_min < 0 or self.pt_threshold < 0 or self.particle_eta_max <= 0 or self.smear < 0:
            raise UserError("--pthat-min, --pt-threshold and --smear must be >= 0, --eta-acceptance > 0")
        if self.max_particles < 1 or self.trigger_pt < 0 or self.trigger_eta <= 0 or self.jet_r <= 0:
            raise UserError("need max_particles >= 1, trigger pT >= 0, trigger |eta| > 0 and jet R > 0")

    def pythia_strings(self, process: str, pythia_seed: int) -> list[str]:
        if process == "qcd-dijet":
            physics = ["HardQCD:all = on", f"PhaseSpace:pTHatMin = {self.pthat_min:g}"]
        else:  # W'+- -> H+- A0, H+ -> u dbar / c sbar, A0 -> light q qbar; narrow X and Y
            w, x, y = self.wprime_mass, self.x_mass, self.y_mass
            physics = [
                "NewGaugeBoson:ffbar2Wprime = on", f"34:m0 = {w:g}", f"34:mMin = {0.8 * w:g}",
                f"34:mMax = {1.2 * w:g}", "34:oneChannel = 1 1.0 100 37 36",
                f"37:m0 = {x:g}", "37:mWidth = 0.01", f"37:mMin = {0.99 * x:g}", f"37:mMax = {1.01 * x:g}",
                "37:oneChannel = 1 0.5 100 2 -1", "37:addChannel = 1 0.5 100 4 -3",
                f"36:m0 = {y:g}", "36:mWidth = 0.01", f"36:mMin = {0.99 * y:g}", f"36:mMax = {1.01 * y:g}",
                "36:oneChannel = 1 0.34 100 1 -1", "36:addChannel = 1 0.33 100 2 -2",
                "36:addChannel = 1 0.33 100 3 -3",
            ]
        return [f"Beams:eCM = {self.ecm:g}", *physics, "Random:setSeed = on", f"Random:seed = {pythia_seed}",
                "Print:quiet = on", *self.pythia_settings]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["processes"] = list(self.processes)
        d["pythia_settings"] = list(self.pythia_settings)
        return d
