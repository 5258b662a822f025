"""`ucluster tune`: hyper-parameter search on Optuna, each trial a normal `ucluster train` run.

Why Optuna: its storages (a journal file on a shared filesystem, or an RDB) let any number of workers,
mpirun ranks or SLURM array tasks, share one study without a scheduler of ours. Each worker trains its
trials in STUDY_DIR/trial-NNNN through `train()`, single-process or (--ranks-per-trial) data-parallel
over a group of ranks; its per-epoch score feeds the pruner. The budget, --trials, counts every trial in
the storage that did not fail; the space: tune_space.py; the summary and plots: tune_report.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ucluster_jax.config import load_config
from ucluster_jax.errors import UserError
from ucluster_jax.tune_space import load_space

OBJECTIVES = {"accuracy": ("test_acc", "maximize"), "unsupervised": ("test_kmeans", "minimize")}
HEARTBEAT_S = 10.0  # a running trial's worker touches trial-NNNN/heartbeat this often (at most)
MIN_STALE_S = 5.0  # --stale-after's floor: a heartbeat every second, a dead worker's trial failed in 5 s
MAX_FAILS = 5  # a worker stops after this many failed trials in a row


def heartbeat_every(stale_after: float) -> float:
    """Seconds between touches: 5 per --stale-after at least, so only a dead worker's file goes stale."""
    return min(HEARTBEAT_S, stale_after / 5)


@contextlib.contextmanager
def heartbeat(path: Path, every: float):
    """Touch `path` while a trial runs: a trial whose file goes stale lost its worker (fail_stale)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            path.touch()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def trial_dir(out: Path, number: int) -> Path:
    return out / f"trial-{number:04d}"


def fail_stale(study, out: Path, stale_after: float) -> None:
    """Mark failed the running trials whose heartbeat is older than stale_after seconds (worker killed)."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        hb = trial_dir(out, t.number) / "heartbeat"
        last = hb.stat().st_mtime if hb.exists() else t.datetime_start.timestamp()
        if time.time() - last > stale_after:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            print(f"trial {t.number}: no heartbeat for {time.time() - last:.0f} s, its worker is gone: failed",
                  flush=True)


def counts(study) -> dict[str, int]:
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    return {s: states.count(s) for s in ("complete", "running", "pruned", "fail")}


def open_study(args: argparse.Namespace, direction: str):
    """Create or load the study; refuse to continue one that optimised another objective."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = args.storage or JournalStorage(JournalFileBackend(str(args.out / "journal.log")))
    study = optuna.create_study(storage=storage, study_name=args.study, direction=direction, load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    if study.user_attrs.get("objective", args.objective) != args.objective:
        raise UserError(f"study {args.study!r} optimises {study.user_attrs['objective']}, not {args.objective}")
    study.set_user_attr("objective", args.objective)
    return study


def group_runtime(ranks_per_trial: int):
    """This rank's trial runtime. R=1: single-process, every rank its own worker. R>1: COMM_WORLD split
    into groups of R consecutive ranks, each training its trials data-parallel (engine mpi on the group's
    communicator, as `ucluster train` under mpirun); the group's rank 0 is the worker Optuna sees."""
    from ucluster_jax.parallel.mpi import launched_world
    from ucluster_jax.parallel.runtime import Mpi, setup

    if ranks_per_trial == 1:
        return setup("single")
    rank, size = launched_world()
    if ranks_per_trial < 1 or size % ranks_per_trial:
        raise UserError(f"--ranks-per-trial {ranks_per_trial} must divide the mpirun's {size} ranks")
    from mpi4py import MPI

    return Mpi(MPI.COMM_WORLD.Split(rank // ranks_per_trial, rank)).start(None)


def run_trial(study, trial, job: tuple[int, dict], args: argparse.Namespace, overrides: list[str], rt) -> str:
    """Train trial job = (number, params) on the group's ranks, report its score each joint epoch, tell the
    study how it ended; returns the state, the same on every rank of the group. Only the group's rank 0
    holds `trial` (None elsewhere) and talks to Optuna; its pruning decision reaches every rank, so the
    group stops together."""
    import optuna
    from optuna.trial import TrialState

    from ucluster_jax.parallel.mpi import launched_world
    from ucluster_jax.train.loop import train

    number, params = job
    lead, key, pretrain = rt.is_root, OBJECTIVES[args.objective][0], 0

    def on_epoch(rec: dict[str, Any]) -> None:
        if rec.get(key) is None:  # focal-only epochs: no clusters yet
            return
        prune = False
        if lead:
            trial.report(rec[key], rec["epoch"] - pretrain)  # step: joint epochs, comparable across trials
            prune = trial.should_prune()
        if rt.bcast(prune):
            raise optuna.TrialPruned()

    if lead:
        trial.set_user_attr("worker", f"{socket.gethostname()} rank {launched_world()[0]} pid {os.getpid()}")
        trial.set_user_attr("ranks", rt.world)
    tell = study.tell if lead else (lambda *a, **k: None)
    state, run = TrialState.FAIL, trial_dir(args.out, number)
    try:
        cfg = load_config(args.config, overrides + [f"{k}={json.dumps(v)}" for k, v in params.items()])
        pretrain = cfg.train.pretrain_epochs
        with heartbeat(run / "heartbeat", heartbeat_every(args.stale_after)) if lead else contextlib.nullcontext():
            rec = train(cfg, args.data, run, test_data=args.test_data, rt=rt, on_epoch=on_epoch)
        value = rec.get(key)
        if value is None or not math.isfinite(value):
            raise UserError(f"no finite {key} in the last epoch")
        tell(trial, value, skip_if_finished=True)  # finished: failed by another worker (below)
        state, what = TrialState.COMPLETE, f"{key} {value:.4f}"
    except optuna.TrialPruned:
        tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        state, what = TrialState.PRUNED, "pruned"
    except optuna.exceptions.UpdateFinishedTrialError:  # failed by another worker: heartbeat seen as stale
        what = f"failed: another worker saw no heartbeat for {args.stale_after:g} s; raise --stale-after"
    except UserError as e:  # a bad combination or a diverged run: this trial fails, the search goes on
        if lead:
            trial.set_user_attr("error", str(e))
        tell(trial, state=TrialState.FAIL)
        what = f"failed: {e}"
    except BaseException:
        tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    if lead:
        c = counts(study)
        print(f"trial {number} {what} | done {c['complete']}, running {c['running']}, pruned {c['pruned']}, "
              f"failed {c['fail']}; budget {args.trials}", flush=True)
    return rt.bcast(state.name)


def ask(study, space: dict, args: argparse.Namespace, seed: int):
    """The next trial, or None with the budget spent. Asking holds a lock file: the count and the new
    trial's number agree across workers, and trial n's sampler seed is (seed, n) whoever runs it."""
    import optuna
    from optuna.storages.journal import JournalFileOpenLock

    lock = JournalFileOpenLock(str(args.out / "ask"))  # a killed holder's lock is broken after 30 s
    while not lock.acquire():
        time.sleep(0.1)
    try:
        fail_stale(study, args.out, args.stale_after)
        trials = study.get_trials(deepcopy=False)
        if sum(t.state.name != "FAIL" for t in trials) >= args.trials:
            return None
        ss = int(np.random.SeedSequence([seed, len(trials)]).generate_state(1)[0])
        study.sampler = optuna.samplers.TPESampler(seed=ss, constant_liar=True)
        return study.ask(space)
    finally:
        lock.release()


def work(study, space: dict, args: argparse.Namespace, overrides: list[str], seed: int, rt) -> None:
    """Run trials until the budget is spent: the group's rank 0 asks, its ranks train. Failed trials do
    not count, so a worker gives up after MAX_FAILS of its own in a row."""
    fails = 0
    while fails < MAX_FAILS:
        trial = ask(study, space, args, seed) if rt.is_root else None
        job = rt.bcast(None if trial is None else (trial.number, trial.params))
        if job is None:
            return
        fails = fails + 1 if run_trial(study, trial, job, args, overrides, rt) == "FAIL" else 0
    raise UserError(f"{MAX_FAILS} trials in a row failed (the reasons above); check the space and the base config")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="base YAML config every trial starts from")
    p.add_argument("--space", required=True, type=Path, help="search space YAML (docs/TUNING.md)")
    p.add_argument("--data", required=True, type=Path, help="parquet training set")
    p.add_argument("--test-data", required=True, type=Path, help="parquet set each trial is scored on")
    p.add_argument("--out", required=True, type=Path, help="study directory: trial-NNNN runs, journal, summary")
    p.add_argument("--trials", type=int, default=20, help="the study's budget: non-failed trials, all workers")
    p.add_argument("--storage", help="RDB URL (postgresql://..., sqlite:///...); default: OUT/journal.log")
    p.add_argument("--study", default="ucluster", help="study name inside the storage")
    p.add_argument("--seed", type=int, help="drives the sampler and every trial's train.seed (default: the config's)")
    p.add_argument("--objective", default="accuracy", choices=OBJECTIVES,
                   help="accuracy: final test_acc (labels); unsupervised: final test_kmeans, minimised")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config value for every trial (repeatable)")
    p.add_argument("--stale-after", type=float, default=300.0, metavar="S",
                   help="fail a running trial whose heartbeat is older than S seconds (its worker died)")
    p.add_argument("--ranks-per-trial", type=int, default=1, metavar="R",
                   help="under mpirun: groups of R ranks, each training its trials data-parallel")


def run(args: argparse.Namespace) -> int:
    import optuna

    from ucluster_jax.parallel.mpi import launched_world

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own progress lines instead
    if args.trials < 0 or args.stale_after < MIN_STALE_S:
        raise UserError(f"--trials must be >= 0 and --stale-after >= {MIN_STALE_S:g} s")
    seed = load_config(args.config, args.overrides).train.seed if args.seed is None else args.seed
    overrides = args.overrides + [f"train.seed={seed}"]
    space = load_space(args.space, args.config, overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    rt = group_runtime(args.ranks_per_trial)
    study = open_study(args, OBJECTIVES[args.objective][1]) if rt.is_root else None  # the group's worker
    work(study, space, args, overrides, seed, rt)
    rank, size = launched_world()
    if rank:
        return 0  # rank 0 reports for the whole mpirun
    while size > 1 and counts(study)["running"]:  # wait for the other workers' last trials
        time.sleep(2)
        fail_stale(study, args.out, args.stale_after)
    from ucluster_jax.tune_report import report

    report(study, args)
    return 0
