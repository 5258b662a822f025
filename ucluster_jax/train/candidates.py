"""Pre-training candidates (`train.pretrain_candidates`): pre-train a few seeds, keep the one whose k-means
start splits W from Z along the jet mass.

Why: the end of pre-training decides a run (docs/RESULTS.md, "What decides a run"), and over the runs
there no start whose W|Z split followed the jet mass weakly (corr_side_mass <= 0.70) ended high, while
most starts above it did (a lead, not a law: one such start later ended at 77 %, docs/RESULTS.md, "The rule
is broken on check10"). Each candidate is a pre-training run of its own, the seed-S run's epochs
0..pretrain_epochs-1, in OUT/pretrain/seed_S (resumable); the joint phase then continues the chosen one
with its seed, so the whole run is the run `--set train.seed=S` would have made.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from ucluster_jax import checkpoint
from ucluster_jax.config import Config
from ucluster_jax.data.reader import ParquetDataset
from ucluster_jax.errors import CheckpointError
from ucluster_jax.parallel.runtime import Runtime
from ucluster_jax.train.scoring import format_start, init_centroids
from ucluster_jax.train.state import create_state

CHOICE = "choice.json"


def with_seed(cfg: Config, seed: int, **train) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, **train))


def candidate_dir(out: Path, seed: int) -> Path:
    return Path(out) / "pretrain" / f"seed_{seed}"


def choose(rt: Runtime, cfg: Config, data: Path, out: Path, ds: ParquetDataset, *, resume: bool,
           train_fn: Callable, load_fn: Callable) -> tuple[int, tuple | None]:
    """Pre-train seeds train.seed, train.seed + 1, ... (train_fn: the loop's `train`) and return the chosen
    seed, with (its pre-trained state, mu, start) when the choice is made now; None when a resumed run is
    past it (the seed read back from OUT/pretrain/choice.json). load_fn(rt, cfg, run_dir, template): the
    loop's resume_state."""
    t = cfg.train
    path = Path(out) / "pretrain" / CHOICE
    if resume and rt.bcast(bool(checkpoint.list_checkpoints(out)) if rt.is_root else None):  # past the choice
        known = rt.bcast(json.loads(path.read_text())["seed"] if rt.is_root and path.exists() else None)
        if known is None:
            raise CheckpointError(f"{path}: missing, so {out} was not trained with train.pretrain_candidates > 1; "
                                  "resume it with the value it was trained with")
        return int(known), None
    made, rows = {}, []
    for seed in range(t.seed, t.seed + t.pretrain_candidates):
        c = with_seed(cfg, seed, epochs=t.pretrain_epochs, pretrain_candidates=1, select_from_epoch=0)  # no joint phase
        sub = candidate_dir(out, seed)
        again = resume and rt.bcast(bool(checkpoint.list_checkpoints(sub)) if rt.is_root else None)
        train_fn(c, data, sub, resume=again, rt=rt)
        host = load_fn(rt, c, sub, create_state(c))[0]
        mu, start = init_centroids(rt, c, host, ds)  # start: rank 0 only
        made[seed] = (host, mu, start)
        if rt.is_root:
            rows.append({"seed": seed, **start})
            print(f"candidate seed {seed}: start: {format_start(start)}", flush=True)
    chosen = None
    if rt.is_root:
        chosen = max(rows, key=lambda r: r.get("corr_side_mass", -np.inf))["seed"]
        print(f"pre-training candidates: seed {chosen} chosen (its W|Z split follows the jet mass most closely)",
              flush=True)
        checkpoint.atomic_write(path, json.dumps({"seed": chosen, "candidates": rows}, indent=1))
    chosen = int(rt.bcast(chosen))
    return chosen, made[chosen]


def pretraining_records(out: Path, seed: int) -> list[dict]:
    """The chosen candidate's epoch records, which the run's metrics.jsonl starts with (rank 0)."""
    return [json.loads(line) for line in (candidate_dir(out, seed) / "metrics.jsonl").read_text().splitlines()]
