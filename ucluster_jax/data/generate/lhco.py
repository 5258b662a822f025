"""The LHC Olympics 2020 R&D file layout, written with h5py (no pandas or PyTables needed).

The public `events_anomalydetection.h5` is a pandas "fixed" frame (`DataFrame.to_hdf(key="df")`):
group `df` with `block0_values` float64 [N, 3*700+1] (particles' pT, eta, phi, then the label),
the column and row indexes beside it and the attributes pandas and PyTables look for. Readers here
use `df/block0_values` only; the rest is written so that `pandas.read_hdf` reads the file too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ucluster_jax.data.generate.writers import atomic_h5

ROW_CHUNK = 128  # HDF5 chunk: 128 rows (2 MiB uncompressed), for readers that go in row chunks

# Attributes as PyTables writes them: bytes are ASCII strings, str are UTF-8 strings (PyTables
# gives those back as str, which pandas needs for its own attributes), "" an empty string.
_ROOT_ATTRS = {"CLASS": "GROUP", "PYTABLES_FORMAT_VERSION": "2.1", "TITLE": "", "VERSION": "1.0"}
_ARRAY_ATTRS = {"CLASS": b"CARRAY", "TITLE": b"", "VERSION": b"1.1", "transposed": np.uint8(1)}
_INDEX_ATTRS = {**_ARRAY_ATTRS, "name": b"N."}  # b"N." = pickled None: an unnamed index
_FRAME_ATTRS = {
    "CLASS": "GROUP", "TITLE": "", "VERSION": "1.0", "pandas_type": "frame", "pandas_version": "0.15.2",
    "encoding": "UTF-8", "errors": "strict", "ndim": np.int64(2), "nblocks": np.int64(1),
    "block0_items_variety": "regular", "axis0_variety": "regular", "axis1_variety": "regular",
}


def _set_attrs(obj, attrs: dict) -> None:
    import h5py

    for k, v in attrs.items():
        if isinstance(v, (bytes, str)):
            raw = v.encode() if isinstance(v, str) else v
            dtype = h5py.string_dtype("utf-8" if isinstance(v, str) else "ascii", max(len(raw), 1))
            v = h5py.Empty(dtype) if not raw else np.array(raw, dtype=dtype)
            obj.attrs.create(k, v, dtype=dtype)
        else:
            obj.attrs[k] = v


def write_lhco(path: Path, n_rows: int, n_cols: int, fill, attrs: dict) -> None:
    """Write one LHCO-layout file atomically: `fill(block0_values dataset)` writes the rows;
    `attrs` go on the file's root (the chunk key and statistics of this project)."""
    kw = dict(compression="gzip", compression_opts=4, track_times=False)
    with atomic_h5(path) as f:
        _set_attrs(f, _ROOT_ATTRS)
        for k, v in attrs.items():
            f.attrs[k] = v
        g = f.create_group("df")
        _set_attrs(g, _FRAME_ATTRS)
        names = np.array([str(i).encode() for i in range(n_cols)])
        for key, data, kind in (("axis0", names, "string"), ("block0_items", names, "string"),
                                ("axis1", np.arange(n_rows, dtype=np.int64), "integer")):
            _set_attrs(g.create_dataset(key, data=data, chunks=True if len(data) else None, **kw),
                       {**_INDEX_ATTRS, "kind": kind, **({"nan_rep": ""} if kind == "string" else {})})
        ds = g.create_dataset("block0_values", shape=(n_rows, n_cols), dtype=np.float64,
                              chunks=(min(n_rows, ROW_CHUNK), n_cols) if n_rows else None, **kw)
        _set_attrs(ds, _ARRAY_ATTRS)
        fill(ds)


def write_lhco_rows(path: Path, values: np.ndarray, attrs: dict) -> None:
    def fill(ds):
        if len(values):
            ds[:] = values

    write_lhco(path, values.shape[0], values.shape[1], fill, attrs)


def read_lhco(path: Path) -> np.ndarray:
    """`df/block0_values` of an LHCO-layout file: [N, 2101] float64."""
    import h5py

    with h5py.File(path, "r") as f:
        return f["df/block0_values"][:]


def merge_lhco(files: list[Path], out: Path) -> None:
    """Concatenate LHCO-layout chunk files, in order, into one LHCO-layout file (atomically)."""
    import h5py

    shapes, keys = [], []
    for p in files:
        with h5py.File(p, "r") as f:
            shapes.append(f["df/block0_values"].shape)
            keys.append(json.loads(f.attrs.get("ucluster_generate_key", "null")))

    def fill(ds):
        i = 0
        for p, (m, _) in zip(files, shapes):
            with h5py.File(p, "r") as f:
                src = f["df/block0_values"]
                for a in range(0, m, ROW_CHUNK * 8):  # bounded memory for large chunks
                    b = min(m, a + ROW_CHUNK * 8)
                    ds[i + a:i + b] = src[a:b]
            i += m

    write_lhco(out, sum(s[0] for s in shapes), shapes[0][1], fill,
               {"ucluster_generate_chunks": json.dumps(keys, sort_keys=True)})
