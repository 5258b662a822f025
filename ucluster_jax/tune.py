"""`ucluster tune`: hyper-parameter search on Optuna, each trial a normal `ucluster train` run.

Why Optuna: its storages (a journal file on a shared filesystem, or an RDB) let any number of workers,
mpirun ranks or SLURM array tasks, share one study without a scheduler of ours. Each worker trains its
trials single-process, in STUDY_DIR/trial-NNNN, through `train()`; its per-epoch score feeds the pruner.
The budget, --trials, counts every trial in the storage that did not fail; the space: tune_space.py.
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
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ucluster_jax.config import load_config
from ucluster_jax.errors import UserError
from ucluster_jax.tune_space import load_space

OBJECTIVES = {"accuracy": ("test_acc", "maximize"), "unsupervised": ("test_kmeans", "minimize")}
HEARTBEAT_S = 10.0  # a running trial's worker touches trial-NNNN/heartbeat this often
MAX_FAILS = 5  # a worker stops after this many failed trials in a row


@contextlib.contextmanager
def heartbeat(path: Path):
    """Touch `path` while a trial runs: a trial whose file goes stale lost its worker (fail_stale)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
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


def run_trial(study, trial, args: argparse.Namespace, overrides: list[str], rt) -> str:
    """Train one trial, report its score each joint epoch, tell the study how it ended (the state)."""
    import optuna
    from optuna.trial import TrialState

    from ucluster_jax.parallel.mpi import launched_world
    from ucluster_jax.train.loop import train

    key, pretrain = OBJECTIVES[args.objective][0], 0

    def on_epoch(rec: dict[str, Any]) -> None:
        if rec.get(key) is None:  # focal-only epochs: no clusters yet
            return
        trial.report(rec[key], rec["epoch"] - pretrain)  # step: joint epochs, comparable across trials
        if trial.should_prune():
            raise optuna.TrialPruned()

    trial.set_user_attr("worker", f"{socket.gethostname()} rank {launched_world()[0]} pid {os.getpid()}")
    state = TrialState.FAIL
    try:
        cfg = load_config(args.config, overrides + [f"{k}={json.dumps(v)}" for k, v in trial.params.items()])
        pretrain = cfg.train.pretrain_epochs
        with heartbeat(trial_dir(args.out, trial.number) / "heartbeat"):
            rec = train(cfg, args.data, trial_dir(args.out, trial.number), test_data=args.test_data, rt=rt,
                        on_epoch=on_epoch)
        value = rec.get(key)
        if value is None or not math.isfinite(value):
            raise UserError(f"no finite {key} in the last epoch")
        study.tell(trial, value, skip_if_finished=True)  # finished: failed by another worker (below)
        state, what = TrialState.COMPLETE, f"{key} {value:.4f}"
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        state, what = TrialState.PRUNED, "pruned"
    except optuna.exceptions.UpdateFinishedTrialError:  # failed by another worker: heartbeat seen as stale
        what = f"failed: another worker saw no heartbeat for {args.stale_after:g} s; raise --stale-after"
    except UserError as e:  # a bad combination or a diverged run: this trial fails, the search goes on
        trial.set_user_attr("error", str(e))
        study.tell(trial, state=TrialState.FAIL)
        what = f"failed: {e}"
    except BaseException:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    c = counts(study)
    print(f"trial {trial.number} {what} | done {c['complete']}, running {c['running']}, pruned {c['pruned']}, "
          f"failed {c['fail']}; budget {args.trials}", flush=True)
    return state.name


def work(study, space: dict, args: argparse.Namespace, overrides: list[str], seed: int) -> None:
    """Ask and run trials until the budget is spent. Asking holds a lock file: the count and the new
    trial's number agree across workers, and trial n's sampler seed is (seed, n) whoever runs it.
    Failed trials do not count, so a worker gives up after MAX_FAILS of its own in a row."""
    import optuna
    from optuna.storages.journal import JournalFileOpenLock

    from ucluster_jax.parallel.runtime import setup

    rt = setup("single")  # under mpirun each rank is its own worker
    lock = JournalFileOpenLock(str(args.out / "ask"))
    fails = 0
    while fails < MAX_FAILS:
        while not lock.acquire():
            time.sleep(0.1)
        try:
            fail_stale(study, args.out, args.stale_after)
            trials = study.get_trials(deepcopy=False)
            if sum(t.state.name != "FAIL" for t in trials) >= args.trials:
                return
            ss = int(np.random.SeedSequence([seed, len(trials)]).generate_state(1)[0])
            study.sampler = optuna.samplers.TPESampler(seed=ss, constant_liar=True)
            trial = study.ask(space)
        finally:
            lock.release()
        fails = fails + 1 if run_trial(study, trial, args, overrides, rt) == "FAIL" else 0
    raise UserError(f"{MAX_FAILS} trials in a row failed (the reasons above); check the space and the base config")


def rank_agreement(out: Path, done: list) -> float | None:
    """Spearman correlation of the completed trials' final test_acc and test_kmeans (both are logged
    whatever the objective): how far the label-free criterion ranks trials like the accuracy.
    -1: perfect agreement (k-means loss is minimised); None: fewer than 3 trials or a constant."""
    from scipy.stats import spearmanr

    last = [json.loads((trial_dir(out, t.number) / "metrics.jsonl").read_text().splitlines()[-1]) for t in done]
    pairs = [(r["test_acc"], r["test_kmeans"]) for r in last if r.get("test_acc") is not None]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({k for _, k in pairs}) < 2:
        return None
    return float(spearmanr(*zip(*pairs)).statistic)


def write_plots(study, out: Path, completed: int) -> tuple[list[str], dict[str, str]]:
    """Optimisation history, parallel coordinates and (from 2 completed trials) importances as PNG."""
    import optuna.visualization.matplotlib as ovm

    from ucluster_jax.plotstyle import save

    plots = [("history.png", ovm.plot_optimization_history), ("parallel.png", ovm.plot_parallel_coordinate)]
    if completed >= 2:
        plots.append(("importances.png", ovm.plot_param_importances))
    written, skipped = [], {}
    for name, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's "experimental" notices
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances of a constant
                skipped[name] = str(e)
                continue
        save((ax.flat[0] if hasattr(ax, "flat") else ax).figure, out / name, dpi=100)
        written.append(name)
    return written, skipped


def report(study, args: argparse.Namespace) -> None:
    """summary.json, best.yaml, the plots and a table on stdout."""
    from ucluster_jax.checkpoint import atomic_write

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    storage = args.storage.split("://")[0] if args.storage else "journal.log"  # never a URL's password
    summary: dict[str, Any] = {"study": args.study, "storage": storage, "objective": args.objective,
                               "direction": OBJECTIVES[args.objective][1], "budget": args.trials,
                               "trials": counts(study), "best": None}
    if done:
        best = study.best_trial
        cfg = json.loads((trial_dir(args.out, best.number) / "config.json").read_text())
        atomic_write(args.out / "best.yaml", f"# trial {best.number}, {args.objective} {best.value}\n"
                     + yaml.safe_dump(cfg, sort_keys=False))
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "run": trial_dir(args.out, best.number).name, "config": "best.yaml"}
    summary["acc_vs_kmeans_spearman"] = rank_agreement(args.out, done)
    summary["plots"], skipped = write_plots(study, args.out, len(done))
    if skipped:
        summary["plots_skipped"] = skipped
    atomic_write(args.out / "summary.json", json.dumps(summary, indent=1))
    keys = sorted({k for t in trials for k in t.params})
    show = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    print(f"{'trial':>5} {'state':>8} {'value':>8}  " + "  ".join(keys))
    for t in trials:
        print(f"{t.number:>5} {t.state.name.lower():>8} {'' if t.value is None else f'{t.value:.4f}':>8}  "
              + "  ".join(f"{k}={show(t.params.get(k))}" for k in keys))
    best = summary["best"]
    print(f"best: trial {best['number']} {args.objective} {best['value']:.4f} -> {args.out / 'best.yaml'}"
          if best else "best: none (no completed trial)", flush=True)


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


def run(args: argparse.Namespace) -> int:
    import optuna

    from ucluster_jax.parallel.mpi import launched_world

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own progress lines instead
    if args.trials < 0 or args.stale_after <= 3 * HEARTBEAT_S:
        raise UserError(f"--trials must be >= 0 and --stale-after > {3 * HEARTBEAT_S:g} s")
    seed = load_config(args.config, args.overrides).train.seed if args.seed is None else args.seed
    overrides = args.overrides + [f"train.seed={seed}"]
    space = load_space(args.space, args.config, overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    study = open_study(args, OBJECTIVES[args.objective][1])
    work(study, space, args, overrides, seed)
    rank, size = launched_world()
    if rank:
        return 0  # rank 0 reports for the whole mpirun
    while size > 1 and counts(study)["running"]:  # wait for the other ranks' last trials
        time.sleep(2)
        fail_stale(study, args.out, args.stale_after)
    report(study, args)
    return 0
