"""The anomaly task's figures of merit: how much a cluster enriches a resonance in QCD dijets.

Per cluster: signal efficiency eps_S (its share of all signal events), background efficiency eps_B,
purity S/(S+B). The significance improvement of a selection is (S_sel/sqrt(B_sel)) / (S/sqrt(B)) =
eps_S/sqrt(eps_B): how much S/sqrt(B) grows over the inclusive sample. The reference is a window on the
two jet masses chosen with the truth labels (the best of all windows on a grid): what a physicist who
knew the resonance's masses would cut, so an upper reference, not a label-free method. The label-free
reference is k-means (k = 2) on the standardised event features (log m and tau21 of both jets): what the
network's clusters must beat to have learnt anything beyond them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ucluster_jax.plotstyle import save, subplots
from ucluster_jax.train.kmeans import kmeans

MJJ_BINS = np.linspace(1000, 6000, 51)


def selection(sel: np.ndarray, signal: np.ndarray) -> dict:
    """eps_S, eps_B, purity and significance improvement of a boolean selection."""
    s_all, b_all = int(signal.sum()), int((~signal).sum())
    s, b = int((sel & signal).sum()), int((sel & ~signal).sum())
    eff_s = s / s_all if s_all else float("nan")
    eff_b = b / b_all if b_all else float("nan")
    return {"events": s + b, "signal": s, "background": b, "eff_signal": eff_s, "eff_background": eff_b,
            "purity": s / (s + b) if s + b else float("nan"),
            "significance_improvement": eff_s / np.sqrt(eff_b) if b else float("nan")}


def best_mass_window(m1: np.ndarray, m2: np.ndarray, signal: np.ndarray, *, bins: int = 24,
                     min_background: int = 20) -> dict:
    """The rectangle [a1,b1) x [a2,b2) in (heavier, lighter) jet mass, edges on a log grid from 10 GeV to
    1 TeV, with the largest eps_S/sqrt(eps_B) among those keeping >= `min_background` background events
    (fewer would make the ratio a fluctuation)."""
    edges = np.geomspace(10.0, 1000.0, bins + 1)
    hist = [np.histogram2d(m1[w], m2[w], bins=(edges, edges))[0] for w in (signal, ~signal)]
    cum = [np.pad(h.cumsum(0).cumsum(1), ((1, 0), (1, 0))) for h in hist]
    i = np.arange(bins + 1)
    a1, b1, a2, b2 = np.ix_(i, i, i, i)

    def box(c):
        return c[b1, b2] - c[a1, b2] - c[b1, a2] + c[a1, a2]

    s, b = box(cum[0]), box(cum[1])
    valid = (a1 < b1) & (a2 < b2) & (b >= min_background)
    n_s, n_b = max(int(signal.sum()), 1), max(int((~signal).sum()), 1)
    si = np.where(valid, (s / n_s) / np.sqrt(np.maximum(b, 1) / n_b), -np.inf)
    best = np.unravel_index(np.argmax(si), si.shape)
    window = [float(edges[best[0]]), float(edges[best[1]]), float(edges[best[2]]), float(edges[best[3]])]
    sel = (m1 >= window[0]) & (m1 < window[1]) & (m2 >= window[2]) & (m2 < window[3])
    return {"window_gev": {"heavier_jet": window[:2], "lighter_jet": window[2:]}, **selection(sel, signal)}


def jet_masses(global_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(heavier, lighter) jet mass from the global features (log m1, tau21_1, log m2, tau21_2)."""
    return np.exp(global_features[:, 0]), np.exp(global_features[:, 2])


def richest(cluster: np.ndarray, signal: np.ndarray, k: int) -> tuple[list[dict], int]:
    """Every cluster's selection figures and the index of the signal-rich one (highest purity)."""
    clusters = [selection(cluster == c, signal) for c in range(k)]
    return clusters, int(np.nanargmax([c["purity"] for c in clusters]))


def report(cluster: np.ndarray, label: np.ndarray, global_features: np.ndarray, k: int, seed: int = 0) -> dict:
    """The clusters' selection figures, the signal-rich one, and the two references."""
    signal = label == 1
    clusters, rich = richest(cluster, signal, k)
    m1, m2 = jet_masses(global_features)
    g = (global_features - global_features.mean(0)) / np.maximum(global_features.std(0), 1e-12)
    mu = kmeans(g, k, seed=seed)
    km, km_rich = richest(np.argmin(((g[:, None, :] - mu[None]) ** 2).sum(-1), axis=1), signal, k)
    return {"signal_fraction": float(signal.mean()) if len(signal) else float("nan"), "clusters": clusters,
            "signal_cluster": rich,
            "significance_improvement": clusters[rich]["significance_improvement"],
            "mass_window": best_mass_window(m1, m2, signal),
            "kmeans_event_features": km[km_rich]}


def mjj_plot(mjj: np.ndarray, cluster: np.ndarray, label: np.ndarray, global_features: np.ndarray, rep: dict,
             path: Path) -> Path:
    """Dijet mass: per cluster; signal and background in the signal-rich cluster and in the mass window,
    each beside the inclusive sample."""
    signal = label == 1
    w = rep["mass_window"]["window_gev"]
    m1, m2 = jet_masses(global_features)
    in_window = ((m1 >= w["heavier_jet"][0]) & (m1 < w["heavier_jet"][1])
                 & (m2 >= w["lighter_jet"][0]) & (m2 < w["lighter_jet"][1]))
    rich = rep["signal_cluster"]
    fig, axes = subplots(1, 3, figsize=(16, 4.5))
    for c in range(len(rep["clusters"])):
        axes[0].hist(mjj[cluster == c], bins=MJJ_BINS, histtype="step", lw=1.5, label=f"cluster {c}")
    axes[0].set_title("dijet mass per cluster")
    for ax, sel, name, figures in ((axes[1], cluster == rich, f"cluster {rich} (signal-rich)", rep["clusters"][rich]),
                                   (axes[2], in_window, "jet-mass window (uses labels)", rep["mass_window"])):
        for part, colour, what in ((~signal, "C0", "background"), (signal, "C3", "signal")):
            ax.hist(mjj[part], bins=MJJ_BINS, histtype="step", lw=1, ls="--", color=colour, label=f"{what}, all")
            ax.hist(mjj[part & sel], bins=MJJ_BINS, histtype="step", lw=1.8, color=colour, label=f"{what}, {name}")
        ax.set_title(f"{name}: S/sqrt(B) x {_fmt(figures)}", fontsize=9)
    for ax in axes:
        ax.set_xlabel("dijet mass [GeV]")
        ax.set_ylabel("events")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    return save(fig, path, "QCD dijets + resonance")


def _fmt(sel: dict) -> str:
    v = sel["significance_improvement"]
    return "n/a" if not np.isfinite(v) else f"{v:.2f}"

