"""`ucluster evaluate`: cluster a dataset with a trained run and score it.

Writes RUN_DIR/eval/: summary.json (globally matched accuracy first, the original's per-batch figure
beside it, confusion matrix, n_jets; for the anomaly task the signal enrichment, anomaly.py),
per_jet.parquet (cluster, distances, latent, truth, mass, global features) and PNG plots.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ucluster_jax import anomaly, checkpoint, plots
from ucluster_jax.config import Config, config_from_dict, criterion_in
from ucluster_jax.data.reader import ParquetDataset
from ucluster_jax.errors import UserError
from ucluster_jax.metrics import contingency_np, matched_accuracy, per_batch_accuracy
from ucluster_jax.parallel.runtime import setup
from ucluster_jax.train import select
from ucluster_jax.train.state import create_state, scored


# what scoring a finished run reads from its config; the rest (training's values) is not checked again
SCORED_KEYS = ("model.", "loss.", "train.eval_batch_size", "train.param_ema")


def load_run(run_dir: Path, last: bool = False) -> tuple[Config, Any, dict]:
    """The run's config and its result (host state): the state it selected (train.select_from_epoch) or,
    `last` or where it selected none, its newest intact checkpoint; with the parameters that are scored:
    their moving average where the run kept one (train.param_ema)."""
    run_dir = Path(run_dir)
    try:
        cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()), str(run_dir / "config.json"),
                               only=SCORED_KEYS)
    except FileNotFoundError:
        raise UserError(f"{run_dir}: not a run directory (no config.json)") from None
    template = create_state(cfg)
    state, meta = (None if last else select.load(run_dir, template)) or checkpoint.load_latest(run_dir, template)
    return cfg, scored(state), meta


def evaluate(run_dir: Path, data: Path, out: Path | None = None, *, plots_too: bool = True,
             last: bool = False) -> dict[str, Any]:
    from ucluster_jax.train.loop import check_data
    from ucluster_jax.train.scoring import embed

    cfg, state, meta = load_run(run_dir, last)
    rt = setup("auto")
    ds = ParquetDataset(data, rank=rt.rank, world=rt.world)
    check_data(cfg, ds, Path(data))
    o = embed(rt, cfg, state, ds.iter_all(cfg.train.eval_batch_size), train_mode_bn=False)
    parts = {k: rt.gather_rows(v) for k, v in o.items()}
    if not rt.is_root:
        return {}
    k, names = cfg.model.num_clusters, ds.meta.class_names
    cluster = np.argmin(parts["dist"], axis=1)
    label = parts["label"].astype(np.int64)
    cont = contingency_np(cluster, label, k, len(names))
    acc, mapping = matched_accuracy(cont) if cont.sum() else (float("nan"), np.arange(k))
    B = cfg.train.eval_batch_size
    per_batch = np.stack([contingency_np(cluster[i:i + B], label[i:i + B], k, len(names))
                          for i in range(0, len(cluster), B)])
    by = criterion_in([meta])  # the criterion the scored state was selected by, if it was
    summary = {
        "accuracy_global": acc,
        "accuracy_per_batch": per_batch_accuracy(per_batch),
        "confusion": cont.tolist(),
        "confusion_rows": "clusters", "confusion_cols": list(names),
        "cluster_to_class": mapping.tolist(),
        "n_jets": int(len(cluster)),
        "n_labelled": int((label >= 0).sum()),
        "checkpoint_step": int(meta["step"]), "checkpoint_epoch": int(meta["epoch"]),
        "selected_by": by, "selected_value": meta.get(by),  # None: the run's last state
        "data": str(data), "run": str(run_dir),
    }
    if ds.meta.target_per_point:  # the anomaly task: resonance events in QCD dijets
        summary["anomaly"] = anomaly.report(cluster, label, parts["global"], k, seed=cfg.train.seed)
    out = Path(out) if out else Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    table = {"cluster": cluster.astype(np.int32), "label": label.astype(np.int32),
             "mass": parts["mass"].astype(np.float32)}
    for i in range(k):
        table[f"dist_{i}"] = parts["dist"][:, i].astype(np.float32)
    for i in range(parts["z"].shape[1]):
        table[f"z_{i}"] = parts["z"][:, i].astype(np.float32)
    for i in range(parts["global"].shape[1] if "global" in parts else 0):
        table[f"global_{i}"] = parts["global"][:, i].astype(np.float32)
    tmp = out / ".per_jet.parquet.tmp"
    pq.write_table(pa.table(table), tmp)
    tmp.replace(out / "per_jet.parquet")
    if plots_too:
        mu = np.asarray(state.params["mu"])
        plots.latent_plot(parts["z"], cluster, label, mu, out / "latent.png", names, seed=cfg.train.seed)
        if "anomaly" in summary:
            anomaly.mjj_plot(parts["mass"], cluster, label, parts["global"], summary["anomaly"], out / "mjj.png")
        else:
            plots.mass_plot(parts["mass"], cluster, label, k, out / "mass_per_cluster.png", names, ds.meta.mass_name)
        metrics_file = Path(run_dir) / "metrics.jsonl"
        if metrics_file.exists():
            recs = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
            if recs:
                plots.training_curves(recs, out / "training.png", plots.jets(names))
        curve_file = Path(run_dir) / "curve.jsonl"
        if curve_file.exists():
            rows = [json.loads(line) for line in curve_file.read_text().splitlines() if line.strip()]
            if rows:
                plots.accuracy_vs_samples({Path(run_dir).name: rows}, out / "accuracy_vs_samples.png",
                                          sample=plots.jets(names))
    checkpoint.atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=Path, help="run directory written by `ucluster train`")
    p.add_argument("--data", required=True, type=Path, help="parquet dataset to cluster")
    p.add_argument("--out", type=Path, help="output folder (default RUN/eval)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--last", action="store_true",
                   help="score the run's last checkpoint, not the state it selected (train.select_from_epoch)")


def run(args: argparse.Namespace) -> int:
    s = evaluate(args.run, args.data, args.out, plots_too=not args.no_plots, last=args.last)
    if s:
        if s["selected_by"] is not None:
            print(f"scored the run's selected state: step {s['checkpoint_step']} (epoch {s['checkpoint_epoch']}), "
                  f"{s['selected_by']} {s['selected_value']:.4f}; --last for its last checkpoint")
        cont = np.asarray(s["confusion"])
        print(f"accuracy (global, Hungarian-matched): {s['accuracy_global']:.4f}")
        print(f"accuracy (per-batch matched, the original's figure): {s['accuracy_per_batch']:.4f}")
        names = tuple(s["confusion_cols"])
        print(f"confusion (rows: clusters; columns: {' '.join(names)}):")
        for k, row in enumerate(cont):
            print(f"  cluster {k} -> {plots.class_name(names, s['cluster_to_class'][k], '-'):>3s}: "
                  + " ".join(f"{v:8d}" for v in row))
        if "anomaly" in s:
            print_anomaly(s["anomaly"])
        print(f"jets: {s['n_jets']}; wrote {(args.out or args.run / 'eval')}")
    return 0


def print_anomaly(a: dict) -> None:
    print(f"signal fraction {a['signal_fraction']:.4f}; per cluster (eps_S, eps_B, purity, S/sqrt(B) gain):")
    rows = [(f"cluster {c}" + (" (signal-rich)" if c == a["signal_cluster"] else ""), r)
            for c, r in enumerate(a["clusters"])]
    w = a["mass_window"]["window_gev"]
    rows.append(("k-means on the event features, its signal-rich cluster (no labels)", a["kmeans_event_features"]))
    rows.append((f"jet-mass window {w['heavier_jet'][0]:.0f}-{w['heavier_jet'][1]:.0f} x "
                 f"{w['lighter_jet'][0]:.0f}-{w['lighter_jet'][1]:.0f} GeV (uses labels)", a["mass_window"]))
    for name, r in rows:
        print(f"  {name}: {r['eff_signal']:.3f} {r['eff_background']:.4f} {r['purity']:.3f} "
              f"{r['significance_improvement']:.2f}")
