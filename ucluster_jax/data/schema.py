"""Parquet layout of a ucluster dataset and an atomic, streaming shard writer (docs/DATA.md).

A dataset is a directory of `part-NNNNN.parquet` shards with many row groups each, so that ranks can
split the data by row group and stream it (the distributed port wrote one row group: SPEC 6.6).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ucluster_jax.data.features import FEATURE_NAMES, MASS_KINDS, NUM_TARGETS
from ucluster_jax.errors import DataError, UserError

FORMAT_VERSION = 1
CLASS_NAMES: tuple[str, ...] = ("W", "Z", "top")
META_PREFIX = "ucluster."
DEFAULT_ROW_GROUP_SIZE = 2048
DEFAULT_SHARD_SIZE = 32 * DEFAULT_ROW_GROUP_SIZE
SHARD_GLOB = "*.parquet"
OPTIONAL_META = {"target_per_point", "mass"}  # added later: older datasets read as per-jet targets, jet mass

# per-jet scalar columns and their arrow types
SCALAR_COLUMNS: dict[str, pa.DataType] = {"target": pa.int32(), "label": pa.int32(), "mass": pa.float32()}


@dataclass(frozen=True)
class DatasetMeta:
    """What a reader needs to interpret the columns; stored as JSON in the parquet schema metadata."""

    num_points: int = 100
    num_features: int = len(FEATURE_NAMES)
    feature_names: tuple[str, ...] = field(default=FEATURE_NAMES)
    num_targets: int = NUM_TARGETS
    class_names: tuple[str, ...] = field(default=CLASS_NAMES)
    num_global: int = 0
    format_version: int = FORMAT_VERSION
    # True: `target` is one class per particle [num_points] (the anomaly task's jet-mass bin of each
    # particle's jet), not one per jet
    target_per_point: bool = False
    # what the `mass` column (and the target binned from it) holds: "jet", the mass of all the jet's
    # constituents, "massless", that of its kept particles taken massless, or "softdrop", its groomed
    # mass (`ucluster prepare --mass`, data/groom.py)
    mass: str = "jet"

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_names", tuple(str(n) for n in self.feature_names))
        object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))
        for name in ("num_points", "num_features", "num_targets", "num_global", "format_version"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (0 if name == "num_global" else 1):
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if not isinstance(self.target_per_point, bool):
            raise ValueError(f"target_per_point={self.target_per_point!r} must be true or false")
        if self.mass not in MASS_KINDS:
            raise ValueError(f"mass={self.mass!r} must be one of {', '.join(MASS_KINDS)}")
        if len(self.feature_names) != self.num_features:
            raise ValueError(f"{len(self.feature_names)} feature_names for num_features={self.num_features}")

    @property
    def mass_name(self) -> str:
        """What the `mass` column holds, as plots name it."""
        return {"jet": "jet mass", "massless": "massless jet mass", "softdrop": "soft-drop mass"}[self.mass]

    @property
    def particle_size(self) -> int:
        return self.num_points * self.num_features

    def row_columns(self) -> dict[str, tuple[pa.DataType, tuple[int, ...]]]:
        """Every column but `particles`: name -> (arrow value type, shape of one row's value)."""
        cols = {k: (t, ()) for k, t in SCALAR_COLUMNS.items()}
        if self.target_per_point:
            cols["target"] = (pa.int32(), (self.num_points,))
        if self.num_global:
            cols["global"] = (pa.float32(), (self.num_global,))
        return cols

    def arrow_schema(self) -> pa.Schema:
        fields = [pa.field("particles", pa.list_(pa.float32(), self.particle_size), nullable=False)]
        fields += [pa.field(k, pa.list_(t, shape[0]) if shape else t, nullable=False)
                   for k, (t, shape) in self.row_columns().items()]
        return pa.schema(fields, metadata=self.to_metadata())

    def to_metadata(self) -> dict[str, str]:
        return {META_PREFIX + k: json.dumps(list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: Mapping[bytes, bytes] | None) -> DatasetMeta:
        """Parse schema metadata; ValueError says what is wrong (the reader adds the file name)."""
        md = {k.decode(): v.decode() for k, v in (metadata or {}).items() if k.decode().startswith(META_PREFIX)}
        if not md:
            raise ValueError("no ucluster.* schema metadata (not written by ucluster prepare/toy?)")
        try:
            values = {k[len(META_PREFIX):]: json.loads(v) for k, v in md.items()}
        except json.JSONDecodeError as e:
            raise ValueError(f"schema metadata is not valid JSON ({e})") from None
        version = values.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version {version!r} is not supported (this reader knows {FORMAT_VERSION})")
        known = {f for f in cls.__dataclass_fields__}
        missing = sorted(known - set(values) - OPTIONAL_META)
        if missing:
            raise ValueError(f"schema metadata lacks {', '.join(META_PREFIX + m for m in missing)}")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in known}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"inconsistent schema metadata: {e}") from None


def _shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


class ShardWriter:
    """Streams jets into `part-NNNNN.parquet` shards of whole row groups.

    Shards are written under hidden temporary names and renamed only by `commit()`, so an error
    (or `abort()`) leaves no half-written dataset. Every row group holds `row_group_size` jets except
    the dataset's very last one (shards hold a whole number of row groups), which keeps ranks balanced.
    """

    def __init__(
        self,
        out_dir: str | Path,
        meta: DatasetMeta,
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
        overwrite: bool = False,
    ) -> None:
        if row_group_size < 1 or shard_size < 1:
            raise UserError(f"shard_size ({shard_size}) and row_group_size ({row_group_size}) must be positive")
        self.out_dir = Path(out_dir)
        self.meta = meta
        self.row_group_size = row_group_size
        self.groups_per_shard = max(1, -(-shard_size // row_group_size))  # round up to whole row groups
        self.overwrite = overwrite
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserError(f"{self.out_dir}: exists and is not a directory")
        existing = sorted(self.out_dir.glob(SHARD_GLOB)) if self.out_dir.is_dir() else []
        if existing and not overwrite:
            raise UserError(f"{self.out_dir}: already holds {len(existing)} parquet file(s); "
                            "choose another directory or overwrite it (--overwrite)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._schema = meta.arrow_schema()
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._groups_in_shard = 0
        self._tmp: list[Path] = []
        self.num_rows = 0  # jets added so far
        self._done = False

    def resize_row_groups(self, row_group_size: int) -> None:
        """Change the row-group size before the first add() (prepare --ranks sizes it from the jet count)."""
        if self.num_rows or row_group_size < 1:
            raise RuntimeError("row groups are resized only before any jet is added, to a positive size")
        shard_size = self.groups_per_shard * self.row_group_size
        self.row_group_size = row_group_size
        self.groups_per_shard = max(1, -(-shard_size // row_group_size))

    def _tmp_name(self, i: int) -> Path:
        return self.out_dir / f".{_shard_name(i)}.{os.getpid()}.tmp"

    def _check(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        m = self.meta
        if "x" not in arrays:
            raise ValueError("arrays need an 'x' entry [N, num_points, num_features]")
        x = np.ascontiguousarray(arrays["x"], dtype=np.float32)
        n = x.shape[0]
        if x.shape != (n, m.num_points, m.num_features):
            raise ValueError(f"x has shape {x.shape}, expected (N, {m.num_points}, {m.num_features})")
        if not np.isfinite(x).all():
            raise DataError(f"{self.out_dir}: refusing to write non-finite particle features")
        out = {"x": x}
        for k, (t, shape) in m.row_columns().items():
            if k not in arrays:
                raise ValueError(f"arrays lack '{k}'")
            raw = np.asarray(arrays[k])
            a = np.ascontiguousarray(raw.astype(t.to_pandas_dtype(), copy=False))
            if a.shape != (n, *shape):
                raise ValueError(f"{k} has shape {a.shape}, expected {(n, *shape)}")
            if not np.isfinite(raw).all() or (a.dtype.kind == "i" and not np.array_equal(a, raw)):
                raise DataError(f"{self.out_dir}: refusing to write non-finite or non-integer '{k}' values")
            out[k] = a
        return out

    def add(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Queue jets (dict with x [N,P,F] and meta.row_columns()); writes full row groups."""
        if self._done:
            raise RuntimeError("writer already committed or aborted")
        a = self._check(arrays)
        if len(a["x"]) == 0:
            return
        self._pending.append(a)
        self._pending_rows += len(a["x"])
        self.num_rows += len(a["x"])
        while self._pending_rows >= self.row_group_size:
            self._write_group(self.row_group_size)

    def _take(self, n: int) -> dict[str, np.ndarray]:
        """Pop the first n queued rows (slices, so a big add() is not re-copied per row group)."""
        parts, need = [], n
        while need:
            head = self._pending[0]
            k = len(head["x"])
            if k <= need:
                parts.append(self._pending.pop(0))
                need -= k
            else:
                parts.append({c: v[:need] for c, v in head.items()})
                self._pending[0] = {c: v[need:] for c, v in head.items()}
                need = 0
        self._pending_rows -= n
        return parts[0] if len(parts) == 1 else {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}

    def _write_group(self, n: int) -> None:
        a = self._take(n)
        cols = [pa.FixedSizeListArray.from_arrays(pa.array(a["x"].reshape(-1)), self.meta.particle_size)]
        cols += [pa.FixedSizeListArray.from_arrays(pa.array(a[k].reshape(-1), type=t), shape[0]) if shape
                 else pa.array(a[k], type=t) for k, (t, shape) in self.meta.row_columns().items()]
        table = pa.Table.from_arrays(cols, schema=self._schema)
        if self._writer is None:
            path = self._tmp_name(len(self._tmp))
            self._tmp.append(path)
            self._writer = pq.ParquetWriter(path, self._schema, compression="zstd", use_dictionary=False)
            self._groups_in_shard = 0
        self._writer.write_table(table, row_group_size=n)
        self._groups_in_shard += 1
        if self._groups_in_shard >= self.groups_per_shard:
            self._writer.close()
            self._writer = None

    def finish(self) -> None:
        """Write the last (short) row group and close the file; still invisible until commit()."""
        if self._done:
            raise RuntimeError("writer already committed or aborted")
        try:
            if self._pending_rows:
                self._write_group(self._pending_rows)
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        except BaseException:
            self.abort()
            raise

    def commit(self) -> list[Path]:
        """finish(), then rename the shards into place (replacing an old dataset's shards if overwriting)."""
        self.finish()
        self._done = True
        final = [self.out_dir / _shard_name(i) for i in range(len(self._tmp))]
        for tmp, dst in zip(self._tmp, final):
            os.replace(tmp, dst)
        if self.overwrite:
            for old in set(self.out_dir.glob(SHARD_GLOB)) - set(final):
                old.unlink()
        return final

    def abort(self) -> None:
        """Remove everything this writer wrote; the directory is left as it was."""
        self._done = True
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:
                pass
            self._writer = None
        for tmp in self._tmp:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._done:
                self.commit()
        else:
            self.abort()


def write_shards(
    out_dir: str | Path,
    arrays: Mapping[str, np.ndarray],
    meta: DatasetMeta,
    shard_size: int = DEFAULT_SHARD_SIZE,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write in-memory jets as a dataset; returns the shard paths. All or nothing (see ShardWriter)."""
    with ShardWriter(out_dir, meta, shard_size=shard_size, row_group_size=row_group_size, overwrite=overwrite) as w:
        w.add(arrays)
        return w.commit()
