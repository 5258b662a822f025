"""The masses of data/groom.py on jets built by hand: the massless mass, and what soft drop keeps and drops."""
from __future__ import annotations

import numpy as np

from ucluster_jax.data.features import FEATURE_NAMES
from ucluster_jax.data.groom import massless_mass, softdrop_mass


def features(parts: list[tuple[float, float, float]], num_points: int = 8) -> np.ndarray:
    """(pt, etarel, phirel) per particle -> one jet's [P, F] features, zero-padded (the fields groom reads)."""
    x = np.zeros((num_points, len(FEATURE_NAMES)), np.float32)
    for i, (pt, eta, phi) in enumerate(parts):
        x[i, FEATURE_NAMES.index("log_pt")] = np.log(pt)
        x[i, FEATURE_NAMES.index("etarel")], x[i, FEATURE_NAMES.index("phirel")] = eta, phi
    return x


def reference_mass(parts: list[tuple[float, float, float]]) -> float:
    """The invariant mass of (pt, eta, phi) particles taken massless, one jet at a time."""
    pt, eta, phi = np.array(parts, np.float64).T
    e, px, py, pz = (pt * np.cosh(eta)).sum(), (pt * np.cos(phi)).sum(), (pt * np.sin(phi)).sum(), (pt * np.sinh(eta)).sum()
    return float(np.sqrt(e * e - px * px - py * py - pz * pz))


PRONGS = [(300.0, 0.05, 0.0), (250.0, -0.05, 0.02), (200.0, 0.0, 0.12), (150.0, 0.02, 0.1)]
SOFT_WIDE = [(3.0, 0.5, -0.4), (2.0, -0.45, 0.5)]


def test_softdrop_drops_soft_wide_angle_radiation_and_keeps_hard_prongs():
    jets = np.stack([features(PRONGS + SOFT_WIDE), features(PRONGS), features([])])
    m = softdrop_mass(jets)
    assert m.dtype == np.float32 and m.shape == (3,)
    np.testing.assert_allclose(m[0], reference_mass(PRONGS), rtol=1e-4)  # the two soft particles are gone
    np.testing.assert_allclose(m[1], reference_mass(PRONGS), rtol=1e-4)
    assert reference_mass(PRONGS + SOFT_WIDE) > m[0] + 5  # they carried mass
    assert m[2] == 0  # no particles


def test_softdrop_without_grooming_is_the_jet_mass():
    jets = np.stack([features(PRONGS + SOFT_WIDE)])
    np.testing.assert_allclose(softdrop_mass(jets, z_cut=0.0)[0], reference_mass(PRONGS + SOFT_WIDE), rtol=1e-4)
    # an asymmetric split (the soft prong under z_cut) is groomed away at beta 0, kept at the default beta 2
    hard_soft = [(500.0, 0.0, 0.0), (20.0, 0.3, 0.0)]
    j = np.stack([features(hard_soft)])
    assert softdrop_mass(j, beta=0.0)[0] < 1e-3
    np.testing.assert_allclose(softdrop_mass(j)[0], reference_mass(hard_soft), rtol=1e-4)


def test_massless_mass_of_hand_built_jets():
    jets = np.stack([features(PRONGS + SOFT_WIDE), features(PRONGS), features([]), features([(400.0, 0.1, 0.2)])])
    m = massless_mass(jets)
    assert m.dtype == np.float32 and m.shape == (4,)
    np.testing.assert_allclose(m[:2], [reference_mass(PRONGS + SOFT_WIDE), reference_mass(PRONGS)], rtol=1e-5)
    assert m[2] == 0 and abs(m[3]) < 1e-2  # no particles; one massless particle
    np.testing.assert_allclose(m[:2], softdrop_mass(jets[:2], z_cut=0.0), rtol=1e-4)  # soft drop that drops nothing
