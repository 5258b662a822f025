"""Choosing a run's result without labels (train.select_from_epoch, train.select_by).

From that epoch on, every train.select_every_samples (or else at the test points, train.eval_every_samples)
and at each epoch end the trainer measures a criterion of the state's clusters on the first
train.select_jets training jets, and keeps the state where it is lowest in RUN/selected: the state
`ucluster evaluate` scores. Why: late in the CPU recipe's joint phase the test accuracy swings by 1-3
points from point to point, as the W|Z boundary moves by a few GeV of jet mass. The criteria
(docs/RESULTS.md, "Choosing the run's result ..."): `boundary_density` (latent only; sorted the points in
two runs, not in a third) and `mass_valley` (GeV from the clusters' mass edge to the dip of the jet-mass
distribution; the recipe's).
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
from ucluster_jax.metrics import boundary_density, mass_valley
from ucluster_jax.parallel.runtime import Runtime
from ucluster_jax.train.scoring import embed
from ucluster_jax.train.state import TrainState, scored

FOLDER = "selected"
# name -> criterion(embedding outputs, centroids): lower is better; the name is the key of its value in the
# curve rows and the kept state's sidecar
CRITERIA = {"boundary_density": lambda o, mu: boundary_density(o["dist"], mu),
            "mass_valley": lambda o, mu: mass_valley(o["dist"], mu, o["mass"])}


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
        if meta is not None and resumed_step is not None and meta["step"] <= resumed_step \
                and cfg.train.select_by in meta:  # chosen before the checkpoint, by the same criterion
            self.best = meta[cfg.train.select_by]
        elif self.folder.exists():  # a fresh start, or chosen past the point this run resumes from
            shutil.rmtree(self.folder)

    def __call__(self, host: TrainState, epoch: int) -> dict[str, Any]:
        value = self.rt.bcast(measure(self.rt, self.cfg, host, self.batches) if self.rt.is_root else None)
        name = self.cfg.train.select_by
        if self.rt.is_root and value < self.best:  # NaN never wins
            self.best = value
            checkpoint.save(self.folder, host, step=int(host.step), keep=1,
                            meta={"epoch": epoch, name: value, "config": self.cfg.to_dict()})
        return {name: value}


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
    """train.select_by of the scored state's clusters on `batches` (this process alone)."""
    st = scored(host)
    return CRITERIA[cfg.train.select_by](embed(rt, cfg, st, batches, train_mode_bn=False), np.asarray(st.params["mu"]))


def load(run_dir: Path, template: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
    """The selected state and its sidecar, where the run kept one."""
    folder = Path(run_dir) / FOLDER
    return checkpoint.load_latest(folder, template) if checkpoint.list_checkpoints(folder) else None
