"""Streaming, rank-aware reader of ucluster parquet datasets (docs/DATA.md).

Each rank reads only its own row groups, a few at a time, and every rank derives the same number of
steps from file metadata alone, so data-parallel training needs no communication to stay in lockstep
and a run can resume exactly (same seed, epoch, rank, world -> same batches).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ucluster_jax.data.schema import SCALAR_COLUMNS, SHARD_GLOB, DatasetMeta
from ucluster_jax.errors import DataError, UserError


@dataclass(frozen=True)
class RowGroup:
    file: int  # index into ParquetDataset.files
    index: int  # row group within the file
    rows: int


def _check_schema(path: Path, schema: pa.Schema, meta: DatasetMeta) -> None:
    want = {"particles": pa.list_(pa.float32(), meta.particle_size), **SCALAR_COLUMNS}
    if meta.num_global:
        want["global"] = pa.list_(pa.float32(), meta.num_global)
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
        if len(self.groups) < world:
            raise DataError(f"{self.path}: {len(self.groups)} non-empty row group(s) for {world} ranks; every "
                            "rank needs at least one (rewrite with a smaller --row-group-size)")

    # -- assignment --------------------------------------------------------------------------------
    def _order(self, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
        if seed < 0 or epoch < 0:
            raise UserError(f"seed ({seed}) and epoch ({epoch}) must be non-negative")
        n = len(self.groups)
        return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)

    def rank_row_groups(self, *, seed: int = 0, epoch: int = 0, shuffle: bool = False) -> list[RowGroup]:
        """This rank's row groups for an epoch: entry i of the (permuted) global list goes to rank i % world."""
        return [self.groups[i] for i in self._order(seed, epoch, shuffle)[self.rank::self.world]]

    def steps_per_epoch(self, local_batch: int, epoch: int = 0) -> int:
        """Full batches every rank yields in an epoch; the same on all ranks, for any seed and shuffle.

        Rank r gets floor(G/world) or ceil(G/world) of the G row groups; the smallest possible share is
        the floor(G/world) smallest groups, so that bound fits every assignment. Writers make all row
        groups full but the dataset's last, so this equals min over ranks of floor(rows_of_rank /
        local_batch) up to less than one row group. (`epoch` is accepted for a per-epoch policy; unused.)
        """
        if local_batch < 1:
            raise UserError(f"local batch size must be positive, got {local_batch}")
        sizes = sorted(g.rows for g in self.groups)
        return sum(sizes[: len(sizes) // self.world]) // local_batch

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
        for name, width in (("particles", m.particle_size), ("global", m.num_global)):
            if name == "global" and not width:
                continue
            col = table.column(name).combine_chunks()
            if col.null_count:
                raise DataError(f"{where}: {col.null_count} null value(s) in '{name}'")
            values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            arr = values.reshape(g.rows, m.num_points, m.num_features) if name == "particles" else \
                values.reshape(g.rows, width)
            bad = ~np.isfinite(arr).reshape(g.rows, -1).all(axis=1)
            if bad.any():
                raise DataError(f"{where}: non-finite values in '{name}' (first bad row {int(np.argmax(bad))}, "
                                f"{int(bad.sum())} row(s))")
            out["x" if name == "particles" else name] = arr
        for name in SCALAR_COLUMNS:
            col = table.column(name)
            if col.null_count:
                raise DataError(f"{where}: {col.null_count} null value(s) in '{name}'")
            out[name] = col.to_numpy()
        checks = (
            ("target", (out["target"] < 0) | (out["target"] >= m.num_targets), f"outside 0..{m.num_targets - 1}"),
            ("label", (out["label"] < -1) | (out["label"] >= len(m.class_names)),
             f"outside -1..{len(m.class_names) - 1}"),
            ("mass", ~np.isfinite(out["mass"]), "non-finite"),
        )
        for name, bad, what in checks:
            if bad.any():
                raise DataError(f"{where}: '{name}' {what} (first bad row {int(np.argmax(bad))})")
        return out

    def batches(
        self,
        local_batch: int,
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        buffer_row_groups: int = 4,
        start_step: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield exactly steps_per_epoch(local_batch, epoch) - start_step batches of this rank's rows.

        Streams `buffer_row_groups` row groups at a time (plus fewer than local_batch leftover rows);
        with shuffle, jets are permuted within that buffer by rng([seed, epoch, rank]). start_step
        skips the first batches while replaying the same random stream (exact mid-epoch resume).
        Batches are views of a buffer that is never written again, so they stay valid.
        """
        if buffer_row_groups < 1:
            raise UserError(f"buffer_row_groups must be positive, got {buffer_row_groups}")
        steps = self.steps_per_epoch(local_batch, epoch)
        mine = self.rank_row_groups(seed=seed, epoch=epoch, shuffle=shuffle)
        rng = np.random.default_rng([seed, epoch, self.rank])
        handles: dict[int, pq.ParquetFile] = {}
        leftover: dict[str, np.ndarray] | None = None
        step, pos = 0, 0
        try:
            while step < steps:
                chunk = mine[pos:pos + buffer_row_groups]
                pos += len(chunk)
                assert chunk, "steps_per_epoch exceeded this rank's rows"
                parts = ([leftover] if leftover is not None else []) + [self._read_group(handles, g) for g in chunk]
                buf = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                del parts
                n = len(buf["x"])
                if shuffle:
                    perm = rng.permutation(n)
                    buf = {k: v[perm] for k, v in buf.items()}
                full = min(n // local_batch, steps - step)
                for b in range(full):
                    if step >= start_step:
                        yield {k: v[b * local_batch:(b + 1) * local_batch] for k, v in buf.items()}
                    step += 1
                rest = slice(full * local_batch, n)
                leftover = {k: v[rest].copy() for k, v in buf.items()} if n > full * local_batch else None
                del buf
        finally:
            for h in handles.values():
                h.close()

    def iter_all(self, batch: int) -> Iterator[dict[str, np.ndarray]]:
        """Every row of this rank (as read_all), streamed in batches of `batch`; the last may be short.

        For evaluation and embeddings: nothing is dropped, and ranks may yield different counts.
        """
        if batch < 1:
            raise UserError(f"batch size must be positive, got {batch}")
        handles: dict[int, pq.ParquetFile] = {}
        buf: dict[str, np.ndarray] | None = None
        try:
            for g in self.rank_row_groups(shuffle=False):
                part = self._read_group(handles, g)
                buf = part if buf is None else {k: np.concatenate([buf[k], part[k]]) for k in part}
                n = len(buf["x"]) // batch * batch
                for s in range(0, n, batch):
                    yield {k: v[s:s + batch] for k, v in buf.items()}
                buf = {k: v[n:] for k, v in buf.items()} if n < len(buf["x"]) else None
            if buf is not None:
                yield buf
        finally:
            for h in handles.values():
                h.close()

    def read_all(self) -> dict[str, np.ndarray]:
        """This rank's row groups (i % world == rank), unshuffled, in file order: evaluation input."""
        parts = list(self.iter_all(max(g.rows for g in self.groups)))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def __repr__(self) -> str:
        return (f"ParquetDataset({str(self.path)!r}, rank={self.rank}, world={self.world}: {self.num_jets} jets, "
                f"{len(self.groups)} row groups in {len(self.files)} file(s))")
