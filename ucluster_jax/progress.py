"""A one-line progress display for long work: done/total, rate, ETA (stderr, rank 0 only)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, unit: str = "jets", label: str = "", enabled: bool = True,
                 min_interval: float = 1.0) -> None:
        self.total, self.unit, self.label, self.enabled = total, unit, label, enabled
        self.start = time.perf_counter()
        self.last = 0.0
        self.min_interval = min_interval
        self.tty = sys.stderr.isatty()

    def due(self) -> bool:
        """Whether an update would be shown now (lets callers skip a device sync otherwise)."""
        return self.enabled and time.perf_counter() - self.last >= self.min_interval

    def update(self, done: int, extra: str = "") -> None:
        if not self.due():
            return
        self.last = time.perf_counter()
        elapsed = self.last - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        pct = 100.0 * done / max(self.total, 1)
        line = (f"{self.label} {done}/{self.total} {self.unit} ({pct:3.0f}%) {rate:,.0f} {self.unit}/s "
                f"ETA {_fmt(eta)} {extra}")
        print(("\r" + line + "\033[K") if self.tty else line, end="" if self.tty else "\n", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)

    def rate(self, done: int) -> float:
        elapsed = time.perf_counter() - self.start
        return done / elapsed if elapsed > 0 else 0.0


def _fmt(seconds: float) -> str:
    if seconds == float("inf"):
        return "--:--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
