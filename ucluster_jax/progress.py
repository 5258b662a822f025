"""A one-line progress display for long work: done/total, rate, ETA (stderr, rank 0 only).

On a terminal the line is rewritten in place twice a second; in a log (CI, batch jobs) a new line
is written every `log_interval` seconds.
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, unit: str = "jets", label: str = "", enabled: bool = True,
                 min_interval: float = 0.5, log_interval: float = 10.0, stream=None) -> None:
        self.total, self.unit, self.label, self.enabled = total, unit, label, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = min_interval if self.tty else log_interval
        self.start = time.perf_counter()
        self.last = 0.0 if self.tty else self.start
        self.shown = False

    def due(self) -> bool:
        """Whether an update would be shown now (lets callers skip a device sync otherwise)."""
        return self.enabled and time.perf_counter() - self.last >= self.interval

    def rate(self, done: int) -> float:
        elapsed = time.perf_counter() - self.start
        return done / elapsed if elapsed > 0 else 0.0

    def update(self, done: int, extra: str = "") -> None:
        if not self.due():
            return
        self.last = time.perf_counter()
        rate = self.rate(done)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        pct = 100.0 * done / max(self.total, 1)
        line = (f"{self.label} {done}/{self.total} {self.unit} ({pct:3.0f}%) {rate:,.0f} {self.unit}/s "
                f"ETA {fmt_seconds(eta)}{', ' + extra if extra else ''}")
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
            self.shown = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, message: str = "") -> None:
        """Clear the in-place line; print `message` (if any) as a final line."""
        if not self.enabled:
            return
        if self.shown:
            self.stream.write("\r\033[K")
            self.shown = False
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()


def fmt_seconds(seconds: float) -> str:
    if seconds == float("inf") or seconds != seconds:
        return "--:--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
