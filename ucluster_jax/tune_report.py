"""`ucluster tune`'s results for a person: summary.json, best.yaml, the plots and a table on stdout.

Only the reporting rank (rank 0 of the mpirun, once no trial is running) imports this.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import yaml

from ucluster_jax.tune import OBJECTIVES, counts, trial_dir


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
