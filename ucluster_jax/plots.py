"""PNG plots people look at: the latent space by cluster and by truth, jet mass per cluster, training curves;
all in the one style of plotstyle.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ucluster_jax.config import criterion_in
from ucluster_jax.plotstyle import SAMPLE, save, subplots


def class_name(class_names: tuple[str, ...], c: int, other: str) -> str:
    """The dataset's name of truth class `c`; `other` for unlabelled or unknown values."""
    return class_names[c] if 0 <= c < len(class_names) else other


def jets(class_names: tuple[str, ...]) -> str:
    """The sample a plot shows, named by the dataset's classes: "W/Z/top jets"."""
    return "/".join(class_names) + " jets"


def latent_plot(z: np.ndarray, cluster: np.ndarray, label: np.ndarray, mu: np.ndarray | None, path: Path,
                class_names: tuple[str, ...], max_points: int = 20000, seed: int = 0) -> Path:
    """Pairs of latent dimensions, coloured by assigned cluster (top row) and by truth (bottom row)."""
    rng = np.random.default_rng(seed)
    sel = rng.permutation(len(z))[:max_points]
    z, cluster, label = z[sel], cluster[sel], label[sel]
    d = z.shape[1]
    pairs = [(i, j) for i in range(d) for j in range(i + 1, d)] or [(0, 0)]
    fig, axes = subplots(2, len(pairs), figsize=(4.2 * len(pairs), 8), squeeze=False)
    for col, (i, j) in enumerate(pairs):
        for row, (colour, title) in enumerate(((cluster, "cluster"), (label, "truth"))):
            ax = axes[row, col]
            for v in np.unique(colour):
                m = colour == v
                name = f"cluster {v}" if row == 0 else class_name(class_names, v, "unknown")
                ax.scatter(z[m, i], z[m, j], s=2, alpha=0.4, label=name)
            if mu is not None:
                ax.scatter(mu[:, i], mu[:, j], marker="x", c="k", s=80)
            ax.set_xlabel(f"z{i}")
            ax.set_ylabel(f"z{j}")
            ax.set_title(f"latent by {title}" + (" (x: centroids)" if mu is not None else ""))
            ax.legend(markerscale=4, fontsize=7)
    return save(fig, path, jets(class_names))


def mass_plot(mass: np.ndarray, cluster: np.ndarray, label: np.ndarray, k: int, path: Path,
              class_names: tuple[str, ...], what: str = "jet mass") -> Path:
    """The mass (`what`: the dataset's `mass_name`) of each cluster, and of each truth class for comparison."""
    fig, axes = subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(0, 250, 51)
    for c in range(k):
        axes[0].hist(mass[cluster == c], bins=bins, histtype="step", lw=1.5, label=f"cluster {c}")
    for c in np.unique(label[label >= 0]):
        axes[1].hist(mass[label == c], bins=bins, histtype="step", lw=1.5, label=class_name(class_names, c, str(c)))
    for ax, title in zip(axes, (f"{what} per cluster", f"{what} per truth class")):
        ax.set_xlabel(f"{what} [GeV]")
        ax.set_ylabel("jets")
        ax.set_title(title)
        ax.legend()
    return save(fig, path, jets(class_names))


def training_curves(records: list[dict], path: Path, sample: str = SAMPLE) -> Path:
    """Loss parts and accuracies per epoch from metrics.jsonl."""
    ep = [r["epoch"] for r in records]
    fig, axes = subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "focal", "kmeans"):
        axes[0].plot(ep, [r.get(key) for r in records], label=key)
    axes[0].set_yscale("log")
    for key in ("train_acc", "train_acc_per_batch", "test_acc"):
        vals = [r.get(key) for r in records]
        if any(v is not None for v in vals):
            axes[1].plot(ep, [np.nan if v is None else v for v in vals], label=key)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend()
    axes[1].set_ylabel("matched accuracy")
    return save(fig, path, sample)


# train.select_by's criteria as curve.jsonl names them, with their axis labels
SELECT_LABELS = {"boundary_density": "boundary density, training jets (no labels; lowest kept)",
                 "mass_valley": "W|Z mass edge to mass dip, GeV (lowest kept)"}


def accuracy_vs_samples(runs: dict[str, list[dict]], path: Path, original: list[dict] | None = None,
                        sample: str = SAMPLE) -> Path:
    """Global test accuracy and test k-means loss against joint-phase samples (RUN/curve.jsonl rows),
    with the original run's logged test accuracy (per-batch matched) on the same axis; where the rows
    carry it, the label-free criterion that train.select_from_epoch chooses the result by."""
    by = criterion_in([r for rows in runs.values() for r in rows])
    fig, axes = subplots(1, 3 if by else 2, figsize=(18 if by else 12, 4.2))
    for name, rows in runs.items():
        tested = [r for r in rows if "test_acc" in r]
        x = [max(r["joint_samples"], 1) for r in tested]
        axes[0].plot(x, [r["test_acc"] for r in tested], marker=".", label=name)
        axes[1].plot(x, [r["test_kmeans"] for r in tested], marker=".", label=name)
        chosen = [r for r in rows if r.get(by) is not None]
        if by and chosen:
            axes[2].plot([max(r["joint_samples"], 1) for r in chosen], [r[by] for r in chosen],
                         marker=".", label=name)
    if original:
        pts = [(r["joint_samples"], r["test_acc"]) for r in original if r.get("joint_samples") and "test_acc" in r]
        axes[0].plot(*zip(*pts), color="k", lw=1, label="original, hls4ml (log_dkm.txt, per-batch)")
    axes[0].set_ylabel("test accuracy (global, matched)")
    axes[1].set_ylabel("test k-means loss")
    axes[1].set_yscale("log")
    if by:
        axes[2].set_ylabel(SELECT_LABELS[by])
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("joint-phase training samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path, sample)
