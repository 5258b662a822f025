"""Streaming, rank-aware reader of ucluster parquet datasets (docs/DATA.md).

An epoch is the same global batches for any world size (lanes.py); each rank reads only the row
groups that hold its rows, a window at a time, and derives the number of steps from file metadata
alone, so ranks stay in lockstep without communicating and a run can resume at any step.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ucluster_jax.data.lanes import Lane, RowRanges, check_lanes, lane_bounds, rank_lanes
from ucluster_jax.data.schema import SHARD_GLOB, DatasetMeta
from ucluster_jax.errors import DataError, UserError


@dataclass(frozen=True)
class RowGroup:
    file: int  # index into ParquetDataset.files
    index: int  # row group within the file
    rows: int


def _check_schema(path: Path, schema: pa.Schema, meta: DatasetMeta) -> None:
    want = {"particles": pa.list_(pa.float32(), meta.particle_size),
            **{k: pa.list_(t, shape[0]) if shape else t for k, (t, shape) in meta.row_columns().items()}}
    for name, typ in want.items():
        idx = schema.get_field_index(name)
        if idx < 0:
            raise DataError(f"{path}: missing column '{name}' (has {', '.join(schema.names)})")
        got = schema.field(idx).type
        if got != typ:
            hint = ""
            if name == "particles" and pa.types.is_fixed_size_list(got):
                hint = (f": list size {got.list_size} != num_points*num_features = "
                        f"{meta.num_points}*{meta.num_features} = {meta.particle_size}")
            raise DataError(f"{path}: column '{name}' has type {got}, expected {typ}{hint}")


def _close(handles: dict[int, pq.ParquetFile]) -> None:
    for h in handles.values():
        h.close()


class ParquetDataset:
    """A dataset directory (or one .parquet file) seen from one rank of `world`.

    Opening reads only parquet footers: schema, metadata and row-group sizes of every file.
    """

    def __init__(self, path: str | Path, *, rank: int = 0, world: int = 1) -> None:
        if not (isinstance(world, (int, np.integer)) and isinstance(rank, (int, np.integer))
                and world >= 1 and 0 <= rank < world):
            raise UserError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        self.path, self.rank, self.world = Path(path), int(rank), int(world)
        if self.path.is_dir():
            self.files = sorted(self.path.glob(SHARD_GLOB))
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise DataError(f"{self.path}: no such dataset directory or parquet file")
        if not self.files:
            raise DataError(f"{self.path}: empty dataset (no {SHARD_GLOB} files)")
        self.groups: list[RowGroup] = []
        meta: DatasetMeta | None = None
        for fi, f in enumerate(self.files):
            try:
                md = pq.read_metadata(f)
                schema = md.schema.to_arrow_schema()
            except Exception as e:  # ArrowInvalid, OSError, ...: truncated or not parquet
                raise DataError(f"{f}: not a readable parquet file ({e})") from None
            try:
                m = DatasetMeta.from_metadata(schema.metadata)
            except ValueError as e:
                raise DataError(f"{f}: {e}") from None
            if meta is None:
                meta = m
            elif m != meta:
                raise DataError(f"{f}: dataset metadata {m} differs from {self.files[0].name}'s {meta}")
            _check_schema(f, schema, m)
            self.groups += [RowGroup(fi, i, md.row_group(i).num_rows) for i in range(md.num_row_groups)
                            if md.row_group(i).num_rows > 0]
        assert meta is not None
        self.meta: DatasetMeta = meta
        self.num_jets: int = sum(g.rows for g in self.groups)
        if self.num_jets == 0:
            raise DataError(f"{self.path}: empty dataset (no jets in {len(self.files)} file(s))")

    # -- one epoch, the same for any world size (lanes.py) ----------------------------------------------
    def steps_per_epoch(self, global_batch: int) -> int:
        """Global batches per epoch: floor(num_jets / global_batch), whatever the world size.

        Each of the L lanes holds floor(N/L) or ceil(N/L) jets and gives floor(floor(N/L) / (B/L)) =
        floor(N/B) chunks, so fewer than B jets (lane tails) are left out of an epoch.
        """
        if global_batch < 1:
            raise UserError(f"global batch size must be positive, got {global_batch}")
        return self.num_jets // global_batch

    def _stream(self, order: np.ndarray, handles: dict[int, pq.ParquetFile]) -> RowRanges:
        """The row groups in `order` as one stream of rows (files opened once, into `handles`)."""
        groups = [self.groups[i] for i in order]
        return RowRanges([g.rows for g in groups], lambda k: self._read_group(handles, groups[k]))

    def _order(self, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
        if seed < 0 or epoch < 0:
            raise UserError(f"seed ({seed}) and epoch ({epoch}) must be non-negative")
        n = len(self.groups)
        return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)

    def read_factor(self) -> float:
        """Worst case, jets a rank decodes per jet it trains on: its share plus a partly used row group at
        each end (row groups decode whole). Near 1 when every rank's share spans many row groups."""
        share = self.num_jets / self.world
        return (share + 2 * max(g.rows for g in self.groups) - 2) / share if self.world > 1 else 1.0

    def batches(
        self,
        global_batch: int,
        *,
        lanes: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        buffer_row_groups: int = 4,
        start_step: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """This rank's part of global batches start_step .. steps_per_epoch(global_batch) - 1.

        A local batch is the concatenation of the rank's lanes' chunks (global_batch/world jets), so the
        ranks' batches in rank order are the one-process global batch. Each lane holds a window of
        buffer_row_groups * (largest row group) / lanes jets and one decoded row group, so a rank
        holds about buffer_row_groups/world row groups' worth of windows. Starting at a step seeks
        there: only the windows from that step on are read.
        """
        check_lanes(lanes, global_batch, self.world)
        if buffer_row_groups < 1:
            raise UserError(f"buffer_row_groups must be positive, got {buffer_row_groups}")
        steps = self.steps_per_epoch(global_batch)
        if not 0 <= start_step <= steps:
            raise UserError(f"start step {start_step} outside the epoch's 0..{steps} steps")
        order = self._order(seed, epoch, shuffle)
        window = max(1, buffer_row_groups * max(g.rows for g in self.groups) // lanes)
        bounds = lane_bounds(self.num_jets, lanes)
        handles: dict[int, pq.ParquetFile] = {}
        # each lane its own stream: a lane's windows share row groups with its next window, not with other lanes
        mine = [Lane(self._stream(order, handles), *bounds[l], window, [seed, epoch, l] if shuffle else None)
                for l in rank_lanes(lanes, self.rank, self.world)]
        chunk = global_batch // lanes
        try:
            for s in range(start_step, steps):
                parts = [lane.rows(s * chunk, (s + 1) * chunk) for lane in mine]
                yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        finally:
            _close(handles)

    # -- reading -----------------------------------------------------------------------------------
    def _read_group(self, handles: dict[int, pq.ParquetFile], g: RowGroup) -> dict[str, np.ndarray]:
        """Read one row group as numpy arrays; any problem -> DataError naming file and row group."""
        path = self.files[g.file]
        where = f"{path}: row group {g.index}"
        m = self.meta
        try:
            if g.file not in handles:
                handles[g.file] = pq.ParquetFile(path)
            table = handles[g.file].read_row_group(g.index)
        except Exception as e:
            raise DataError(f"{where}: cannot read ({e})") from None
        if table.num_rows != g.rows:
            raise DataError(f"{where}: has {table.num_rows} rows, footer said {g.rows} (file changed?)")
        out: dict[str, np.ndarray] = {}
        columns = {"particles": (pa.float32(), (m.num_points, m.num_features)), **m.row_columns()}
        for name, (_, shape) in columns.items():
            col = table.column(name).combine_chunks()
            if col.null_count:
                raise DataError(f"{where}: {col.null_count} null value(s) in '{name}'")
            arr = (col.flatten() if shape else col).to_numpy(zero_copy_only=False).reshape(g.rows, *shape)
            if arr.dtype.kind == "f":
                arr = arr.astype(np.float32, copy=False)
                bad = ~np.isfinite(arr).reshape(g.rows, -1).all(axis=1)
                if bad.any():
                    raise DataError(f"{where}: non-finite values in '{name}' (first bad row "
                                    f"{int(np.argmax(bad))}, {int(bad.sum())} row(s))")
            out["x" if name == "particles" else name] = arr
        checks = (
            ("target", (out["target"] < 0) | (out["target"] >= m.num_targets), f"outside 0..{m.num_targets - 1}"),
            ("label", (out["label"] < -1) | (out["label"] >= len(m.class_names)),
             f"outside -1..{len(m.class_names) - 1}"),
            ("mass", ~np.isfinite(out["mass"]), "non-finite"),
        )
        for name, bad, what in checks:
            bad = bad.reshape(g.rows, -1).any(axis=1)
            if bad.any():
                raise DataError(f"{where}: '{name}' {what} (first bad row {int(np.argmax(bad))})")
        return out

    def iter_all(self, batch: int) -> Iterator[dict[str, np.ndarray]]:
        """This rank's block of evaluation batches, unshuffled; nothing is dropped.

        The file-order stream is cut into batches of `batch` jets (the dataset's last one short);
        rank r gets the contiguous block [r*nb//world, (r+1)*nb//world) of those nb batches. The
        batches are the same jets for any world size, and gathering in rank order gives file order
        (k-means++ seeding and BatchNorm with batch statistics depend on both).
        """
        if batch < 1:
            raise UserError(f"batch size must be positive, got {batch}")
        nb = -(-self.num_jets // batch)
        handles: dict[int, pq.ParquetFile] = {}
        stream = self._stream(np.arange(len(self.groups)), handles)
        try:
            for i in range(self.rank * nb // self.world, (self.rank + 1) * nb // self.world):
                yield stream.rows(i * batch, min((i + 1) * batch, self.num_jets))
        finally:
            _close(handles)

    def read_all(self) -> dict[str, np.ndarray]:
        """This rank's rows of iter_all, in file order, in memory (small datasets, tests)."""
        parts = list(self.iter_all(max(g.rows for g in self.groups)))
        if not parts:  # fewer evaluation batches than ranks
            m = self.meta
            parts = [{"x": np.zeros((0, m.num_points, m.num_features), np.float32),
                      **{k: np.zeros((0, *shape), t.to_pandas_dtype()) for k, (t, shape) in m.row_columns().items()}}]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def __repr__(self) -> str:
        return (f"ParquetDataset({str(self.path)!r}, rank={self.rank}, world={self.world}: {self.num_jets} jets, "
                f"{len(self.groups)} row groups in {len(self.files)} file(s))")
