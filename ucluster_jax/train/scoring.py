"""Embedding, k-means and scoring of a trained state: what the training loop, `ucluster evaluate` and
the scripts share, apart from the loop itself."""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ucluster_jax.config import Config, TrainConfig
from ucluster_jax.data.reader import ParquetDataset
from ucluster_jax.losses import kmeans_loss
from ucluster_jax.metrics import contingency_np, matched_accuracy, split_alignment
from ucluster_jax.model.networks import centroid_distances
from ucluster_jax.parallel.runtime import Runtime
from ucluster_jax.train.kmeans import kmeans, mass_group_centroids
from ucluster_jax.train.state import TrainState, scored
from ucluster_jax.train.step import make_eval_fn, step_key


@functools.lru_cache(maxsize=8)
def _compiled_eval(cfg: Config, train_mode_bn: bool):
    """One jitted evaluation function per (config as `step_key` sees it, BN mode): scoring every epoch, and
    every pre-training candidate, compiles once."""
    return jax.jit(make_eval_fn(cfg, train_mode_bn=train_mode_bn))


def embed(rt: Runtime, cfg: Config, host_state: TrainState, batches: Iterable[dict[str, np.ndarray]], *,
          train_mode_bn: bool) -> dict[str, np.ndarray]:
    """Embeddings, distances, per-jet logits, global features, labels and masses of `batches` (one device
    per rank), in order."""
    fn = _compiled_eval(step_key(cfg), train_mode_bn)
    dev = rt.devices[0]
    state = jax.device_put(host_state, dev)
    m = cfg.model
    # the per-jet logits (baselines); the anomaly model's per-particle ones would be 100x larger
    width = {"z": m.latent_dim, "dist": m.num_clusters,
             **({"logits": m.num_targets} if m.variant != "anomaly" else {}),
             **({"global": m.num_global} if m.num_global else {})}
    outs: dict[str, list] = {k: [] for k in (*width, "label", "mass")}
    for b in batches:
        o = fn(state, jax.device_put(b["x"], dev), b.get("global"))
        for k in width:
            outs[k].append(b[k] if k == "global" else o[k])
        outs["label"].append(b["label"])
        outs["mass"].append(b["mass"])
    if not outs["z"]:  # a rank without evaluation batches: empty rows of the right widths, for the gathers
        return {k: np.zeros((0, width[k]) if k in width else (0,), np.float32) for k in outs}
    return {k: np.concatenate(jax.device_get(v)) for k, v in outs.items()}


def init_centroids(rt: Runtime, cfg: Config, host_state: TrainState, ds: ParquetDataset
                   ) -> tuple[np.ndarray, dict | None]:
    """Global k-means: every rank embeds its block of eval batches, rank 0 clusters all of them (in file
    order, whatever the world size; `train.kmeans_init`), the result is broadcast.

    Also returns, on rank 0 (None elsewhere), what the start looks like on the training jets: its
    matched accuracy where they have labels, and how its W|Z split lies against the jet mass
    (`split_alignment`, label-free; what it does and does not tell: docs/RESULTS.md, "Five starts")."""
    o = embed(rt, cfg, host_state, ds.iter_all(cfg.train.eval_batch_size),
              train_mode_bn=cfg.train.kmeans_embeddings == "train_mode")
    z, mass, label = (rt.gather_rows(o[k]) for k in ("z", "mass", "label"))
    mu, start = None, None
    if rt.is_root:
        t = cfg.train
        mu = (mass_group_centroids(z, mass, cfg.model.num_clusters, power=t.kmeans_mass_power, seed=t.seed,
                                   restarts=t.kmeans_restarts) if t.kmeans_init == "mass"
              else kmeans(z, cfg.model.num_clusters, seed=t.seed, restarts=t.kmeans_restarts, iters=t.kmeans_iters))
        cluster = np.argmin(np.asarray(centroid_distances(z, mu)), axis=1)
        start = split_alignment(z, mass, cluster, mu)
        cont = contingency_np(cluster, label.astype(np.int64), cfg.model.num_clusters, len(ds.meta.class_names))
        if cont.sum():
            start["train_acc"] = matched_accuracy(cont)[0]
    return np.asarray(rt.bcast(mu), np.float32), start


def how_started(t: TrainConfig) -> str:
    """The log's name for how the centroids started (`train.kmeans_init`)."""
    if t.kmeans_init == "mass":
        return f"means over the k-means groups ({t.kmeans_restarts} restarts) of mass^{t.kmeans_mass_power:g}"
    return f"k-means++ ({t.kmeans_restarts} restarts)"


def format_start(start: dict) -> str:
    """One line for the log: the k-means start's cluster masses, its W|Z split against the mass, and
    its training accuracy where the jets have labels."""
    masses = ", ".join("-" if x is None else f"{x:.1f}" for x in start["cluster_mean_mass"])
    parts = [f"cluster mean mass [{masses}] GeV"]
    if "corr_side_mass" in start:
        parts.append(f"W|Z split vs mass: corr {start['corr_side_mass']:.3f}, "
                     f"variance along mass {start['variance_along_mass']:.3f}, cos {start['cos_split_mass']:.3f}")
    if "train_acc" in start:
        parts.append(f"train acc {start['train_acc']:.4f}")
    return "; ".join(parts)


def latent_sample(rt: Runtime, cfg: Config, host: TrainState, ds: ParquetDataset, max_jets: int = 4096
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latent, nearest centroid, truth) of up to `max_jets` of this rank's jets: what a figure of the
    latent shows during training. Local to the rank: no collectives, so rank 0 may call it alone."""
    b = cfg.train.eval_batch_size
    o = embed(rt, cfg, host, itertools.islice(ds.iter_all(b), max(1, max_jets // b)), train_mode_bn=False)
    return o["z"], np.argmin(o["dist"], axis=-1), o["label"].astype(np.int64)


def evaluate_split(rt: Runtime, cfg: Config, host: TrainState, ds: ParquetDataset, *, alpha: float,
                   prefix: str) -> dict:
    """Globally matched accuracy and the Deep k-Means loss (at `alpha`) of a labelled split, all ranks."""
    o = embed(rt, cfg, host, ds.iter_all(cfg.train.eval_batch_size), train_mode_bn=False)
    k, c = cfg.model.num_clusters, len(ds.meta.class_names)
    cont = contingency_np(np.argmin(o["dist"], -1), o["label"].astype(np.int64), k, c) if len(o["z"]) \
        else np.zeros((k, c), np.int64)
    n = len(o["dist"])
    km = np.array([float(kmeans_loss(jnp.asarray(o["dist"]), alpha)) * n if n else 0.0, n])  # sum, count
    cont, km = rt.sum(cont), rt.sum(km)
    return {f"{prefix}_acc": matched_accuracy(cont)[0] if cont.sum() else None,
            f"{prefix}_kmeans": float(km[0] / km[1]) if km[1] else None}


def score_test(rt: Runtime, cfg: Config, ds: ParquetDataset, host: TrainState, *, alpha: float) -> dict:
    """The test split's scores now, with the parameters' moving average where one is kept."""
    return evaluate_split(rt, cfg, scored(host), ds, alpha=alpha, prefix="test")


@dataclasses.dataclass
class CurvePoints:
    """The scores of an epoch's points on the curve against joint-phase samples (RUN/curve.jsonl): each score
    (test split, label-free selection) every `every` steps inside the epoch (0: never there) and at its end.
    Called with the host state, it runs those due at step `s` (None: the epoch's end), hands the row to
    `point` and returns the scores."""
    scores: list[tuple[Callable[[TrainState], dict], int]]
    point: Callable[[dict], None]
    epoch: int
    joint_start: int

    def _at(self, s: int | None) -> list[Callable[[TrainState], dict]]:
        return [score for score, every in self.scores if s is None or (every and s % every == 0)]

    def due(self, s: int) -> bool:
        return bool(self._at(s))

    def __call__(self, host: TrainState, s: int | None = None) -> dict:
        rec = {k: v for score in self._at(s) for k, v in score(host).items()}
        seen = int(host.samples_seen)
        self.point({"epoch": self.epoch, "step": int(host.step), "samples_seen": seen,
                    "joint_samples": seen - self.joint_start, **rec})
        return rec
