"""ABCNet trunk and the UCluster model (SPEC section 2), multiclass and anomaly variants in one code."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn

from ucluster_jax.config import ModelConfig
from ucluster_jax.model.batchnorm import BatchNorm, ReplicaSum
from ucluster_jax.model.gap import ConvBN, GAPLayer, glorot
from ucluster_jax.model.knn import eta_phi_distance, knn_indices, pairwise_sq_dist

Array = jax.Array


class UCluster(nn.Module):
    """ABCNet embedding z [B,latent], auxiliary logits, and the trainable centroids `mu`.

    Returns a dict: z, logits ([B,T] for the jet head, [B,N,T] for the per-particle head), dist
    (squared distances to the centroids, [B,K]).
    """

    cfg: ModelConfig
    replica_sum: ReplicaSum | None = None
    edge_per_point: bool = True
    # jets per chunk of the GAP layers' edge passes (the same function whatever the size; 0: the
    # plain layers). A speed setting of the machine, chosen by the caller (`train.step.edge_chunk`).
    edge_chunk: int = 0

    @nn.compact
    def __call__(self, x: Array, *, train: bool, decay: Array | float = 0.0,
                 global_features: Array | None = None) -> dict[str, Array]:
        cfg = self.cfg
        mask = (x[..., 2] != 0) if cfg.mask_padding else None
        kw = dict(bn_epsilon=cfg.bn_epsilon, replica_sum=self.replica_sum,
                  dtype=jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else None)
        call = dict(train=train, decay=decay, mask=mask)
        chunk = self.edge_chunk

        idx1 = knn_indices(eta_phi_distance(x, cfg.padding_penalty), cfg.k)
        a1, g1 = GAPLayer(cfg.gap1_width, edge_per_point=self.edge_per_point, edge_chunk=chunk,
                          name="gap1", **kw)(x, idx1, **call)
        net01 = ConvBN(cfg.conv1_widths[0], name="gapnet01", **kw)(jnp.concatenate([x, a1], -1), **call)
        net02 = ConvBN(cfg.conv1_widths[1], name="gapnet02", **kw)(net01, **call)

        idx2 = knn_indices(pairwise_sq_dist(net02), cfg.k)
        a2, g2 = GAPLayer(cfg.gap2_width, edge_per_point=self.edge_per_point, edge_chunk=chunk,
                          name="gap2", **kw)(net02, idx2, **call)
        net11 = ConvBN(cfg.conv2_widths[0], name="gapnet11", **kw)(jnp.concatenate([x, a2], -1), **call)
        net12 = ConvBN(cfg.conv2_widths[1], name="gapnet12", **kw)(net11, **call)

        parts = [net01, net02, net11, net12, g1, g2]
        if cfg.num_global:
            tiled = jnp.broadcast_to(global_features[:, None, :], x.shape[:2] + global_features.shape[-1:])
            parts.insert(4, ConvBN(cfg.global_width, name="global_expand", **kw)(tiled, **call))
        agg = ConvBN(cfg.latent_dim, name="agg", **kw)(jnp.concatenate(parts, -1), **call)
        z = pool(agg, cfg.pooling, mask)
        if cfg.latent_norm:
            # epsilon far under the latent's variance (~1e-2): with 1e-3 shrinking would still pay
            z = BatchNorm(1e-6, self.replica_sum, affine=False, name="latent_bn")(z, train=train, decay=decay)

        if cfg.variant == "anomaly":  # per-particle head on [tile(z), gapnet01, gapnet11]
            h = jnp.concatenate([jnp.broadcast_to(z[:, None, :], agg.shape), net01, net11], -1)
            pcall = call
        else:
            h, pcall = z, dict(train=train, decay=decay, mask=None)
        h = ConvBN(cfg.head_widths[0], name="fc1", **kw)(h, **pcall)
        h = ConvBN(cfg.head_widths[1], name="fc2", **kw)(h, **pcall)
        logits = nn.Dense(cfg.num_targets, kernel_init=glorot, name="fc3")(h)

        mu = self.param("mu", nn.initializers.zeros, (cfg.num_clusters, cfg.latent_dim))
        return {"z": z, "logits": logits, "dist": centroid_distances(z, mu)}


def pool(x: Array, how: str, mask: Array | None) -> Array:
    """Mean (padding included, as the original, unless masked) or max over points."""
    if how == "max":
        return jnp.max(x if mask is None else jnp.where(mask[..., None], x, -jnp.inf), axis=1)
    if mask is None:
        return jnp.mean(x, axis=1)
    w = mask[..., None].astype(x.dtype)
    return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


def centroid_distances(z: Array, mu: Array) -> Array:
    """Squared Euclidean distance of each embedding to each centroid: [B,D],[K,D] -> [B,K]."""
    return jnp.sum(jnp.square(z[:, None, :] - mu[None, :, :]), axis=-1)


def init_variables(cfg: ModelConfig, seed: int | jax.Array) -> dict:
    """Parameters and BN statistics from one seed (Glorot kernels, zero biases, zero moving stats).

    Jitted: run op by op, the initialiser compiled some 200 small kernels, 8-10 s of every process start
    on a CPU; compiled whole it takes under 2 s and gives the same bits."""
    key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
    x = jnp.zeros((2, cfg.num_points, cfg.num_features), jnp.float32)
    g = jnp.zeros((2, cfg.num_global), jnp.float32) if cfg.num_global else None
    return _compiled_init(cfg)(key, x, train=True, global_features=g)


@functools.lru_cache(maxsize=4)
def _compiled_init(cfg: ModelConfig):
    """One compiled initialiser per model: a run makes states several times (pre-training candidates,
    resume templates), each a recompilation with a fresh jit."""
    return jax.jit(UCluster(cfg).init, static_argnames="train")


def count_params(params) -> int:
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
