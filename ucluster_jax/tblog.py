"""TensorBoard event files of a training run, in RUN/tb (rank 0, `train.tensorboard`).

The same numbers as metrics.jsonl and curve.jsonl, and every `train.tensorboard_latent_every` epochs
the latent space as `ucluster evaluate` draws it, in the form physicists watch a training in
(`tensorboard --logdir RUN/tb`); tensorboardX writes them without TensorFlow."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# record keys that count rather than measure: the x axes and bookkeeping, not scalars to plot
COUNTERS = {"epoch", "step", "steps", "samples_seen", "joint_samples", "resumed_at_step"}


class EventLog:
    """Epoch records against the epoch (tags epoch/KEY), test-curve points against joint-phase samples
    (tags curve/KEY)."""

    def __init__(self, run_dir: Path) -> None:
        from tensorboardX import SummaryWriter  # here, not at import: 0.2 s off every rank's start-up

        self.writer = SummaryWriter(str(run_dir / "tb"))

    def _scalars(self, group: str, rec: dict[str, Any], x: int) -> None:
        for key, value in rec.items():
            if key not in COUNTERS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{key}", value, x)
        self.writer.flush()

    def epoch(self, rec: dict[str, Any]) -> None:
        self._scalars("epoch", rec, rec["epoch"])

    def point(self, rec: dict[str, Any]) -> None:
        self._scalars("curve", rec, rec["joint_samples"])

    def latent(self, z: np.ndarray, cluster: np.ndarray, label: np.ndarray, mu: np.ndarray,
               class_names: tuple[str, ...], epoch: int) -> None:
        """plots.latent_plot of these jets as image `latent` at `epoch` (drawn to PNG, read back as RGB)."""
        import matplotlib.image as mpimg

        from ucluster_jax import plots

        with tempfile.TemporaryDirectory() as d:
            rgba = mpimg.imread(plots.latent_plot(z, cluster, label, mu, Path(d) / "latent.png", class_names))
        self.writer.add_image("latent", rgba[..., :3], epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
