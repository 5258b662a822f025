"""Seeded k-means++ with restarts, and the centroids' start in the pre-trained embedding."""
from __future__ import annotations

import numpy as np


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.sum((x[:, None, :] - c[None, :, :]) ** 2, axis=-1)


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each new centre drawn with probability proportional to D^2."""
    centres = [x[rng.integers(len(x))]]
    d2 = _sq_dist(x, np.asarray(centres))[:, 0]
    for _ in range(1, k):
        total = d2.sum()
        i = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centres.append(x[i])
        d2 = np.minimum(d2, _sq_dist(x, x[i][None])[:, 0])
    return np.asarray(centres)


def lloyd(x: np.ndarray, centres: np.ndarray, iters: int, tol: float = 1e-7) -> tuple[np.ndarray, float]:
    """Lloyd iterations; an emptied cluster keeps its previous centre. Returns (centres, inertia)."""
    for _ in range(iters):
        assign = np.argmin(_sq_dist(x, centres), axis=1)
        new = np.array([x[assign == j].mean(0) if np.any(assign == j) else centres[j] for j in range(len(centres))])
        shift = np.sum((new - centres) ** 2)
        centres = new
        if shift <= tol * max(np.mean(np.var(x, axis=0)), 1e-12):
            break
    inertia = float(np.sum(np.min(_sq_dist(x, centres), axis=1)))
    return centres, inertia


def kmeans(x: np.ndarray, k: int, *, seed: int, restarts: int = 10, iters: int = 100) -> np.ndarray:
    """Best of `restarts` k-means++ runs by inertia; float64 internally, deterministic for a seed.

    Embeddings that differ only by float rounding (another world size) must give the same centroids:
    a later restart wins only if it is better by more than a millionth, and the centroids come out
    sorted (lexicographically), so two restarts that found the same clusters in another order agree.
    """
    x = np.asarray(x, np.float64)
    if len(x) < k:
        raise ValueError(f"k-means needs at least {k} embeddings, got {len(x)}")
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        centres, inertia = lloyd(x, kmeans_pp_init(x, k, rng), iters)
        if inertia < best_inertia * (1 - 1e-6):
            best, best_inertia = centres, inertia
    return best[np.lexsort(best.T[::-1])].astype(np.float32)


def mass_group_centroids(z: np.ndarray, mass: np.ndarray, k: int, *, power: float, seed: int,
                         restarts: int = 10) -> np.ndarray:
    """The embeddings' mean over each group that k-means finds on mass ** power (groups in mass order).

    Why: k-means on the embeddings starts the joint phase where the embedding's own geometry puts it (on
    W/Z/top, often a W|Z edge far above the dip between the peaks); a clustering of the mass alone, which
    needs no labels, starts it at the split the mass makes (docs/RESULTS.md, "Centroids started from the
    mass"). A group left empty (fewer distinct masses than k) starts at the embeddings' mean."""
    q = np.maximum(np.asarray(mass, np.float64), 0.0)[:, None] ** power
    group = np.argmin(_sq_dist(q, kmeans(q, k, seed=seed, restarts=restarts).astype(np.float64)), axis=1)
    z = np.asarray(z, np.float64)
    return np.stack([z[group == j].mean(0) if np.any(group == j) else z.mean(0) for j in range(k)]).astype(np.float32)
