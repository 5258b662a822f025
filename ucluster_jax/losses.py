"""Focal loss on the auxiliary target and the Deep k-Means clustering loss (SPEC section 3)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def focal_loss(logits: Array, target: Array, gamma: float = 4.0, alpha: float = 10.0) -> Array:
    """alpha * (1 - p_y)^gamma * -log(p_y + 1e-9), averaged over every target (jets or particles)."""
    p = jax.nn.softmax(logits, axis=-1)
    p_y = jnp.take_along_axis(p, target[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.mean(alpha * (1.0 - p_y) ** gamma * -jnp.log(p_y + 1e-9))


def kmeans_loss(dist: Array, alpha: Array | float) -> Array:
    """Deep k-Means: mean_i sum_k softmax_k(-alpha d_ik) d_ik; gradients reach z, mu and the weights."""
    shifted = dist - jnp.min(dist, axis=-1, keepdims=True)
    w = jax.nn.softmax(-alpha * shifted, axis=-1)
    return jnp.mean(jnp.sum(w * dist, axis=-1))


def combined_loss(out: dict[str, Array], target: Array, *, alpha: Array | float, cluster_weight: Array | float,
                  gamma: float, focal_alpha: float) -> tuple[Array, dict[str, Array]]:
    """L = L_focal + cluster_weight * L_km; cluster_weight is 0 before the clustering phase, beta after."""
    l_focal = focal_loss(out["logits"], target, gamma, focal_alpha)
    l_km = kmeans_loss(out["dist"], alpha)
    return l_focal + cluster_weight * l_km, {"focal": l_focal, "kmeans": l_km}
