"""ROOT inputs of `ucluster prepare`: the JetClass layout built in, any other through a YAML mapping.

Physicists keep jets in ROOT TTrees with jagged per-particle branches. A mapping says which branches
hold the particle four-momenta, the jet and the one-hot labels (in the spirit of weaver-core's data
configs); JetClass is the built-in one. Trees are read with uproot a chunk of entries at a time, so a
file is never whole in memory; particles are sorted by pT, cut or zero-padded to the dataset's points
per jet and turned into the hls4ml columns (features.constituents_to_hls4ml), after which `prepare`
applies the same features, selection and mass-bin target as to HDF5.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import awkward as ak
import numpy as np
import uproot
import yaml

from ucluster_jax.data.features import HLS4ML_PARTICLE_NAMES, constituents_to_hls4ml, hls4ml_particle_features
from ucluster_jax.data.schema import CLASS_NAMES
from ucluster_jax.errors import DataError, UserError

MAGIC = b"root"  # the first bytes of every ROOT file
# the two ways a mapping may give a four-momentum; a jet may add `mass` (else the four-momentum's)
CARTESIAN = ("px", "py", "pz", "energy")
POLAR = ("pt", "eta", "phi", "energy")
MAPPING_KEYS = ("tree", "particles", "jet", "classes", "select")
# what uproot raises on a file that is not ROOT after all, truncated or corrupt, or a branch it cannot read
READ_ERRORS = (OSError, ValueError, TypeError, KeyError, uproot.deserialization.DeserializationError)


@dataclass(frozen=True)
class RootMapping:
    """Which branches of which tree hold what. `classes` maps the project's class names to one-hot label
    branches (> 0.5: the jet is of that class); `select` are the classes kept, in label order."""

    name: str  # "JetClass" or the YAML file, for messages
    tree: str
    particles: Mapping[str, str]  # CARTESIAN or POLAR keys -> jagged branches
    jet: Mapping[str, str]  # optional CARTESIAN or POLAR keys and/or `mass` -> flat branches
    classes: Mapping[str, str]
    select: tuple[str, ...]

    def with_classes(self, names: tuple[str, ...]) -> RootMapping:
        """The mapping keeping `names` (prepare --classes), checked against its classes."""
        unknown = [n for n in names if n not in self.classes]
        if unknown or not names or len(set(names)) != len(names):
            raise UserError(f"--classes {','.join(names)}: choose distinct names among the {self.name} "
                            f"mapping's classes {', '.join(self.classes)}")
        return replace(self, select=tuple(names))

    def flat_branches(self) -> list[str]:
        return list(self.jet.values()) + [self.classes[c] for c in self.select]


# JetClass (Qu, Li, Qian 2022): tree `tree`, part_* particle branches, jet_* jet branches, label_* one-hot
JETCLASS = RootMapping(
    name="JetClass", tree="tree",
    particles={"px": "part_px", "py": "part_py", "pz": "part_pz", "energy": "part_energy"},
    jet={"pt": "jet_pt", "eta": "jet_eta", "phi": "jet_phi", "energy": "jet_energy"},
    classes={"W": "label_Wqq", "Z": "label_Zqq", "top": "label_Tbqq", "QCD": "label_QCD", "Hbb": "label_Hbb",
             "Hcc": "label_Hcc", "Hgg": "label_Hgg", "H4q": "label_H4q", "Hqql": "label_Hqql", "Tbl": "label_Tbl"},
    select=CLASS_NAMES,
)


def _momentum(value, where: str, *, allow_mass: bool) -> dict[str, str]:
    """A mapping's four-momentum block: all of CARTESIAN or of POLAR (a jet may leave it out), plus `mass`."""
    if value is None and allow_mass:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) and v for v in value.values()):
        raise UserError(f"{where}: expected a block of QUANTITY: BRANCH entries")
    keys = set(value) - ({"mass"} if allow_mass else set())
    if not (keys == set(CARTESIAN) or keys == set(POLAR) or (allow_mass and not keys)):
        raise UserError(f"{where}: has {', '.join(value) or 'nothing'}; give {', '.join(CARTESIAN)} or "
                        f"{', '.join(POLAR)}" + (" (and optionally mass)" if allow_mass else ""))
    return {str(k): v for k, v in value.items()}


def load_mapping(path: str | Path) -> RootMapping:
    """Read and check a YAML mapping (README, "Reading ROOT files"); UserError names the file and key."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the ROOT mapping ({e})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a YAML mapping with {', '.join(MAPPING_KEYS)}")
    unknown = sorted(set(doc) - set(MAPPING_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(MAPPING_KEYS)}")
    tree, classes = doc.get("tree"), doc.get("classes")
    if not isinstance(tree, str) or not tree:
        raise UserError(f"{path}: 'tree' must name the TTree")
    if not isinstance(classes, dict) or not classes or not all(isinstance(v, str) for v in classes.values()):
        raise UserError(f"{path}: 'classes' must map each class name to its one-hot label branch")
    classes = {str(k): v for k, v in classes.items()}
    select = doc.get("select", list(classes))
    if not isinstance(select, list):
        raise UserError(f"{path}: 'select' must be a list of class names")
    m = RootMapping(name=str(path), tree=tree, particles=_momentum(doc.get("particles"), f"{path}: particles",
                                                                    allow_mass=False),
                    jet=_momentum(doc.get("jet"), f"{path}: jet", allow_mass=True), classes=classes, select=())
    return m.with_classes(tuple(str(s) for s in select))


def is_root_file(path: str | Path) -> bool:
    """ROOT files start with b'root' (HDF5 ones with b'\\x89HDF'); unreadable paths are not ROOT."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _why(e: Exception) -> str:
    """An uproot error on one line (its messages span several): the CLI prints one line per error."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def _numeric(c) -> bool:
    return isinstance(c, ak.contents.NumpyArray) and c.data.ndim == 1 and c.dtype.kind in "biuf"


def _describe(a: ak.Array) -> tuple[str, str]:
    """('jagged' | 'flat' | 'other', the type as awkward writes it) of one branch's array."""
    layout, text = a.layout, str(a.type.content)
    if _numeric(layout):
        return "flat", text
    if isinstance(layout, (ak.contents.ListOffsetArray, ak.contents.ListArray)) and _numeric(layout.content):
        return "jagged", text
    return "other", text


def inspect_root(path: Path, mapping: RootMapping) -> int:
    """Check the tree, its branches and their types (reading the first entry only); the number of jets."""
    try:
        with uproot.open(path) as f:
            kinds = f.classnames(cycle=False)
            if kinds.get(mapping.tree) not in ("TTree", "ROOT::RNTuple"):
                found = ", ".join(f"{k} ({v})" for k, v in kinds.items() if v in ("TTree", "ROOT::RNTuple"))
                raise DataError(f"{path}: no tree '{mapping.tree}' (trees: {found or 'none'}); the {mapping.name} "
                                "layout is assumed, another one needs --root-mapping FILE")
            tree = f[mapping.tree]
            have = set(tree.keys())
            wanted = [(b, "jagged") for b in mapping.particles.values()]
            wanted += [(b, "flat") for b in mapping.flat_branches()]
            missing = [b for b, _ in wanted if b not in have]
            if missing:
                raise DataError(f"{path}: tree '{mapping.tree}' lacks branch(es) {', '.join(missing)} "
                                f"({mapping.name} layout; another one needs --root-mapping FILE)")
            n = int(tree.num_entries)
            if n == 0:
                raise DataError(f"{path}: tree '{mapping.tree}' holds no jets")
            first = tree.arrays([b for b, _ in wanted], entry_stop=1, library="ak")
    except READ_ERRORS as e:
        raise DataError(f"{path}: not a readable ROOT file ({_why(e)})") from None
    for b, kind in wanted:
        got, text = _describe(first[b])
        if got != kind:
            want = "jagged numbers, one per particle" if kind == "jagged" else "one number per jet"
            raise DataError(f"{path}: branch {b} is {text}, expected {want}")
    return n


def _four_momentum(arrays: ak.Array, names: Mapping[str, str]) -> tuple:
    """(px, py, pz, energy) from CARTESIAN or POLAR branches (jagged or flat alike)."""
    if "px" in names:
        return tuple(arrays[names[k]] for k in CARTESIAN)
    pt, eta, phi = (arrays[names[k]] for k in POLAR[:3])
    return pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), arrays[names["energy"]]


def _padded(jagged: ak.Array, order: ak.Array, num_points: int) -> np.ndarray:
    """[N, num_points] float64: each jet's values in `order`, cut or zero-padded (zero energy: padding)."""
    a = ak.pad_none(jagged[order], num_points, axis=1, clip=True)
    return ak.to_numpy(ak.fill_none(a, 0.0)).astype(np.float64)


def read_chunks(path: Path, mapping: RootMapping, num_points: int, chunk: int
                ) -> Iterator[tuple[np.ndarray, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]]]:
    """Per chunk of `chunk` jets: the one-hot truth [n, classes] and a function that gives, for the
    selected rows, the 8 model features [s, num_points, 8] and the jet mass [s] (prepare._selected)."""
    branches = list(mapping.particles.values()) + mapping.flat_branches()
    try:
        with uproot.open(path) as f:
            for arrays in f[mapping.tree].iterate(branches, step_size=chunk, library="ak"):
                truth = np.stack([ak.to_numpy(arrays[mapping.classes[c]]) > 0.5 for c in mapping.select], axis=1)

                def features(sel: np.ndarray, arrays=arrays) -> tuple[np.ndarray, np.ndarray]:
                    a = arrays[sel]
                    px, py, pz, e = _four_momentum(a, mapping.particles)
                    order = ak.argsort(np.hypot(px, py), axis=1, ascending=False)
                    p4 = [_padded(v, order, num_points) for v in (px, py, pz, e)]
                    jet_p4 = None
                    if set(mapping.jet) - {"mass"}:
                        jet_p4 = np.stack([ak.to_numpy(v).astype(np.float64)
                                           for v in _four_momentum(a, mapping.jet)], axis=1)
                    const, jet = constituents_to_hls4ml(*p4, jet_p4=jet_p4)
                    mass = ak.to_numpy(a[mapping.jet["mass"]]).astype(np.float64) if "mass" in mapping.jet \
                        else jet["mass"]
                    return hls4ml_particle_features(const, HLS4ML_PARTICLE_NAMES), mass

                yield truth, features
    except READ_ERRORS as e:  # a basket that cannot be read or decompressed (truncated, corrupt)
        raise DataError(f"{path}: read failed, truncated or corrupt? ({_why(e)})") from None
