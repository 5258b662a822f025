"""The pure training step: one jitted combined loss, gradients, the original's Adam update.

The step knows nothing of devices or MPI: data parallelism passes two reductions in,
`replica_sum` (BatchNorm moments over the global batch) and `grad_mean` (gradients over replicas).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ucluster_jax.config import Config
from ucluster_jax.data.schema import CLASS_NAMES
from ucluster_jax.losses import combined_loss, mass_bin_target
from ucluster_jax.model.batchnorm import ReplicaSum, bn_decay
from ucluster_jax.model.networks import UCluster
from ucluster_jax.train.state import TrainState, learning_rate, tf1_adam

Array = jax.Array
Batch = dict[str, Array]
GradMean = Callable[[dict], dict]


def edge_chunk() -> int:
    """Jets per chunk of the GAP layers' edge passes on this machine: 16 on CPU (a chunk's edges stay
    near the cores; 16 measured steadier than 8, docs/BENCHMARKS.md); on accelerators the whole batch
    (any size above it), where many small sequential chunks would leave the device idle."""
    return 16 if jax.default_backend() == "cpu" else 2**31 - 1


def contingency(dist: Array, label: Array, num_clusters: int, num_classes: int) -> Array:
    """Counts of (nearest centroid, truth class) for the jets with a known class; [K, C] int32."""
    cluster = jnp.argmin(dist, axis=-1)
    valid = label >= 0
    onehot_k = jax.nn.one_hot(cluster, num_clusters, dtype=jnp.int32) * valid[:, None]
    onehot_c = jax.nn.one_hot(jnp.where(valid, label, 0), num_classes, dtype=jnp.int32)
    return onehot_k.T @ onehot_c


def step_key(cfg: Config) -> Config:
    """The config as a compiled step or evaluation sees it. What only the loop reads is set to fixed values:
    the seed, the run's length and selection (the pre-training candidates differ there from the run that
    goes on), the cluster weight and alpha ramp (they reach the step through the state) and the k-means
    restarts: runs or `ucluster tune` trials differing only there share one compilation in a process."""
    train = dataclasses.replace(cfg.train, seed=0, epochs=1, pretrain_candidates=1, select_from_epoch=0,
                                kmeans_restarts=1)
    return dataclasses.replace(cfg, train=train, loss=dataclasses.replace(cfg.loss, beta=1.0, alpha_scale=1.0))


def make_train_step(cfg: Config, *, replica_sum: ReplicaSum | None = None, grad_mean: GradMean | None = None,
                    world: int = 1, num_classes: int = len(CLASS_NAMES),
                    with_grads: bool = False) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Build `train_step(state, batch) -> (state, metrics)`.

    `world` is the number of replicas the global batch is split over (samples seen, linear LR scaling).
    `num_classes`: the dataset's classes (its metadata's class_names), the width of the contingency counts.
    `with_grads` adds the gradient the update applied to the metrics (equivalence checks).
    """
    grads_fn = make_grads_fn(cfg, replica_sum=replica_sum, num_classes=num_classes)
    apply_fn = make_apply_fn(cfg, world=world, with_grads=with_grads)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        grads, new_stats, metrics = grads_fn(state, batch)
        if grad_mean is not None:
            grads = grad_mean(grads)
        return apply_fn(state, grads, new_stats, metrics, batch["x"].shape[0])

    return train_step


def make_multi_step(train_step: Callable) -> Callable:
    """Many steps as one compiled loop: `multi(state, batches) -> (state, metrics)`.

    `batches` holds [S, B, ...] arrays already on the device (an epoch, where it fits); the loop is
    a `lax.scan`, so there is no Python or host synchronisation between steps. Metrics come back
    stacked [S, ...]. Jit it with `donate_argnums=0`.
    """

    def multi(state, batches):
        return jax.lax.scan(train_step, state, batches)

    return multi


def make_grads_fn(cfg: Config, *, replica_sum: ReplicaSum | None = None, num_classes: int = len(CLASS_NAMES)):
    """First half of the step: forward, combined loss, gradients, new BN statistics, batch metrics."""
    model = UCluster(cfg.model, replica_sum=replica_sum, edge_chunk=edge_chunk())
    t, lc = cfg.train, cfg.loss

    def target_of(batch: Batch) -> Array:
        if lc.mass_bins != "prepared":
            return mass_bin_target(batch["mass"], cfg.model.num_targets, lc.mass_range, lc.mass_bins)
        return batch["target"]

    def grads_fn(state: TrainState, batch: Batch):
        decay = bn_decay(state.samples_seen, t.bn_decay_init, t.bn_decay_rate, t.bn_decay_samples, t.bn_decay_clip)

        def loss_fn(params):
            out, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["x"],
                                        train=True, decay=decay, global_features=batch.get("global"),
                                        mutable=["batch_stats"])
            loss, parts = combined_loss(out, target_of(batch), alpha=state.alpha, cluster_weight=state.cluster_weight,
                                        gamma=lc.focal_gamma, focal_alpha=lc.focal_alpha,
                                        point_reduce=lc.point_reduce)
            return loss, (parts, new_vars["batch_stats"], out["dist"])

        (loss, (parts, new_stats, dist)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        metrics = {"loss": loss, "focal": parts["focal"], "kmeans": parts["kmeans"],
                   "contingency": contingency(dist, batch["label"], cfg.model.num_clusters, num_classes)}
        return grads, new_stats, metrics

    return grads_fn


def make_apply_fn(cfg: Config, *, world: int = 1, with_grads: bool = False):
    """Second half: the original's Adam update at the scheduled LR, skipping non-finite gradients.

    Gradients arrive already averaged over replicas, so every replica takes the same decision.
    `with_grads`: the metrics carry them as "grads".
    """
    adam = tf1_adam()

    def apply_fn(state: TrainState, grads, new_stats, metrics: dict, local_batch: int):
        lr = learning_rate(state.samples_seen, cfg.train, world, state.joint_lr)
        # one reduction over all gradients: reduced leaf by leaf and stacked, the optimised step was 3.3x
        # larger (49,450 lines of HLO against 14,987) and took 9-10 s to compile against 5-6 s, same speed
        finite = jnp.all(jnp.isfinite(ravel_pytree(grads)[0]))
        updates, opt_state = adam.update(grads, state.opt_state)
        params = jax.tree_util.tree_map(lambda p, u: p - lr * u, state.params, updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        params = keep(params, state.params)
        ema = state.ema_params
        if ema is not None:  # pre-training (no clustering weight yet): the average is the parameters
            d = jnp.where(state.cluster_weight > 0, cfg.train.param_ema, 0.0)
            ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        new_state = state.replace(
            step=state.step + finite.astype(jnp.int32),
            samples_seen=state.samples_seen + jnp.where(finite, local_batch * world, 0).astype(jnp.int32),
            params=params, batch_stats=keep(new_stats, state.batch_stats), ema_params=ema,
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where((~finite) & (state.first_nonfinite_step < 0),
                                           state.step, state.first_nonfinite_step),
        )
        return new_state, {**metrics, "lr": lr, **({"grads": grads} if with_grads else {})}

    return apply_fn


def make_eval_fn(cfg: Config, *, train_mode_bn: bool = False) -> Callable[[TrainState, Array], dict[str, Array]]:
    """Embed jets: z, logits, distances. `train_mode_bn` normalises with the batch's own statistics
    (how the original's k-means saw the embeddings) without touching the moving averages."""
    model = UCluster(cfg.model, edge_chunk=edge_chunk())

    def eval_fn(state: TrainState, x: Array, global_features: Array | None = None) -> dict[str, Array]:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if train_mode_bn:
            out, _ = model.apply(variables, x, train=True, decay=1.0, global_features=global_features,
                                 mutable=["batch_stats"])
            return out
        return model.apply(variables, x, train=False, global_features=global_features)

    return eval_fn
