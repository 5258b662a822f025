"""Clustering accuracy: best one-to-one matching of clusters to classes (Hungarian method)."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def matched_accuracy(contingency: np.ndarray) -> tuple[float, np.ndarray]:
    """Accuracy of the best cluster->class matching of a [K, C] count matrix, and that matching.

    Returns (accuracy, mapping) with mapping[k] = class assigned to cluster k (-1 if unmatched).
    """
    c = np.asarray(contingency, np.int64)
    n = c.sum()
    rows, cols = linear_sum_assignment(-c)
    mapping = np.full(c.shape[0], -1, np.int64)
    mapping[rows] = cols
    return (float(c[rows, cols].sum() / n) if n else float("nan")), mapping


def per_batch_accuracy(per_batch: np.ndarray) -> float:
    """The original's logged figure: matched accuracy of each batch on its own, averaged (optimistic)."""
    accs = [matched_accuracy(c)[0] for c in per_batch if c.sum() > 0]
    return float(np.mean(accs)) if accs else float("nan")


def contingency_np(cluster: np.ndarray, label: np.ndarray, k: int, c: int) -> np.ndarray:
    valid = label >= 0
    m = np.zeros((k, c), np.int64)
    np.add.at(m, (cluster[valid], label[valid]), 1)
    return m
