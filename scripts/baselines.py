#!/usr/bin/env python
"""Baselines for the W/Z/top study (docs/RESULTS.md), on the same parquet test jets as the model.

    python scripts/baselines.py mass --train TRAIN --test TEST [--cuts A,B ...] [--plot PNG] [--json OUT]
        mass-window cuts (the original's windows, the best two cuts found on TRAIN, any given --cuts) and
        k-means (one cluster per class) on the jet mass and on its square root, fitted on TRAIN, applied to TEST.
    python scripts/baselines.py embed --run RUN --epoch E --train TRAIN --test TEST [--train-part N] [--json OUT]
        k-means (k=3, k-means++ 10 restarts) on the 3-d embedding of the checkpoint written after
        epoch E (the last focal-only epoch), fitted on TRAIN embeddings, applied to TEST embeddings.
    python scripts/baselines.py bn --run RUN (--epoch E | --step S [--raw]) --train TRAIN --test TEST [--batches N] [--json OUT]
        the test accuracy of the checkpoint of epoch E with its moving-average BatchNorm statistics (what
        `evaluate` uses), with statistics recomputed over N training batches (precise BN), and the
        distances between its centroids.
    python scripts/baselines.py centroids --run RUN [--json OUT]
        the distances between the centroids at the end of every epoch with a checkpoint (read from the
        checkpoints only): how far apart the clusters the k-means loss keeps are, epoch by epoch.
    python scripts/baselines.py boundary --run RUN --epoch E --train TRAIN --test TEST [--plot PNG] [--json OUT]
        where in jet mass the checkpoint of epoch E moves test jets from one cluster to the next: the class
        its clusters give per 1 GeV of mass, the masses where the majority changes, and the accuracy of a
        mass-only classifier that gives every jet its mass bin's majority (equal to the model's accuracy
        when the clusters are mass windows), beside the best cuts fitted on TRAIN; the dip of the mass
        distribution of the two closest clusters' jets (where `train.select_by: mass_valley` aims their
        boundary); and the network's own mass estimate (its focal head's expected bin): its resolution on
        the W and Z jets and the best cuts on it, what clusters that follow it can reach.
    python scripts/baselines.py align --run RUN --epochs E1,E2,... --train TRAIN --test TEST [--json OUT]
        how the split between the two lighter clusters (W and Z) lies in the latent, per epoch-end checkpoint:
        the distance between their centroids against the rms size of the blob their test jets form, the
        share of that blob's variance along the jet-mass direction (least squares of the latent on the
        mass), the cosine between the centroid difference and that direction, and the correlation of a
        jet's side of the split with its mass. For a checkpoint from before the joint phase (centroids
        still zero) the centroids are the k-means start, recomputed on TRAIN as the training loop does.
    python scripts/baselines.py widths --per-jet EVAL/per_jet.parquet [--json OUT]
        the clusters of `ucluster evaluate` re-assigned with per-cluster widths: classification EM with a
        variance (isotropic or per dimension) and a prior per cluster on the trained latent, started from
        the trained assignment; the accuracy after one step and at convergence.
    python scripts/baselines.py supervised-data --data IN --out OUT [--part N]
        a copy of a dataset (or of every N-th row group of it) whose `target` is the truth class (0 W, 1 Z, 2 top),
        num_targets the number of classes.
    python scripts/baselines.py supervised --run RUN --test TEST [--json OUT]
        accuracy of argmax(logits) of a run trained on such a copy (model.num_targets=3).

All accuracies are global over the test set; clusterings use the Hungarian-matched accuracy.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from itertools import islice
from pathlib import Path

import numpy as np

from ucluster_jax.data.reader import ParquetDataset
from ucluster_jax.metrics import closest_pair, contingency_np, mass_dip, matched_accuracy, split_alignment
from ucluster_jax.train.kmeans import kmeans


def _mass_label(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Masses, labels and the dataset's class names."""
    ds = ParquetDataset(path)
    cols = {}
    for b in ds.iter_all(4096):  # only mass and label are kept; avoids holding all particles
        for k in ("mass", "label"):
            cols.setdefault(k, []).append(b[k])
    return (np.concatenate(cols["mass"]).astype(np.float64), np.concatenate(cols["label"]).astype(np.int64),
            ds.meta.class_names)


def window_predict(mass: np.ndarray, w_hi: float, z: tuple[float, float], top: tuple[float, float]) -> np.ndarray:
    """W: m < w_hi; Z: z[0] <= m < z[1]; top: top[0] <= m < top[1]; anything else: -1 (counted wrong)."""
    pred = np.full(len(mass), -1, np.int64)
    pred[mass < w_hi] = 0
    pred[(mass >= z[0]) & (mass < z[1])] = 1
    pred[(mass >= top[0]) & (mass < top[1])] = 2
    return pred


def best_cuts(mass: np.ndarray, label: np.ndarray, step: float = 0.5) -> tuple[float, float, float]:
    """Best two cuts a < b (W below a, Z in [a, b), top from b) by accuracy; a gap never helps."""
    order = np.argsort(mass)
    m, y = mass[order], label[order]
    grid = np.arange(10.0, 200.0 + step, step)
    idx = np.searchsorted(m, grid)  # jets below each grid value
    cum = np.stack([np.concatenate([[0], np.cumsum(y == c)]) for c in range(3)])  # [3, n+1]
    below = cum[:, idx]  # [3, G] class counts below grid value
    total = cum[:, -1][:, None]
    # acc(a, b) = W below a + Z in [a, b) + top above b
    w = below[0][:, None]
    zc = below[1][None, :] - below[1][:, None]
    t = (total[2] - below[2])[None, :]
    score = np.where(grid[:, None] < grid[None, :], w + zc + t, -1)
    i, j = np.unravel_index(np.argmax(score), score.shape)
    return float(grid[i]), float(grid[j]), float(score[i, j] / len(mass))


def confusion_pred(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[list[int]]:
    """Rows: predicted class (W, Z, top, none); columns: truth W, Z, top."""
    m = np.zeros((num_classes + 1, num_classes), np.int64)
    np.add.at(m, (np.where(pred < 0, num_classes, pred), label), 1)
    return m.tolist()


def _cuts(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two masses A,B in GeV") from None
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"{text!r}: the W|Z cut must lie below the Z|top cut")
    return lo, hi


def cmd_mass(a: argparse.Namespace) -> dict:
    m_tr, y_tr, _ = _mass_label(a.train)
    m_te, y_te, names = _mass_label(a.test)
    out: dict = {"n_train": int(len(m_tr)), "n_test": int(len(m_te))}
    orig = window_predict(m_te, 85.0, (85.0, 100.0), (160.0, 200.0))
    out["window_original"] = {"windows": "W < 85, Z 85-100, top 160-200 GeV", "accuracy": float(np.mean(orig == y_te)),
                              "unassigned": float(np.mean(orig < 0)),
                              "confusion": confusion_pred(orig, y_te, len(names))}
    a_cut, b_cut, acc_tr = best_cuts(m_tr, y_tr)
    best = window_predict(m_te, a_cut, (a_cut, b_cut), (b_cut, np.inf))
    out["window_best"] = {"windows": f"W < {a_cut:g}, Z {a_cut:g}-{b_cut:g}, top >= {b_cut:g} GeV (fitted on train)",
                          "cuts": [a_cut, b_cut], "train_accuracy": acc_tr, "accuracy": float(np.mean(best == y_te)),
                          "confusion": confusion_pred(best, y_te, len(names))}
    out["window_given"] = []
    for lo, hi in a.cuts:
        pred = window_predict(m_te, lo, (lo, hi), (hi, np.inf))
        out["window_given"].append({"cuts": [lo, hi], "accuracy": float(np.mean(pred == y_te))})
    # k-means on the mass, on sqrt(mass) (the geometry loss.mass_bins=sqrt asks of the latent) and on its fourth
    # root (the groups train.kmeans_init=mass starts the centroids from, at the recipe's kmeans_mass_power)
    for key, f, f_inv in (("kmeans_mass", lambda m: m, lambda u: u), ("kmeans_sqrt_mass", np.sqrt, np.square),
                          ("kmeans_fourth_root_mass", lambda m: m ** 0.25, lambda u: u ** 4)):
        u_tr, u_te = f(np.clip(m_tr, 0, None)), f(np.clip(m_te, 0, None))
        mu = np.sort(kmeans(u_tr[:, None], len(names), seed=0, restarts=10)[:, 0])
        assign = np.argmin((u_te[:, None] - mu[None, :]) ** 2, axis=1)
        cont = contingency_np(assign, y_te, len(names), len(names))
        acc, mapping = matched_accuracy(cont)
        out[key] = {"centres_gev": [float(c) for c in f_inv(mu)], "edges_gev": [float(e) for e in f_inv((mu[1:] + mu[:-1]) / 2)],
                    "accuracy": acc, "confusion": cont.tolist(), "cluster_to_class": mapping.tolist()}
    # class composition of the samples, for the record
    out["test_mass_median"] = {n: float(np.median(m_te[y_te == c])) for c, n in enumerate(names)}
    out["test_fractions"] = {n: float(np.mean(y_te == c)) for c, n in enumerate(names)}
    if a.plot:
        _mass_plot(m_te, y_te, names, (a_cut, b_cut), a.plot, f"{ParquetDataset(a.test).meta.mass_name} [GeV]")
    return out


def _mass_plot(mass: np.ndarray, label: np.ndarray, names: tuple[str, ...], cuts: tuple[float, float],
               path: Path, xlabel: str) -> None:
    from ucluster_jax.plots import jets
    from ucluster_jax.plotstyle import save, subplots

    fig, ax = subplots(figsize=(6.4, 4.2))
    bins = np.linspace(0, 200, 81)
    for c, name in enumerate(names):
        ax.hist(mass[label == c], bins=bins, histtype="step", lw=1.5, label=f"{name} ({np.sum(label == c)})")
    for x, ls in ((85, ":"), (100, ":"), (160, ":")):
        ax.axvline(x, color="grey", ls=ls, lw=1)
    for x in cuts:
        ax.axvline(x, color="k", ls="--", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("jets / 2.5 GeV")
    ax.set_title("test jets; dotted: original windows, dashed: best cuts (train)")
    ax.legend()
    save(fig, path, jets(names))


def _load_epoch(run: Path, epoch: int | None):
    from ucluster_jax.evaluate import load_run

    cfg, state, meta = load_run(run)
    if epoch is None or int(meta["epoch"]) == epoch:
        return cfg, state, meta
    for m, restore in _epoch_ends(run, cfg):
        if int(m["epoch"]) == epoch:
            return cfg, restore(), m
    raise SystemExit(f"{run}: no checkpoint of epoch {epoch} (train with --set train.keep_checkpoints=50)")


def _load_step(run: Path, step: int, raw: bool):
    """The checkpoint of `step` (mid-epoch ones too: --checkpoint-every-steps); `raw`: the parameters as
    trained, where the run also kept their average (train.param_ema)."""
    from ucluster_jax.evaluate import load_run

    cfg = load_run(run)[0]
    for m, restore in _checkpoints(run, cfg, raw=raw, step=step):
        return cfg, restore(), m
    raise SystemExit(f"{run}: no checkpoint of step {step}")


def _checkpoints(run: Path, cfg, raw: bool = False, step: int | None = None):
    """(sidecar, restore) of every checkpoint (or only `step`'s, found by its file name), oldest first;
    restore() reads the state only when called, with the parameters that are scored (`scored`) or, `raw`,
    as trained."""
    from ucluster_jax import checkpoint
    from ucluster_jax.train.state import create_state, scored

    def restore(blob: bytes, path: Path):
        state = checkpoint.restore(blob, create_state(cfg), path)
        return state if raw else scored(state)

    for p in checkpoint.list_checkpoints(run):
        if step is not None and p.name != f"ckpt-{step:010d}.msgpack":
            continue
        blob, m = checkpoint.read_verified(p)
        yield m, functools.partial(restore, blob, p)


def _epoch_ends(run: Path, cfg):
    """_checkpoints written at an epoch's end (mid-epoch ones skipped)."""
    return ((m, restore) for m, restore in _checkpoints(run, cfg) if m.get("next", [0, 0])[1] == 0)


def _distances(mu: np.ndarray) -> np.ndarray:
    """Centroid-to-centroid distances, from the model's own squared-distance function."""
    from ucluster_jax.model.networks import centroid_distances

    return np.sqrt(np.asarray(centroid_distances(mu, mu), np.float64))


def cmd_embed(a: argparse.Namespace) -> dict:
    from ucluster_jax.parallel.runtime import setup
    from ucluster_jax.train.scoring import embed

    cfg, state, meta = _load_epoch(a.run, a.epoch)
    rt = setup("single")
    bs = cfg.train.eval_batch_size
    # --train-part N: every N-th batch of TRAIN only (a 1/N subset, for speed)
    tr = embed(rt, cfg, state, islice(ParquetDataset(a.train).iter_all(bs), 0, None, a.train_part), train_mode_bn=False)
    test = ParquetDataset(a.test)
    te = embed(rt, cfg, state, test.iter_all(bs), train_mode_bn=False)
    k, c = cfg.model.num_clusters, len(test.meta.class_names)
    mu = kmeans(tr["z"], cfg.model.num_clusters, seed=cfg.train.seed, restarts=cfg.train.kmeans_restarts)
    d = np.sum((te["z"][:, None, :] - mu[None]) ** 2, axis=-1)
    cont = contingency_np(np.argmin(d, 1), te["label"].astype(np.int64), k, c)
    acc, mapping = matched_accuracy(cont)
    # k-means on the test embeddings themselves, for reference
    mu_te = kmeans(te["z"], cfg.model.num_clusters, seed=cfg.train.seed, restarts=cfg.train.kmeans_restarts)
    d_te = np.sum((te["z"][:, None, :] - mu_te[None]) ** 2, axis=-1)
    acc_te = matched_accuracy(contingency_np(np.argmin(d_te, 1), te["label"].astype(np.int64), k, c))[0]
    return {"run": str(a.run), "epoch": int(meta["epoch"]), "step": int(meta["step"]),
            "accuracy": acc, "confusion": cont.tolist(), "cluster_to_class": mapping.tolist(),
            "accuracy_kmeans_fitted_on_test": acc_te, "n_train": int(len(tr["z"])), "n_test": int(len(te["z"]))}


def cmd_bn(a: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from ucluster_jax.model.networks import UCluster
    from ucluster_jax.parallel.runtime import setup
    from ucluster_jax.train.scoring import embed

    cfg, state, meta = _load_epoch(a.run, a.epoch) if a.step is None else _load_step(a.run, a.step, a.raw)
    rt = setup("single")
    test = ParquetDataset(a.test)

    def accuracy(st) -> float:
        o = embed(rt, cfg, st, test.iter_all(cfg.train.eval_batch_size), train_mode_bn=False)
        return matched_accuracy(contingency_np(np.argmin(o["dist"], 1), o["label"].astype(np.int64),
                                               cfg.model.num_clusters, len(test.meta.class_names)))[0]

    model = UCluster(cfg.model)
    batch_stats = jax.jit(lambda st, x: model.apply({"params": st.params, "batch_stats": st.batch_stats}, x,
                                                    train=True, decay=0.0, mutable=["batch_stats"])[1]["batch_stats"])
    total, n = None, 0
    for b in islice(ParquetDataset(a.train).batches(cfg.train.batch_size, lanes=cfg.train.data_lanes, seed=1,
                                                    epoch=0, shuffle=True), a.batches):
        s = batch_stats(state, b["x"])
        total = s if total is None else jax.tree_util.tree_map(jnp.add, total, s)
        n += 1
    precise = state.replace(batch_stats=jax.tree_util.tree_map(lambda v: v / n, total))
    mu = np.asarray(state.params["mu"], np.float64)
    return {"run": str(a.run), "epoch": int(meta["epoch"]), "step": int(meta["step"]), "raw": bool(a.raw),
            "accuracy_moving_average_bn": accuracy(state),
            "accuracy_precise_bn": accuracy(precise), "precise_bn_batches": n,
            "centroid_distances": _distances(mu).round(4).tolist(),
            "centroids": mu.round(4).tolist()}


def cmd_centroids(a: argparse.Namespace) -> dict:
    from ucluster_jax.evaluate import load_run

    rows = []
    for m, restore in _epoch_ends(a.run, load_run(a.run)[0]):
        mu = np.asarray(restore().params["mu"], np.float64)
        d = _distances(mu)
        rows.append({"epoch": int(m["epoch"]), "distances": {f"{i}-{j}": round(float(d[i, j]), 6)
                                                             for i in range(len(mu)) for j in range(i + 1, len(mu))}})
    return {"run": str(a.run), "epochs": rows}


def cmd_boundary(a: argparse.Namespace) -> dict:
    from ucluster_jax.parallel.runtime import setup
    from ucluster_jax.train.scoring import embed

    cfg, state, meta = _load_epoch(a.run, a.epoch)
    test = ParquetDataset(a.test)
    names = test.meta.class_names
    c = len(names)
    o = embed(setup("single"), cfg, state, test.iter_all(cfg.train.eval_batch_size), train_mode_bn=False)
    y, m = o["label"].astype(np.int64), o["mass"].astype(np.float64)
    cont = contingency_np(np.argmin(o["dist"], 1), y, cfg.model.num_clusters, c)
    acc, mapping = matched_accuracy(cont)
    cls = np.asarray(mapping)[np.argmin(o["dist"], 1)]  # the class each jet's cluster stands for
    edges = np.arange(0.0, 301.0, 1.0)
    b = np.clip(np.digitize(m, edges) - 1, 0, len(edges) - 2)
    frac = np.stack([np.bincount(b, weights=cls == k, minlength=len(edges) - 1) for k in range(c)])
    filled = frac.sum(0) > 0
    frac[:, filled] /= frac[:, filled].sum(0)
    majority = np.argmax(frac, 0)
    changes = [float(edges[i]) for i in np.flatnonzero(filled[1:] & filled[:-1] & (majority[1:] != majority[:-1])) + 1]
    a_cut, b_cut, _ = best_cuts(*_mass_label(a.train)[:2])
    best = window_predict(m, a_cut, (a_cut, b_cut), (b_cut, np.inf))
    if a.plot:
        _boundary_plot(edges, frac, filled, names, (a_cut, b_cut), a.plot, f"{test.meta.mass_name} [GeV]")
    means = sorted(float(np.mean(m[cls == k])) for k in range(c) if np.any(cls == k))
    est = _mass_estimate(o["logits"], m, y)
    pair = np.isin(np.argmin(o["dist"], 1), closest_pair(np.asarray(state.params["mu"])))
    return {"run": str(a.run), "epoch": int(meta["epoch"]), "accuracy": acc, "confusion": cont.tolist(),
            "majority_changes_gev": changes, "cluster_mean_mass_gev": means,
            "midpoints_of_means_gev": [0.5 * (u + v) for u, v in zip(means, means[1:])], "accuracy_mass_majority": float(np.mean(majority[b] == y)),
            "dip_gev": mass_dip(m[pair]),  # where train.select_by mass_valley aims the W|Z boundary
            "best_cuts_train_gev": [a_cut, b_cut], "accuracy_best_cuts": float(np.mean(best == y)),
            "mass_estimate": {"resolution_gev": est["resolution_gev"],
                              "accuracy_best_cuts": best_cuts(est["gev"], y)[2],
                              "accuracy_best_cuts_of_the_mass": best_cuts(m, y)[2]},
            "n_test": int(len(y))}


def _mass_estimate(logits: np.ndarray, m: np.ndarray, y: np.ndarray) -> dict:
    """The network's own mass: the focal head's expected bin, put on the GeV scale by a straight-line fit
    on the W and Z jets of 70-105 GeV, and its rms deviation from the mass there. Clusters that follow it
    can at best do what cuts on it do (both fitted here on the test jets, with the truth)."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    e = (p / p.sum(1, keepdims=True)) @ np.arange(logits.shape[1], dtype=np.float64)
    wz = (y < 2) & (m > 70) & (m < 105)
    slope, icpt = np.polyfit(e[wz], m[wz], 1)
    gev = slope * e + icpt
    return {"gev": gev, "resolution_gev": float(np.std(gev[wz] - m[wz]))}


def cmd_align(a: argparse.Namespace) -> dict:
    from ucluster_jax.losses import kmeans_weights
    from ucluster_jax.model.networks import centroid_distances
    from ucluster_jax.parallel.runtime import setup
    from ucluster_jax.train.scoring import embed

    rt, test, out = setup("single"), ParquetDataset(a.test), []
    for epoch in (int(e) for e in a.epochs.split(",")):
        cfg, state, _ = _load_epoch(a.run, epoch)
        bs, k = cfg.train.eval_batch_size, cfg.model.num_clusters
        mu = np.asarray(state.params["mu"], np.float64)
        start = not mu.any()  # pre-training: the centroids the joint phase would start from
        train_mode = start and cfg.train.kmeans_embeddings == "train_mode"  # as the loop's k-means saw them
        if start:
            zt = embed(rt, cfg, state, ParquetDataset(a.train).iter_all(bs), train_mode_bn=train_mode)["z"]
            mu = kmeans(zt, k, seed=cfg.train.seed, restarts=cfg.train.kmeans_restarts).astype(np.float64)
        o = embed(rt, cfg, state, test.iter_all(bs), train_mode_bn=train_mode)
        dist = centroid_distances(o["z"], mu.astype(np.float32)) if start else o["dist"]  # the model's own
        z, m, y = o["z"].astype(np.float64), o["mass"].astype(np.float64), o["label"].astype(np.int64)
        cl = np.argmin(np.asarray(dist), 1)
        acc = matched_accuracy(contingency_np(cl, y, k, len(test.meta.class_names)))[0]
        sa = split_alignment(z, m, cl, mu)  # what `ucluster train` logs at its k-means start (start_*)
        w = sa["wz_clusters"]  # W-like, Z-like
        blob = np.isin(cl, w)
        # the blob's soft assignment in the loss at this epoch's alpha: 0.5 / 0.5 is no pull either way
        alpha = float(state.alpha)
        top = np.asarray(kmeans_weights(np.asarray(dist), alpha))[blob][:, w].max(1) if alpha else None
        out.append({"epoch": epoch, "kmeans_start": bool(start), "accuracy": acc,
                    "wz_centroid_distance": float(np.linalg.norm(mu[w[1]] - mu[w[0]])),
                    "blob_rms": float(np.sum((z[blob] - z[blob].mean(0)) ** 2) / blob.sum()) ** 0.5,
                    "blob_variance_along_mass": sa["variance_along_mass"],
                    "cos_centroid_difference_mass": sa["cos_split_mass"], "corr_side_mass": sa["corr_side_mass"],
                    "cluster_mean_mass_gev": sorted(x for x in sa["cluster_mean_mass"] if x is not None),
                    "alpha": alpha,
                    "blob_soft_weight_max_median": None if top is None else float(np.median(top)),
                    "blob_share_soft_weights_within_60_40": None if top is None else float(np.mean(top < 0.6))})
    return {"run": str(a.run), "epochs": out}


def _boundary_plot(edges: np.ndarray, frac: np.ndarray, filled: np.ndarray, names: tuple[str, ...],
                   cuts: tuple[float, float], path: Path, xlabel: str) -> None:
    from ucluster_jax.plots import jets
    from ucluster_jax.plotstyle import save, subplots

    fig, ax = subplots(figsize=(6.4, 4.2))
    centres = 0.5 * (edges[1:] + edges[:-1])
    for k, name in enumerate(names):
        ax.plot(centres[filled], frac[k, filled], drawstyle="steps-mid", lw=1.5, label=f"cluster of {name}")
    for x in cuts:
        ax.axvline(x, color="k", ls="--", lw=1)
    ax.set_xlim(40, 220)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of test jets")
    ax.set_title("where the clusters change; dashed: best mass cuts (train, with truth)")
    ax.legend()
    save(fig, path, jets(names))


def cmd_supervised_data(a: argparse.Namespace) -> dict:
    from dataclasses import replace

    from ucluster_jax.data.schema import ShardWriter

    ds = ParquetDataset(a.data)
    meta = replace(ds.meta, num_targets=len(ds.meta.class_names))
    w = ShardWriter(a.out, meta, overwrite=a.overwrite)
    n = 0
    for b in islice(ds.iter_all(2048), 0, None, a.part):  # --part N: every N-th batch only
        keep = b["label"] >= 0
        w.add({"x": b["x"][keep], "target": b["label"][keep], "label": b["label"][keep], "mass": b["mass"][keep]})
        n += int(keep.sum())
    w.commit()
    return {"out": str(a.out), "jets": n}


def cmd_supervised(a: argparse.Namespace) -> dict:
    from ucluster_jax.parallel.runtime import setup
    from ucluster_jax.train.scoring import embed

    cfg, state, meta = _load_epoch(a.run, None)
    rt = setup("single")
    test = ParquetDataset(a.test)
    te = embed(rt, cfg, state, test.iter_all(cfg.train.eval_batch_size), train_mode_bn=False)
    pred = np.argmax(te["logits"], -1)
    c = len(test.meta.class_names)
    y = te["label"].astype(np.int64)
    return {"run": str(a.run), "epoch": int(meta["epoch"]), "accuracy": float(np.mean(pred == y)),
            "confusion": confusion_pred(pred, y, c)[:c], "n_test": int(len(y))}


def cmd_widths(a: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq

    t = pq.read_table(a.per_jet).to_pydict()
    dims = sorted(k for k in t if k.startswith("z_"))
    z = np.stack([np.asarray(t[k], np.float64) for k in dims], 1)
    label, start = np.asarray(t["label"], np.int64), np.asarray(t["cluster"], np.int64)
    k = int(start.max()) + 1
    acc = lambda c: matched_accuracy(contingency_np(c, label, k, int(label.max()) + 1))[0]  # noqa: E731
    res = {"per_jet": str(a.per_jet), "nearest_centroid": acc(start)}
    for kind in ("isotropic", "per_dimension"):
        c, steps = start.copy(), []
        for _ in range(100):
            mu = np.stack([z[c == j].mean(0) for j in range(k)])
            d2 = (z[:, None, :] - mu[None]) ** 2  # [N, K, D]
            var = np.stack([d2[c == j, j].mean(0) for j in range(k)])  # [K, D]
            if kind == "isotropic":
                var = np.repeat(var.mean(1, keepdims=True), z.shape[1], 1)
            cost = (d2 / var).sum(-1) + np.log(var).sum(-1) - 2 * np.log(np.bincount(c, minlength=k) / len(c))
            new = np.argmin(cost, 1)
            steps.append(acc(new))
            if np.array_equal(new, c):
                break
            c = new
        res[kind] = {"after_one_step": steps[0], "converged": steps[-1], "steps": len(steps)}
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("mass")
    s.add_argument("--train", type=Path, required=True)
    s.add_argument("--test", type=Path, required=True)
    s.add_argument("--plot", type=Path, help="PNG of the test mass by class with the windows")
    s.add_argument("--cuts", action="append", default=[], metavar="A,B", type=_cuts,
                   help="also score these two cuts (W < A, Z A-B, top >= B GeV) on TEST; repeatable")
    s = sub.add_parser("embed")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("--epoch", type=int, required=True)
    s.add_argument("--train-part", type=int, default=1, help="fit k-means on 1/N of TRAIN (every N-th evaluation batch)")
    s.add_argument("--train", type=Path, required=True)
    s.add_argument("--test", type=Path, required=True)
    s = sub.add_parser("bn")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("--epoch", type=int)
    s.add_argument("--step", type=int, help="instead of --epoch: the checkpoint of this step")
    s.add_argument("--raw", action="store_true", help="with --step: the parameters as trained, not their average")
    s.add_argument("--train", type=Path, required=True)
    s.add_argument("--test", type=Path, required=True)
    s.add_argument("--batches", type=int, default=100, help="training batches for the precise statistics")
    s = sub.add_parser("centroids")
    s.add_argument("--run", type=Path, required=True)
    s = sub.add_parser("boundary")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("--epoch", type=int, required=True)
    s.add_argument("--train", type=Path, required=True)
    s.add_argument("--test", type=Path, required=True)
    s.add_argument("--plot", type=Path, help="PNG of the cluster fractions against the jet mass")
    s = sub.add_parser("align")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("--epochs", required=True, help="comma-separated epochs with an epoch-end checkpoint")
    s.add_argument("--train", type=Path, required=True)
    s.add_argument("--test", type=Path, required=True)
    s = sub.add_parser("widths")
    s.add_argument("--per-jet", type=Path, required=True, help="per_jet.parquet written by `ucluster evaluate`")
    s = sub.add_parser("supervised-data")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--part", type=int, default=1, help="copy 1/N of the jets (every N-th evaluation batch)")
    s = sub.add_parser("supervised")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("--test", type=Path, required=True)
    for s in sub.choices.values():
        s.add_argument("--json", type=Path, help="also write the result here")
    a = p.parse_args(argv)
    res = {"mass": cmd_mass, "embed": cmd_embed, "bn": cmd_bn, "centroids": cmd_centroids, "boundary": cmd_boundary, "align": cmd_align, "widths": cmd_widths, "supervised-data": cmd_supervised_data,
           "supervised": cmd_supervised}[a.cmd](a)
    text = json.dumps(res, indent=1)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
