"""World-independent epochs: one global jet order cut into lanes (docs/DATA.md, "Epochs").

An epoch's jets form one virtual stream: the row groups (permuted by rng([seed, epoch]) when
shuffling, in file order otherwise) concatenated. Lane l is the contiguous range
[l*N//L, (l+1)*N//L) of that stream, shuffled in windows of a few row groups' worth with
rng([seed, epoch, l, window]). Global batch s is the concatenation over lanes of each lane's s-th
chunk of B/L jets. None of this depends on the number of processes: a rank owns a contiguous block
of lanes, so the ranks' local batches, concatenated in rank order, are the one-process batch.
Every piece is a pure function of (seed, epoch, step), so an epoch can start at any step.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ucluster_jax.errors import UserError

Arrays = dict[str, np.ndarray]


def check_lanes(lanes: int, global_batch: int, world: int) -> None:
    """The lane layout needs world | lanes | global_batch."""
    if lanes < 1 or global_batch % lanes or lanes % world:
        raise UserError(f"{lanes} data lanes must divide the global batch ({global_batch}) and be a multiple "
                        f"of the {world} process(es)")


class RowRanges:
    """Rows [a, b) of a stream of row groups, decoding each group once while a reader walks forward.

    `read(k)` decodes the k-th group of the stream; the last decoded group is kept, because
    consecutive ranges (windows, batches) mostly start inside the group the previous one ended in.
    """

    def __init__(self, sizes: list[int], read: Callable[[int], Arrays]) -> None:
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.read = read
        self._cached: tuple[int, Arrays] | None = None

    def _group(self, k: int) -> Arrays:
        if self._cached is None or self._cached[0] != k:
            self._cached = (k, self.read(k))
        return self._cached[1]

    def rows(self, a: int, b: int) -> Arrays:
        first = int(np.searchsorted(self.starts, a, side="right")) - 1
        parts = []
        k = first
        while a < b:
            lo, hi = self.starts[k], self.starts[k + 1]
            g = self._group(k)
            take = slice(a - lo, min(b, hi) - lo)
            parts.append({c: v[take] for c, v in g.items()})
            a = min(b, hi)
            k += 1
        return parts[0] if len(parts) == 1 else {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


class Lane:
    """One lane of an epoch: rows of the stream [start, end), shuffled within windows of `window` jets."""

    def __init__(self, source: RowRanges, start: int, end: int, window: int, key: list[int] | None) -> None:
        self.source, self.start, self.end, self.window, self.key = source, start, end, window, key
        self._win: tuple[int, Arrays] | None = None

    def __len__(self) -> int:
        return self.end - self.start

    def _window(self, w: int) -> Arrays:
        if self._win is None or self._win[0] != w:
            self._win = None  # free the previous window before decoding the next
            a = self.start + w * self.window
            b = min(a + self.window, self.end)
            rows = self.source.rows(a, b)
            if self.key is not None:
                perm = np.random.default_rng(self.key + [w]).permutation(b - a)
                rows = {c: v[perm] for c, v in rows.items()}
            self._win = (w, rows)
        return self._win[1]

    def rows(self, lo: int, hi: int) -> Arrays:
        """Lane positions [lo, hi) (after the window shuffle)."""
        parts = []
        while lo < hi:
            w = lo // self.window
            end = min(hi, (w + 1) * self.window)
            win = self._window(w)
            parts.append({c: v[lo - w * self.window:end - w * self.window] for c, v in win.items()})
            lo = end
        return parts[0] if len(parts) == 1 else {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def lane_bounds(num_jets: int, lanes: int) -> list[tuple[int, int]]:
    return [(l * num_jets // lanes, (l + 1) * num_jets // lanes) for l in range(lanes)]


def rank_lanes(lanes: int, rank: int, world: int) -> range:
    """A rank's contiguous block of lanes: its rows are the stream range [rank*N//world, (rank+1)*N//world)."""
    per = lanes // world
    return range(rank * per, (rank + 1) * per)
