"""`ucluster prepare`: hls4ml raw or UCluster-prepared HDF5, ROOT trees (root.py) or LHC Olympics R&D events
(lhco.py) -> parquet dataset(s) (docs/DATA.md).

Inputs are read in chunks, so files larger than memory work. The selection and features follow the
original prepare step (SPEC section 1) except that the mass-bin target uses fixed bins for every file.
Nothing appears in the output directories unless the whole conversion succeeds.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ucluster_jax.data import lhco, root
from ucluster_jax.data.features import (
    NUM_TARGETS, clean_name, hls4ml_particle_features, mass_bin, missing_particle_columns,
)
from ucluster_jax.data.groom import massless_mass, softdrop_mass
from ucluster_jax.data.schema import (
    CLASS_NAMES, DEFAULT_ROW_GROUP_SIZE, DEFAULT_SHARD_SIZE, MASS_KINDS, DatasetMeta, ShardWriter,
)
from ucluster_jax.errors import DataError, UserError
from ucluster_jax.progress import Progress

HLS4ML_KEYS = ("jetConstituentList", "jets", "particleFeatureNames", "jetFeatureNames")
PREPARED_KEYS = ("data", "pid", "label", "masses")
TRUTH_COLUMNS = ("j_w", "j_z", "j_t")  # -> class 0, 1, 2
DEFAULT_CHUNK = 4096
DEFAULT_POINTS = 100  # particles per jet of ROOT inputs, as in the hls4ml files
MASS_WINDOW = (10.0, 200.0)  # exclusive, GeV


@dataclass
class FileReport:
    """Per-input counts; a jet is counted under the first reason that drops it, in this order."""

    path: str
    format: str
    num_points: int
    class_names: tuple[str, ...] = CLASS_NAMES
    read: int = 0
    kept: int = 0
    not_wzt: int = 0  # not of a selected class
    nonfinite: int = 0
    mass_window: int = 0
    per_class: list[int] = field(default_factory=list)
    unknown_label: int = 0

    def __post_init__(self) -> None:
        self.per_class = self.per_class or [0] * len(self.class_names)

    def line(self) -> str:
        classes = ", ".join(f"{n} {c}" for n, c in zip(self.class_names, self.per_class))
        unknown = f", unknown {self.unknown_label}" if self.unknown_label else ""
        return (f"{self.path} ({self.format}): read {self.read}, kept {self.kept}; dropped: not "
                f"{'/'.join(self.class_names)} {self.not_wzt}, mass window {self.mass_window}, non-finite "
                f"{self.nonfinite}; {classes}{unknown}")


@dataclass
class _Input:
    path: Path
    format: str  # "hls4ml", "prepared", "root" or "lhco"
    n: int
    num_points: int
    particle_names: list[str] = field(default_factory=list)
    jet_columns: dict[str, int] = field(default_factory=dict)
    mapping: root.RootMapping | None = None  # ROOT inputs: which branches hold what

    @property
    def class_names(self) -> tuple[str, ...]:
        if self.format == "lhco":
            return lhco.CLASS_NAMES
        return self.mapping.select if self.mapping else CLASS_NAMES


def _names(ds: h5py.Dataset) -> list[str]:
    return [n.decode("utf-8", "replace") if isinstance(n, (bytes, np.bytes_)) else str(n) for n in ds[()]]


def inspect_input(path: str | Path, mapping: root.RootMapping = root.JETCLASS,
                  num_points: int = DEFAULT_POINTS) -> _Input:
    """Recognise the format (ROOT by its first bytes, HDF5 by its keys) and check it without reading the jets;
    ROOT inputs are read with `mapping`; ROOT and LHCO inputs are cut or padded to `num_points` particles."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such input file")
    if root.is_root_file(path):
        return _Input(path, "root", root.inspect_root(path, mapping), num_points, mapping=mapping)
    if path.suffix == ".root":
        raise DataError(f"{path}: not a ROOT file (it does not start with 'root')")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        keys = set(f.keys())
        if set(HLS4ML_KEYS) <= keys:
            c, j = f["jetConstituentList"], f["jets"]
            pnames, jnames = _names(f["particleFeatureNames"]), _names(f["jetFeatureNames"])
            if c.ndim != 3 or c.shape[2] != len(pnames):
                raise DataError(f"{path}: jetConstituentList has shape {c.shape}, expected "
                                f"[N, P, {len(pnames)}] (one column per particleFeatureNames entry)")
            if j.ndim != 2 or j.shape[1] != len(jnames) or j.shape[0] != c.shape[0]:
                raise DataError(f"{path}: jets has shape {j.shape}, expected [{c.shape[0]}, {len(jnames)}]")
            missing = missing_particle_columns(pnames)
            if missing:
                raise DataError(f"{path}: particleFeatureNames lacks {missing}")
            jcol = {clean_name(n): i for i, n in enumerate(jnames)}
            missing = [k for k in ("j_mass",) + TRUTH_COLUMNS if k not in jcol]
            if missing:
                raise DataError(f"{path}: jetFeatureNames lacks {missing}")
            inp = _Input(path, "hls4ml", c.shape[0], c.shape[1], pnames, jcol)
        elif set(PREPARED_KEYS) <= keys:
            d, pid, lab, m = (f[k] for k in PREPARED_KEYS)
            n = d.shape[0] if d.ndim else 0
            if d.ndim != 3 or d.shape[2] != 8:
                raise DataError(f"{path}: data has shape {d.shape}, expected [N, P, 8]")
            if pid.shape != (n,) or m.shape != (n,):
                raise DataError(f"{path}: pid {pid.shape} and masses {m.shape} must both be [{n}]")
            if lab.shape not in ((n, len(CLASS_NAMES)), (n,)):
                raise DataError(f"{path}: label has shape {lab.shape}, expected [{n}, 3] one-hot or [{n}]")
            inp = _Input(path, "prepared", n, d.shape[1])
        elif lhco.is_lhco(f):
            inp = _Input(path, "lhco", lhco.inspect(f, path), num_points)
        else:
            raise DataError(f"{path}: unrecognised HDF5 layout (keys: {', '.join(sorted(keys)) or 'none'}); "
                            f"expected hls4ml raw {list(HLS4ML_KEYS)}, UCluster-prepared {list(PREPARED_KEYS)} or LHC Olympics "
                            f"{lhco.KEY}")
    if inp.n == 0:
        raise DataError(f"{path}: holds no jets")
    return inp


def _selected(rep: FileReport, truth: np.ndarray, features: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
              ) -> Iterator[dict[str, np.ndarray]]:
    """The selection (SPEC section 1) of one chunk, counted in `rep`: jets of a class in `truth` [n, classes],
    with finite features and a mass in the window. `features(rows)` gives those rows' 8 model features and
    masses, computed for the class-selected jets only."""
    is_wzt = truth.any(axis=1)
    rep.read += len(truth)
    rep.not_wzt += int((~is_wzt).sum())
    sel = np.flatnonzero(is_wzt)
    if not len(sel):
        return
    x, mass = features(sel)
    finite = np.isfinite(x).reshape(len(sel), -1).all(axis=1) & np.isfinite(mass)
    rep.nonfinite += int((~finite).sum())
    in_window = finite & (mass > MASS_WINDOW[0]) & (mass < MASS_WINDOW[1])
    rep.mass_window += int((finite & ~in_window).sum())
    yield {"x": x[in_window], "target": mass_bin(mass[in_window]), "label": np.argmax(truth[sel[in_window]], axis=1),
           "mass": mass[in_window].astype(np.float32)}


def _hls4ml_chunks(f: h5py.File, inp: _Input, rep: FileReport, chunk: int) -> Iterator[dict[str, np.ndarray]]:
    truth_idx = [inp.jet_columns[k] for k in TRUTH_COLUMNS]
    mass_idx = inp.jet_columns["j_mass"]
    for s in range(0, inp.n, chunk):
        jets = f["jets"][s:s + chunk]
        mass = jets[:, mass_idx].astype(np.float64)

        def features(sel: np.ndarray, s: int = s, mass: np.ndarray = mass) -> tuple[np.ndarray, np.ndarray]:
            const = f["jetConstituentList"][s:s + chunk][sel]
            return hls4ml_particle_features(const, inp.particle_names), mass[sel]

        yield from _selected(rep, jets[:, truth_idx] > 0.5, features)


def _root_chunks(inp: _Input, rep: FileReport, chunk: int) -> Iterator[dict[str, np.ndarray]]:
    for truth, features in root.read_chunks(inp.path, inp.mapping, inp.num_points, chunk):
        yield from _selected(rep, truth, features)


def _prepared_chunks(
    f: h5py.File, inp: _Input, rep: FileReport, chunk: int, mass_bins: bool
) -> Iterator[dict[str, np.ndarray]]:
    for s in range(0, inp.n, chunk):
        x = np.asarray(f["data"][s:s + chunk], np.float32)
        pid = np.asarray(f["pid"][s:s + chunk], np.float64)
        lab = np.asarray(f["label"][s:s + chunk])
        mass = np.asarray(f["masses"][s:s + chunk], np.float64)
        rep.read += len(x)
        if lab.ndim == 2:  # one-hot; an all-zero row is an unknown class
            label = np.where(lab.max(axis=1) > 0, np.argmax(lab, axis=1), -1)
        else:
            label = np.where(np.isfinite(lab), lab, -1).astype(np.int64)
        bad = ~(np.isfinite(pid) & (pid == np.round(pid)) & (pid >= 0) & (pid < NUM_TARGETS))
        if not mass_bins and bad.any():
            r = s + int(np.argmax(bad))
            raise DataError(f"{inp.path}: pid[{r}] = {pid[bad][0]} is not a mass bin 0..{NUM_TARGETS - 1}")
        if ((label < -1) | (label >= len(CLASS_NAMES))).any():
            raise DataError(f"{inp.path}: label values outside -1..{len(CLASS_NAMES) - 1} near row {s}")
        finite = np.isfinite(x).reshape(len(x), -1).all(axis=1) & np.isfinite(mass)
        rep.nonfinite += int((~finite).sum())
        target = mass_bin(mass) if mass_bins else np.where(bad, 0, pid).astype(np.int32)
        yield {"x": x[finite], "target": target[finite], "label": label[finite].astype(np.int32),
               "mass": mass[finite].astype(np.float32)}


def _iter_inputs(
    inputs: Sequence[_Input], chunk: int, mass_bins: bool, sampler: lhco.SignalSampler | None = None
) -> tuple[list[FileReport], Iterator[dict[str, np.ndarray]]]:
    """Kept jets of all inputs, in input order, as chunks; the reports fill in as the iterator runs."""
    reports = [lhco.LhcoReport(str(i.path), num_points=i.num_points) if i.format == "lhco"
               else FileReport(str(i.path), i.format, i.num_points, i.class_names) for i in inputs]

    def tally(rep: FileReport, chunks: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        for a in chunks:
            rep.kept += len(a["label"])
            for k in range(len(rep.class_names)):
                rep.per_class[k] += int((a["label"] == k).sum())
            rep.unknown_label += int((a["label"] < 0).sum())
            yield a

    def gen() -> Iterator[dict[str, np.ndarray]]:
        for inp, rep in zip(inputs, reports):
            if inp.format == "root":  # root.read_chunks names the file in its read errors
                yield from tally(rep, _root_chunks(inp, rep, chunk))
                continue
            try:
                with h5py.File(inp.path, "r") as f:
                    yield from tally(rep, _hls4ml_chunks(f, inp, rep, chunk) if inp.format == "hls4ml"
                                     else lhco.read_chunks(f, inp.path, rep, chunk, sampler) if inp.format == "lhco"
                                     else _prepared_chunks(f, inp, rep, chunk, mass_bins))
            except OSError as e:  # corrupt chunk, truncated file
                raise DataError(f"{inp.path}: read failed ({e})") from None

    return reports, gen()


def parse_split(text: str | None) -> list[tuple[str, float]] | None:
    """'train=0.8,test=0.2' -> [('train', 0.8), ('test', 0.2)]: ordered parts, fractions summing to 1."""
    if not text:
        return None
    parts = []
    for item in text.split(","):
        name, sep, frac = item.partition("=")
        name = name.strip()
        try:
            value = float(frac)
        except ValueError:
            value = float("nan")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not 0 < value <= 1:
            raise UserError(f"--split {text!r}: expected name=fraction,... with fractions in (0, 1]")
        parts.append((name, value))
    if len({n for n, _ in parts}) != len(parts) or abs(sum(v for _, v in parts) - 1) > 1e-6:
        raise UserError(f"--split {text!r}: names must differ and fractions sum to 1")
    return parts


def row_group_size_for(jets: int, ranks: int, largest: int) -> int:
    """Equal row groups, a multiple of `ranks` of them, at least 4 per rank, at most `largest` jets each.

    A rank's rows (N/ranks jets of the epoch's stream) then span whole row groups up to rounding, and it
    decodes at most 1.5x the jets it trains on (a partly used group at each end).
    """
    groups = ranks * max(4, -(-jets // (ranks * largest)))
    return max(1, -(-jets // groups))


def prepare(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    split: list[tuple[str, float]] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    chunk: int | None = None,
    mass_bins: bool = False,
    overwrite: bool = False,
    ranks: int | None = None,
    mapping: root.RootMapping = root.JETCLASS,
    num_points: int = DEFAULT_POINTS,
    signal_fraction: float | None = None,
    seed: int = 0,
    mass: str = "jet",
    log: Callable[[str], None] = print,
) -> dict:
    """Convert inputs to one dataset in `out`, or with `split` to out/<name> parts (first rows first).

    ROOT inputs are read with `mapping` (the JetClass layout unless told) and cut or padded to
    `num_points` particles per jet, LHCO events to `num_points` particles per event; HDF5 inputs keep theirs.
    `signal_fraction` (LHCO only) keeps all background and a `seed`ed random subset of the signal so that
    signal is that fraction of the kept events (lhco.SignalSampler). `mass` "massless" or "softdrop"
    stores each jet's massless or soft-drop mass (data/groom.py) in the `mass` column and bins it into the
    target; the selection's mass window stays on the jet mass.

    With a split or `ranks` the inputs are read twice (count, then write) so that memory stays bounded;
    `ranks` sizes each output's row groups for that many training processes (row_group_size_for).
    Returns {'files': [FileReport...], 'outputs': {dir: {'jets': n, 'shards': [paths]}}}.
    """
    if not inputs:
        raise UserError("no input files")
    if chunk is not None and chunk < 1:
        raise UserError(f"chunk size must be positive, got {chunk}")
    if ranks is not None and ranks < 1:
        raise UserError(f"--ranks must be positive, got {ranks}")
    if num_points < 1:
        raise UserError(f"--num-points must be positive, got {num_points}")
    if signal_fraction is not None and not 0 <= signal_fraction < 1:
        raise UserError(f"--signal-fraction must be in [0, 1), got {signal_fraction}")
    found = [inspect_input(p, mapping, num_points) for p in inputs]
    is_lhco = [i.format == "lhco" for i in found]
    if any(is_lhco) and not all(is_lhco):
        raise DataError(", ".join(f"{i.path}: {i.format}" for i in found) + ": LHC Olympics events cannot be "
                        "mixed with jet inputs")
    if signal_fraction is not None and not all(is_lhco):
        raise UserError("--signal-fraction applies to LHC Olympics inputs only")
    if mass not in MASS_KINDS:
        raise UserError(f"--mass {mass!r}: expected one of {', '.join(MASS_KINDS)}")
    if mass != "jet" and is_lhco[0]:
        raise UserError(f"{found[0].path}: LHC Olympics events keep their dijet mass; --mass {mass} applies to jet "
                        "inputs only")
    for what, show in (("number of points per jet", lambda i: f"{i.num_points} points"),
                       ("classes", lambda i: "classes " + "/".join(i.class_names))):
        if len({show(i) for i in found}) > 1:
            raise DataError(", ".join(f"{i.path}: {show(i)}" for i in found) + f": inputs must have the same {what}")
    chunk = chunk or (lhco.DEFAULT_CHUNK if is_lhco[0] else DEFAULT_CHUNK)
    meta = (lhco.meta(num_points) if is_lhco[0]
            else DatasetMeta(num_points=found[0].num_points, class_names=found[0].class_names, mass=mass))
    out = Path(out)
    parts = split or [("", 1.0)]
    dirs = [out / name if name else out for name, _ in parts]
    writers: list[ShardWriter] = []
    try:
        writers = [ShardWriter(d, meta, shard_size=shard_size, row_group_size=row_group_size, overwrite=overwrite)
                   for d in dirs]  # checks the outputs before the (long) reading
        bounds, sampler = [np.iinfo(np.int64).max], None
        if split or ranks or signal_fraction is not None:
            # pass 1: count kept jets to place the boundaries, size the row groups and pick the signal subset
            labels = np.concatenate([np.zeros(0, np.int32)] + [a["label"] for a in _iter_inputs(found, chunk,
                                                                                                 mass_bins)[1]])
            if signal_fraction is not None:
                sampler = lhco.SignalSampler(labels, signal_fraction, seed)
            total = len(labels) if sampler is None else sampler.num_kept
            bounds = [int(c * total) for c in np.cumsum([f for _, f in parts])[:-1]] + [total]
            if ranks:
                for w, n in zip(writers, np.diff([0] + bounds)):
                    w.resize_row_groups(row_group_size_for(int(n), ranks, row_group_size))
        reports, it = _iter_inputs(found, chunk, mass_bins, sampler)
        pos = 0
        bar = Progress(sum(i.n for i in found), "jets", "soft-drop mass: read", enabled=mass == "softdrop")
        for a in it:
            if mass != "jet":
                a = {**a, "mass": (softdrop_mass if mass == "softdrop" else massless_mass)(a["x"])}
                a["target"] = mass_bin(a["mass"])
                bar.update(sum(r.read for r in reports), f"{pos + len(a['label'])} kept")
            n, s = len(a["label"]), 0
            while s < n:
                w = next(k for k, b in enumerate(bounds) if pos < b)
                take = min(n - s, bounds[w] - pos)
                writers[w].add({k: v[s:s + take] for k, v in a.items()})
                s, pos = s + take, pos + take
        bar.close()
        if pos == 0:
            raise DataError(f"{', '.join(map(str, inputs))}: no jet passed the selection")
        for d, w in zip(dirs, writers):
            if w.num_rows == 0:
                raise DataError(f"{d}: split part would be empty ({pos} jets kept in total)")
        for w in writers:  # everything written before anything becomes visible
            w.finish()
        outputs = {str(d): {"jets": w.num_rows, "shards": w.commit()} for d, w in zip(dirs, writers)}
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for r in reports:
        log(r.line())
    if len(reports) > 1 and is_lhco[0]:
        log(lhco.LhcoReport.total(reports).line())
    elif len(reports) > 1:
        tot = [sum(getattr(r, k) for r in reports) for k in ("read", "kept", "not_wzt", "mass_window", "nonfinite")]
        cls = [sum(r.per_class[k] for r in reports) for k in range(len(meta.class_names))]
        log(f"total: read {tot[0]}, kept {tot[1]}; dropped: not {'/'.join(meta.class_names)} {tot[2]}, mass "
            f"window {tot[3]}, non-finite {tot[4]}; " + ", ".join(f"{n} {c}" for n, c in zip(meta.class_names, cls)))
    for d, o in outputs.items():
        log(f"wrote {d}: {o['jets']} {'events' if is_lhco[0] else 'jets'} in {len(o['shards'])} shard(s)")
    return {"files": reports, "outputs": outputs}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="hls4ml raw or UCluster-prepared HDF5 files, ROOT files (JetClass layout unless "
                        "--root-mapping), or LHC Olympics R&D events (events_anomalydetection.h5 layout)")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--split", default=None, help="e.g. train=0.8,test=0.2: first 80%% of the kept jets "
                        "to OUT/train, the rest to OUT/test, in input order (as the original); default: no split")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help="jets per parquet shard (rounded up to whole row groups)")
    parser.add_argument("--row-group-size", type=int, default=DEFAULT_ROW_GROUP_SIZE, help="jets per row group")
    parser.add_argument("--ranks", type=int, default=None,
                        help="size row groups for this many training processes: equal groups, a multiple of "
                        "RANKS of them, at least 4 per rank, at most --row-group-size jets (reads the inputs twice)")
    parser.add_argument("--chunk", type=int, default=None, help=f"jets (LHCO: events) read from a file at a time "
                        f"(default {DEFAULT_CHUNK}, LHCO {lhco.DEFAULT_CHUNK}: its events take ~1 GB per 4096)")
    parser.add_argument("--root-mapping", type=Path, metavar="FILE",
                        help="ROOT inputs: YAML naming the tree, particle, jet and label branches (README); "
                        "default: the JetClass layout")
    parser.add_argument("--classes", metavar="NAMES",
                        help="ROOT inputs: the classes kept, in label order, e.g. W,Z,top,QCD (default: W,Z,top "
                        "for JetClass, the mapping's select)")
    parser.add_argument("--num-points", type=int, default=DEFAULT_POINTS,
                        help="ROOT inputs: particles per jet, the highest-pT ones; LHCO inputs: particles per "
                        "event, jet 1's then jet 2's; zero-padded")
    parser.add_argument("--signal-fraction", type=float, default=None, metavar="F",
                        help="LHCO inputs: keep all background and a random subset of the signal so that signal "
                        "is the fraction F of the kept events (reads the inputs twice); default: keep all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --signal-fraction subset")
    parser.add_argument("--mass-bins", action="store_true",
                        help="prepared-format inputs: recompute the target from masses with fixed bins "
                        "instead of using their per-file renumbered pid")
    parser.add_argument("--mass", choices=MASS_KINDS, default="jet",
                        help="jet inputs: what the `mass` column and the target's mass bins hold: the jet mass "
                        "(the original's), the massless mass (the kept particles taken massless: the hadron "
                        "masses' scatter left out) or the soft-drop mass (z_cut 0.1, beta 2, R0 0.8; about 1 ms "
                        "per jet), which separate W from Z jets better (docs/RESULTS.md); default: jet")
    parser.add_argument("--overwrite", action="store_true", help="replace datasets already in the output")


def run(args: argparse.Namespace) -> int:
    mapping = root.load_mapping(args.root_mapping) if args.root_mapping else root.JETCLASS
    if args.classes:
        mapping = mapping.with_classes(tuple(c.strip() for c in args.classes.split(",")))
    prepare(args.inputs, args.out, split=parse_split(args.split), shard_size=args.shard_size,
            row_group_size=args.row_group_size, chunk=args.chunk, mass_bins=args.mass_bins,
            overwrite=args.overwrite, ranks=args.ranks, mapping=mapping, num_points=args.num_points,
            signal_fraction=args.signal_fraction, seed=args.seed, mass=args.mass)
    return 0
