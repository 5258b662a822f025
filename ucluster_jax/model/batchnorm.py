"""BatchNorm as the original TF1 `tf_util` did it, plus the cross-replica reduction data parallelism needs.

Differences from `flax.linen.BatchNorm` that matter for fidelity: the moving mean and variance start
at 0 (TF's ExponentialMovingAverage of the moments), the decay is an input that follows the
samples-seen schedule, and epsilon is 1e-3. Statistics are taken over every axis but channels;
`mask` optionally leaves padded points out (a named deviation). With data parallelism the sums are
reduced over replicas by `replica_sum`, so every replica normalises with the global-batch moments.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

Array = jax.Array
ReplicaSum = Callable[[Array], Array]


def bn_decay(samples_seen: Array, init: float = 0.5, rate: float = 0.5, every: int = 500_000,
             clip: float = 0.99) -> Array:
    """min(clip, 1 - init * rate^floor(samples_seen / every)), the original's staircase schedule."""
    momentum = init * rate ** jnp.floor(samples_seen / every)
    return jnp.minimum(clip, 1.0 - momentum)


class BatchNorm(nn.Module):
    epsilon: float = 1e-3
    replica_sum: ReplicaSum | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool, decay: Array | float, mask: Array | None = None) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
        ra_var = self.variable("batch_stats", "var", jnp.zeros, (c,))
        if not train:
            mean, var = ra_mean.value, ra_var.value
        else:
            # As tf.nn.moments: biased variance around a stop-gradient mean.
            axes = tuple(range(x.ndim - 1))
            reduce = self.replica_sum or (lambda v: v)
            if mask is None:
                count = reduce(jnp.asarray(x.size // c, x.dtype))
                mean = reduce(jnp.sum(x, axes)) / count
                var = reduce(jnp.sum(jnp.square(x - jax.lax.stop_gradient(mean)), axes)) / count
            else:
                w = jnp.broadcast_to(mask.astype(x.dtype)[..., None], x.shape[:-1] + (1,))
                count = reduce(jnp.sum(w))
                mean = reduce(jnp.sum(x * w, axes)) / count
                var = reduce(jnp.sum(jnp.square(x - jax.lax.stop_gradient(mean)) * w, axes)) / count
            if not self.is_initializing():
                ra_mean.value = decay * ra_mean.value + (1.0 - decay) * jax.lax.stop_gradient(mean)
                ra_var.value = decay * ra_var.value + (1.0 - decay) * jax.lax.stop_gradient(var)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
