"""Choosing a run's result without labels (train.select_from_epoch).

From that epoch on, at every test point (train.eval_every_samples) and epoch end the trainer measures the
boundary density of the state's clusters (`metrics.boundary_density`) on the first train.select_jets
training jets, and keeps the state with the lowest in RUN/selected: the state `ucluster evaluate` scores.
Why: late in the CPU recipe's joint phase the test accuracy swings by 1-3 points from point to point; in
two runs the density sorted those points and the choice gained 1.2 and 0.9 points, in a third it lost 1.7,
so the recipe does not use it yet (docs/RESULTS.md, "Choosing the run's result without labels").
Rank 0 measures and writes; every rank gets the same value, so the choice is the same in every layout that
computes the same bits.
"""
from __future__ import annotations

import json
import shutil
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from ucluster_jax import checkpoint
from ucluster_jax.config import Config
from ucluster_jax.data.reader import ParquetDataset
from ucluster_jax.metrics import boundary_density
from ucluster_jax.parallel.runtime import Runtime
from ucluster_jax.train.scoring import embed
from ucluster_jax.train.state import TrainState, scored

FOLDER = "selected"


class Selection:
    """The best state so far, on disk (resumable); call it with the host state at each point."""

    def __init__(self, rt: Runtime, cfg: Config, data: Path, out: Path, resumed_step: int | None) -> None:
        self.rt, self.cfg, self.folder = rt, cfg, Path(out) / FOLDER
        self.best = float("inf")
        self.batches: list[dict[str, np.ndarray]] = []
        if not rt.is_root:
            return
        self.batches = first_jets(cfg, data)
        kept = checkpoint.list_checkpoints(self.folder)
        meta = json.loads(kept[-1].with_suffix(".json").read_text()) if kept else None
        if meta is not None and resumed_step is not None and meta["step"] <= resumed_step:
            self.best = meta["boundary_density"]
        elif self.folder.exists():  # a fresh start, or chosen past the point this run resumes from
            shutil.rmtree(self.folder)

    def __call__(self, host: TrainState, epoch: int) -> dict[str, Any]:
        density = self.rt.bcast(measure(self.rt, self.cfg, host, self.batches) if self.rt.is_root else None)
        if self.rt.is_root and density < self.best:  # NaN never wins
            self.best = density
            checkpoint.save(self.folder, host, step=int(host.step), keep=1,
                            meta={"epoch": epoch, "boundary_density": density, "config": self.cfg.to_dict()})
        return {"boundary_density": density}


def start(rt: Runtime, cfg: Config, data: Path, out: Path, resumed_step: int | None) -> Selection | None:
    """The run's selection, or None with train.select_from_epoch 0; then a RUN/selected left by an earlier
    run into this folder goes, so `evaluate` scores the last state."""
    if cfg.train.select_from_epoch:
        return Selection(rt, cfg, data, out, resumed_step)
    if rt.is_root and (Path(out) / FOLDER).exists():
        shutil.rmtree(Path(out) / FOLDER)
    return None


def first_jets(cfg: Config, data: Path) -> list[dict[str, np.ndarray]]:
    """The first train.select_jets jets of the dataset in file order: the same jets in every layout."""
    b = cfg.train.eval_batch_size
    return list(islice(ParquetDataset(data).iter_all(b), -(-cfg.train.select_jets // b)))


def measure(rt: Runtime, cfg: Config, host: TrainState, batches: list[dict[str, np.ndarray]]) -> float:
    """The boundary density of the scored state's clusters on `batches` (this process alone)."""
    st = scored(host)
    o = embed(rt, cfg, st, batches, train_mode_bn=False)
    return boundary_density(o["dist"], np.asarray(st.params["mu"]))


def load(run_dir: Path, template: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
    """The selected state and its sidecar, where the run kept one."""
    folder = Path(run_dir) / FOLDER
    return checkpoint.load_latest(folder, template) if checkpoint.list_checkpoints(folder) else None
