"""Chunk files (hls4ml HDF5, written atomically), merged files and parquet shards."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from ucluster_jax.data.generate.spec import (
    JET_FEATURE_NAMES, MAX_CONSTITUENTS, PARTICLE_FEATURES, PARTICLE_FEATURE_NAMES, _JET_COL,
)


def _names(names) -> np.ndarray:
    return np.array([n.encode() for n in names])  # fixed-length bytes, as the hls4ml files


def write_h5_atomic(path: Path, constituents: np.ndarray, jets: np.ndarray,
                    attrs: dict | None = None) -> None:
    """Write one hls4ml-layout file under a hidden temporary name, then rename it into place."""
    with atomic_h5(path) as f:
        kw = dict(compression="gzip", compression_opts=4, track_times=False)
        f.create_dataset("jetConstituentList", data=constituents.astype(np.float32),
                         chunks=(max(1, min(len(jets), 256)), MAX_CONSTITUENTS, len(PARTICLE_FEATURES))
                         if len(jets) else None, **kw)
        f.create_dataset("jets", data=jets.astype(np.float32), **kw)
        f.create_dataset("jetFeatureNames", data=_names(JET_FEATURE_NAMES), track_times=False)
        f.create_dataset("particleFeatureNames", data=_names(PARTICLE_FEATURE_NAMES), track_times=False)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


@contextlib.contextmanager
def atomic_h5(path: Path):
    """An h5py.File open for writing under a hidden temporary name, renamed to `path` only when
    the block completes: readers and resumed runs never see a half-written file."""
    import h5py

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w", track_order=False) as f:
            yield f
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


def merge_h5(files: list[Path], out: Path) -> None:
    """Concatenate chunk files into one hls4ml-layout file (written atomically)."""
    import h5py

    n = 0
    for p in files:
        with h5py.File(p, "r") as f:
            n += f["jets"].shape[0]
    with atomic_h5(out) as g:
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
