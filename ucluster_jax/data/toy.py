"""Built-in toy W/Z/top jets at pT ~ 1 TeV: fast, seeded, no Pythia (`ucluster toy`).

Resonances decay in their rest frame (W, Z -> 2 prongs; top -> b W -> 3 prongs), are boosted, and each
prong fragments into massless particles; soft wide-angle radiation is added. The 16 hls4ml columns are
computed relative to the jet axis and then the same `features.py` code as `prepare` gives the 8 inputs.
W and Z differ mainly by ~11 GeV of mass on peaks several GeV wide (hard but possible, like real data);
top has 3 prongs, a heavier mass and more constituents.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import h5py
import numpy as np

from ucluster_jax.data.features import (
    HLS4ML_PARTICLE_NAMES, constituents_to_hls4ml, hls4ml_particle_features, mass_bin,
)
from ucluster_jax.data.schema import (
    CLASS_NAMES, DEFAULT_ROW_GROUP_SIZE, DEFAULT_SHARD_SIZE, DatasetMeta, ShardWriter,
)

JET_FEATURE_NAMES: tuple[str, ...] = (
    "j_ptfrac", "j_pt", "j_eta", "j_mass", "j_tau1_b1", "j_tau2_b1", "j_tau3_b1", "j_tau1_b2", "j_tau2_b2",
    "j_tau3_b2", "j_tau32_b1", "j_tau32_b2", "j_zlogz", "j_c1_b0", "j_c1_b1", "j_c1_b2", "j_c2_b1", "j_c2_b2",
    "j_d2_b1", "j_d2_b2", "j_d2_a1_b1", "j_d2_a1_b2", "j_m2_b1", "j_m2_b2", "j_n2_b1", "j_n2_b2",
    "j_tau1_b1_mmdt", "j_tau2_b1_mmdt", "j_tau3_b1_mmdt", "j_tau1_b2_mmdt", "j_tau2_b2_mmdt", "j_tau3_b2_mmdt",
    "j_tau32_b1_mmdt", "j_tau32_b2_mmdt", "j_c1_b0_mmdt", "j_c1_b1_mmdt", "j_c1_b2_mmdt", "j_c2_b1_mmdt",
    "j_c2_b2_mmdt", "j_d2_b1_mmdt", "j_d2_b2_mmdt", "j_d2_a1_b1_mmdt", "j_d2_a1_b2_mmdt", "j_m2_b1_mmdt",
    "j_m2_b2_mmdt", "j_n2_b1_mmdt", "j_n2_b2_mmdt", "j_mass_trim", "j_mass_mmdt", "j_mass_prun", "j_mass_sdb2",
    "j_mass_sdm1", "j_multiplicity", "j_g", "j_q", "j_w", "j_z", "j_t", "j_undef",
)

CHUNK = 9999  # jets per independently seeded chunk (multiple of 3: exactly balanced chunks)
# (mass, width) in GeV
_RES = {"W": (80.38, 2.09), "Z": (91.19, 2.50), "top": (172.7, 1.42)}
_MB = 4.8
_R = 0.8  # jet radius
_PT_MIN = 1.0  # constituent threshold, GeV (as in the shared Pythia sample)
_K = 48  # max fragments per prong
_SOFT = 16  # max soft particles
# tuned so masses, multiplicities and angular spreads resemble the shared Pythia sample
_Z_SHAPE = 0.2  # Dirichlet shape of momentum fractions (smaller: harder leading particles)
_KT = 0.1  # mean fragment kT to the prong axis, GeV
_THETA_MAX = 0.4  # cap on the fragment angle to its prong axis
_MULT = 21.0  # mean fragments per prong = _MULT * (E / 100 GeV)^0.25
_GLUON_PT = 8.0  # mean pT of the radiated gluon, GeV
_SOFT_MEAN = 1.0  # mean number of soft particles
_TOP_GLUON = 2.0  # gluon pT factor for top jets
_B_MULT = 2.2  # multiplicity factor of the b prong
_JES = 0.04  # jet-level energy scale resolution


def _breit_wigner(rng: np.random.Generator, m0: float, width: float, n: int) -> np.ndarray:
    u = rng.uniform(0.03, 0.97, n)  # truncated at about +-5 widths
    return m0 + 0.5 * width * np.tan(np.pi * (u - 0.5))


def _boost(p: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Lorentz-boost four-vectors p[..., (px,py,pz,E)] by velocity beta[..., 3] (broadcasting)."""
    b2 = np.maximum((beta**2).sum(-1, keepdims=True), 1e-18)
    gamma = 1.0 / np.sqrt(1.0 - b2)
    bp = (beta * p[..., :3]).sum(-1, keepdims=True)
    e = p[..., 3:]
    vec = p[..., :3] + ((gamma - 1.0) * bp / b2 + gamma * e) * beta
    return np.concatenate([vec, gamma * (e + bp)], axis=-1)


def _two_body(rng: np.random.Generator, m: np.ndarray, m1: float | np.ndarray, m2: float | np.ndarray):
    """Isotropic two-body decay at rest: the two daughters' four-vectors [n, 4]."""
    n = len(m)
    m1, m2 = np.broadcast_to(m1, (n,)), np.broadcast_to(m2, (n,))
    p = np.sqrt(np.maximum((m**2 - (m1 + m2) ** 2) * (m**2 - (m1 - m2) ** 2), 0.0)) / (2 * m)
    cos = rng.uniform(-1, 1, n)
    sin = np.sqrt(1 - cos**2)
    phi = rng.uniform(-np.pi, np.pi, n)
    d = np.stack([sin * np.cos(phi), sin * np.sin(phi), cos], -1) * p[:, None]
    return (np.concatenate([d, np.sqrt(p**2 + m1**2)[:, None]], -1),
            np.concatenate([-d, np.sqrt(p**2 + m2**2)[:, None]], -1))


def _fragment(rng: np.random.Generator, parton: np.ndarray, mean_mult: np.ndarray) -> np.ndarray:
    """Split partons [n, J, 4] into massless fragments [n, J, _K, 4] (E = 0 marks unused slots).

    Momentum fractions are Dirichlet-like (a few hard particles, many soft ones); the angle to the
    prong axis is kT / E with an exponential kT, so soft fragments spread wider, as in a shower.
    """
    n, j = parton.shape[:2]
    e_par = parton[..., 3].reshape(-1)
    mult = np.where(e_par > 0, np.clip(1 + rng.poisson(mean_mult.reshape(-1)), 1, _K), 0)
    owner = np.repeat(np.arange(n * j), mult)  # parton of each fragment (only real fragments are drawn)
    slot = np.arange(len(owner)) - np.repeat(np.cumsum(mult) - mult, mult)
    g = rng.gamma(_Z_SHAPE, size=len(owner))
    e = g / np.maximum(np.bincount(owner, weights=g, minlength=n * j), 1e-300)[owner] * e_par[owner]
    p3 = parton[..., :3].reshape(-1, 3)
    axis = p3 / np.maximum(np.linalg.norm(p3, axis=-1, keepdims=True), 1e-12)
    ref = np.where(np.abs(axis[:, 2:3]) < 0.9, np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0]))
    u = np.cross(axis, ref)
    u /= np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
    v = np.cross(axis, u)
    theta = np.minimum((rng.exponential(_KT, len(owner)) + 0.05) / np.maximum(e, 1e-6), _THETA_MAX)
    phi = rng.uniform(-np.pi, np.pi, len(owner))
    st = np.sin(theta)[:, None]
    d = (np.cos(theta)[:, None] * axis[owner]
         + st * (np.cos(phi)[:, None] * u[owner] + np.sin(phi)[:, None] * v[owner]))
    out = np.zeros((n * j, _K, 4))
    out[owner, slot, :3] = d * e[:, None]
    out[owner, slot, 3] = e
    return out.reshape(n, j, _K, 4)


def _chunk(rng: np.random.Generator, label: np.ndarray, num_points: int) -> dict[str, np.ndarray]:
    """Generate one chunk of jets for the given labels: hls4ml constituents [n,P,16] + jet quantities."""
    n = len(label)
    top = label == 2
    m = np.where(label == 0, _breit_wigner(rng, *_RES["W"], n),
                 np.where(label == 1, _breit_wigner(rng, *_RES["Z"], n), _breit_wigner(rng, *_RES["top"], n)))
    partons = np.zeros((n, 4, 4))  # up to 3 decay prongs + 1 radiated gluon
    # W/Z -> q q'
    q1, q2 = _two_body(rng, m, 0.0, 0.0)
    # top -> b W(-> q q'), W decayed in its own frame, then boosted into the top frame
    mw = np.minimum(_breit_wigner(rng, *_RES["W"], n), m - _MB - 1.0)
    b, w = _two_body(rng, m, _MB, mw)
    w1, w2 = _two_body(rng, mw, 0.0, 0.0)
    beta_w = w[:, :3] / w[:, 3:]
    w1, w2 = _boost(w1, beta_w), _boost(w2, beta_w)
    partons[:, 0] = np.where(top[:, None], b, q1)
    partons[:, 1] = np.where(top[:, None], w1, q2)
    partons[:, 2] = np.where(top[:, None], w2, 0.0)
    # resonance kinematics in the lab: pT ~ 1 TeV
    pt = rng.uniform(900.0, 1150.0, n)
    eta = rng.uniform(-1.5, 1.5, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    pvec = np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)], -1)
    beta = pvec / np.sqrt((pvec**2).sum(-1) + m**2)[:, None]
    partons[:, :3] = _boost(partons[:, :3], beta[:, None, :]) * (partons[:, :3, 3:] > 0)
    # one gluon radiated inside the jet, dtheta/theta: small mass shift, long upper tail
    g_pt = rng.exponential(_GLUON_PT, n) * np.where(top, _TOP_GLUON, 1.0)  # a coloured resonance radiates more
    r, a = _R * np.exp(rng.uniform(np.log(0.05), 0.0, n)), rng.uniform(-np.pi, np.pi, n)  # collinear-enhanced
    g_eta, g_phi = eta + r * np.cos(a), phi + r * np.sin(a)
    partons[:, 3] = np.stack([g_pt * np.cos(g_phi), g_pt * np.sin(g_phi), g_pt * np.sinh(g_eta),
                              g_pt * np.cosh(g_eta)], -1)
    e_par = partons[..., 3]
    mean_mult = np.where(e_par > 3.0, _MULT * (np.maximum(e_par, 3.0) / 100.0) ** 0.25, 0.0)
    mean_mult[:, 0] *= np.where(top, _B_MULT, 1.0)  # b-hadron decays
    frags = _fragment(rng, partons, mean_mult).reshape(n, -1, 4)
    # soft particles spread over the jet area (underlying event, wide-angle radiation)
    ns = np.minimum(rng.poisson(_SOFT_MEAN, n), _SOFT)
    s_pt = (_PT_MIN + rng.exponential(0.8, (n, _SOFT))) * (np.arange(_SOFT) < ns[:, None])
    r, a = _R * np.sqrt(rng.uniform(0, 1, (n, _SOFT))), rng.uniform(-np.pi, np.pi, (n, _SOFT))
    s_eta, s_phi = eta[:, None] + r * np.cos(a), phi[:, None] + r * np.sin(a)
    soft = np.stack([s_pt * np.cos(s_phi), s_pt * np.sin(s_phi), s_pt * np.sinh(s_eta), s_pt * np.cosh(s_eta)], -1)
    p = np.concatenate([frags, soft], 1)
    # detector-like response: jet energy scale and per-particle smearing, pT threshold, jet cone
    scale = 1.0 + _JES * rng.standard_normal((n, 1)) + 0.05 * rng.standard_normal(p.shape[:2])
    p *= np.maximum(scale, 0.1)[..., None]
    ppt = np.hypot(p[..., 0], p[..., 1])
    peta = np.arcsinh(p[..., 2] / np.maximum(ppt, 1e-9))
    dphi = (np.arctan2(p[..., 1], p[..., 0]) - phi[:, None] + np.pi) % (2 * np.pi) - np.pi
    keep = (p[..., 3] > 0) & (ppt > _PT_MIN) & (np.hypot(peta - eta[:, None], dphi) < _R)
    ppt = np.where(keep, ppt, -1.0)
    order = np.argsort(-ppt, axis=1, kind="stable")[:, :num_points]
    p = np.take_along_axis(p, order[..., None], 1) * np.take_along_axis(keep, order, 1)[..., None]
    if p.shape[1] < num_points:
        p = np.concatenate([p, np.zeros((n, num_points - p.shape[1], 4))], 1)
    const, jet = constituents_to_hls4ml(p[..., 0], p[..., 1], p[..., 2], p[..., 3])
    return {"const": const, "jet_pt": jet["pt"], "jet_eta": jet["eta"], "mass": jet["mass"],
            "multiplicity": (p[..., 3] > 0).sum(1)}


def _chunks(n: int, seed: int, num_points: int):
    """Yield (label, generated) per chunk; chunk c uses rng([seed, c]): bounded memory, write_toy == toy_jets."""
    if n < 0 or seed < 0:
        raise ValueError(f"n={n} and seed={seed} must be non-negative")
    for c, start in enumerate(range(0, n, CHUNK)):
        rng = np.random.default_rng([seed, c])
        size = min(CHUNK, n - start)
        label = rng.permutation(np.arange(start, start + size) % 3).astype(np.int32)
        yield label, _chunk(rng, label, num_points)


def _to_model(label: np.ndarray, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "x": hls4ml_particle_features(g["const"], HLS4ML_PARTICLE_NAMES),
        "target": mass_bin(g["mass"]),
        "label": label,
        "mass": g["mass"].astype(np.float32),
    }


def toy_jets(n: int, seed: int, num_points: int = 100) -> dict[str, np.ndarray]:
    """n balanced, shuffled toy jets: x [n,P,8] float32, target (mass bin), label (0=W,1=Z,2=top), mass."""
    parts = [_to_model(label, g) for label, g in _chunks(n, seed, num_points)]
    if not parts:
        return {"x": np.zeros((0, num_points, 8), np.float32), "target": np.zeros(0, np.int32),
                "label": np.zeros(0, np.int32), "mass": np.zeros(0, np.float32)}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def write_toy(
    out_dir: str | Path,
    n: int,
    seed: int,
    num_points: int = 100,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    overwrite: bool = False,
) -> list[Path]:
    """Write toy_jets(n, seed) as a parquet dataset, a chunk at a time (bounded memory); returns shards."""
    with ShardWriter(out_dir, DatasetMeta(num_points=num_points), shard_size=shard_size,
                     row_group_size=row_group_size, overwrite=overwrite) as w:
        for label, g in _chunks(n, seed, num_points):
            w.add(_to_model(label, g))
        return w.commit()


def toy_hls4ml(n: int, seed: int, num_points: int = 100) -> dict[str, np.ndarray]:
    """Toy jets in the hls4ml raw layout: const [n,P,16] (HLS4ML_PARTICLE_NAMES), jets [n,59]."""
    consts, jets = [], []
    for label, g in _chunks(n, seed, num_points):
        j = np.zeros((len(label), len(JET_FEATURE_NAMES)), np.float32)
        col = {name: i for i, name in enumerate(JET_FEATURE_NAMES)}
        j[:, col["j_ptfrac"]] = 1.0
        j[:, col["j_pt"]], j[:, col["j_eta"]], j[:, col["j_mass"]] = g["jet_pt"], g["jet_eta"], g["mass"]
        j[:, col["j_multiplicity"]] = g["multiplicity"]
        for k, name in enumerate(("j_w", "j_z", "j_t")):
            j[:, col[name]] = label == k
        consts.append(g["const"])
        jets.append(j)
    if not consts:
        return {"const": np.zeros((0, num_points, 16), np.float32), "jets": np.zeros((0, 59), np.float32)}
    return {"const": np.concatenate(consts), "jets": np.concatenate(jets)}


def write_hls4ml_h5(
    path: str | Path,
    n: int = 0,
    seed: int = 0,
    num_points: int = 100,
    *,
    arrays: dict[str, np.ndarray] | None = None,
    compression: str | None = None,
) -> Path:
    """Write toy_hls4ml(n, seed) (or given {'const','jets'} arrays) as an hls4ml raw HDF5 file.

    Names are stored as bytes and the file holds the four keys real hls4ml files have, so `prepare`
    can be tested on files it did not write itself.
    """
    a = arrays if arrays is not None else toy_hls4ml(n, seed, num_points)
    path = Path(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("jetConstituentList", data=a["const"], compression=compression)
        f.create_dataset("jets", data=a["jets"], compression=compression)
        f.create_dataset("particleFeatureNames", data=np.array([s.encode() for s in HLS4ML_PARTICLE_NAMES]))
        f.create_dataset("jetFeatureNames", data=np.array([s.encode() for s in JET_FEATURE_NAMES]))
    return path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--n", type=int, required=True, help="number of jets (balanced W/Z/top)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-points", type=int, default=100, help="constituents per jet (zero-padded)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="jets per parquet shard")
    parser.add_argument("--row-group-size", type=int, default=DEFAULT_ROW_GROUP_SIZE, help="jets per row group")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")


def run(args: argparse.Namespace) -> int:
    from ucluster_jax.errors import UserError

    if args.n < 1 or args.seed < 0 or args.num_points < 1:
        raise UserError("--n and --num-points must be positive and --seed non-negative")
    t0 = time.perf_counter()
    files = write_toy(args.out, args.n, args.seed, args.num_points, shard_size=args.shard_size,
                      row_group_size=args.row_group_size, overwrite=args.overwrite)
    counts = [len(range(k, args.n, 3)) for k in range(3)]
    print(f"toy: wrote {args.n} jets ({', '.join(f'{c} {nm}' for nm, c in zip(CLASS_NAMES, counts))}) "
          f"to {args.out}: {len(files)} shard(s), {time.perf_counter() - t0:.1f} s")
    return 0
