"""Pre-training candidates (`train.pretrain_candidates`): pre-train a few seeds, keep the one whose k-means
start splits W from Z along the jet mass.

Why: the end of pre-training decides a run (docs/RESULTS.md, "What decides a run"), and over the runs
there no start whose W|Z split followed the jet mass weakly (corr_side_mass <= 0.70) ended high, while
most starts above it did (a lead, not a law: one such start later ended at 77 %, docs/RESULTS.md, "The rule
is broken on check10"). Each candidate is a pre-training run of its own, the seed-S run's epochs
0..pretrain_epochs-1, in OUT/pretrain/seed_S (resumable; the loop runs them); the joint phase then continues
the chosen one with its seed, so the whole run is the run `--set train.seed=S` would have made.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ucluster_jax import checkpoint
from ucluster_jax.config import Config
from ucluster_jax.errors import CheckpointError
from ucluster_jax.parallel.runtime import Runtime

CHOICE = "choice.json"


def with_seed(cfg: Config, seed: int, **train) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, **train))


def candidate_dir(out: Path, seed: int) -> Path:
    return Path(out) / "pretrain" / f"seed_{seed}"


def seeds(cfg: Config) -> range:
    return range(cfg.train.seed, cfg.train.seed + cfg.train.pretrain_candidates)


def pretraining_config(cfg: Config, seed: int) -> Config:
    """The candidate's run: the seed-`seed` run's pre-training epochs alone."""
    return with_seed(cfg, seed, epochs=cfg.train.pretrain_epochs, pretrain_candidates=1, select_from_epoch=0)


def has_checkpoints(rt: Runtime, run_dir: Path) -> bool:
    """Whether `run_dir` holds a checkpoint (rank 0 looks; every rank gets the answer)."""
    return bool(rt.bcast(bool(checkpoint.list_checkpoints(run_dir)) if rt.is_root else None))


def made_before(rt: Runtime, out: Path, resume: bool) -> int | None:
    """The seed chosen by an earlier run into `out` that got past the choice (it has joint-phase checkpoints),
    read back from OUT/pretrain/choice.json; None when the choice is still to make."""
    if not (resume and has_checkpoints(rt, out)):
        return None
    path = Path(out) / "pretrain" / CHOICE
    known = rt.bcast(json.loads(path.read_text())["seed"] if rt.is_root and path.exists() else None)
    if known is None:
        raise CheckpointError(f"{path}: missing, so {out} was not trained with train.pretrain_candidates > 1; "
                              "resume it with the value it was trained with")
    return int(known)


def pick(rt: Runtime, out: Path, starts: dict[int, dict]) -> int:
    """The seed whose k-means start (rank 0's `starts`: seed -> init_centroids' start) splits W|Z along the
    jet mass most closely; written to OUT/pretrain/choice.json and sent to every rank."""
    chosen = None
    if rt.is_root:
        rows = [{"seed": seed, **start} for seed, start in starts.items()]
        chosen = max(rows, key=lambda r: r.get("corr_side_mass", -np.inf))["seed"]
        print(f"pre-training candidates: seed {chosen} chosen (its W|Z split follows the mass most closely)",
              flush=True)
        checkpoint.atomic_write(Path(out) / "pretrain" / CHOICE, json.dumps({"seed": chosen, "candidates": rows},
                                                                            indent=1))
    return int(rt.bcast(chosen))


def pretraining_records(out: Path, seed: int) -> list[dict]:
    """The chosen candidate's epoch records, which the run's metrics.jsonl starts with (rank 0)."""
    return [json.loads(line) for line in (candidate_dir(out, seed) / "metrics.jsonl").read_text().splitlines()]
