"""BatchNorm as the original TF1 `tf_util` did it, plus the cross-replica reduction data parallelism needs.

Differences from `flax.linen.BatchNorm` that matter for fidelity: the moving mean and variance start
at 0 (TF's ExponentialMovingAverage of the moments), the decay is an input that follows the
samples-seen schedule, and epsilon is 1e-3. Statistics are taken over every axis but channels;
`mask` optionally leaves padded points out (a named deviation). With data parallelism the sums are
reduced over replicas by `replica_sum`, so every replica normalises with the global-batch moments.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from ucluster_jax.model.dense import dot, matmul_grads

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
    affine: bool = True  # False: standardise only, no learned scale and bias (model.latent_norm)

    @nn.compact
    def __call__(self, x: Array, *, train: bool, decay: Array | float, mask: Array | None = None) -> Array:
        if self.affine:
            scale, bias, ra_mean, ra_var = bn_variables(self, x.shape[-1])
        else:
            (ra_mean, ra_var), scale, bias = moving_moments(self, x.shape[-1]), 1.0, 0.0
        if not train:
            mean, var = ra_mean.value, ra_var.value
        else:
            reduce = self.replica_sum or (lambda v: v)
            if mask is None:
                _, mean, var = moments(reduce, x)
            else:
                axes = tuple(range(x.ndim - 1))
                w = jnp.broadcast_to(mask.astype(x.dtype)[..., None], x.shape[:-1] + (1,))
                count = reduce(jnp.sum(w))
                mean = reduce(jnp.sum(x * w, axes)) / count
                var = reduce(jnp.sum(jnp.square(x - jax.lax.stop_gradient(mean)) * w, axes)) / count
            update_moving_moments(self, ra_mean, ra_var, mean, var, decay)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def bn_variables(module: nn.Module, c: int) -> tuple[Array, Array, nn.Variable, nn.Variable]:
    """A BatchNorm's variables in `module`'s scope: scale, bias, and the moving mean and variance
    (starting at 0, as TF's ExponentialMovingAverage). The layers that apply BatchNorm themselves
    (`dense_bn_relu`, the chunked edge passes) share these names, so checkpoints fit either path."""
    return (module.param("scale", nn.initializers.ones, (c,)), module.param("bias", nn.initializers.zeros, (c,)),
            *moving_moments(module, c))


def moving_moments(module: nn.Module, c: int) -> tuple[nn.Variable, nn.Variable]:
    """The moving mean and variance alone (a BatchNorm without scale and bias has only these)."""
    return (module.variable("batch_stats", "mean", jnp.zeros, (c,)),
            module.variable("batch_stats", "var", jnp.zeros, (c,)))


def update_moving_moments(module: nn.Module, ra_mean: nn.Variable, ra_var: nn.Variable, mean: Array, var: Array,
                          decay: Array | float) -> None:
    """The moving averages' update, the original's: decay * old + (1 - decay) * batch (no gradient)."""
    if module.is_initializing():
        return
    ra_mean.value = decay * ra_mean.value + (1.0 - decay) * jax.lax.stop_gradient(mean)
    ra_var.value = decay * ra_var.value + (1.0 - decay) * jax.lax.stop_gradient(var)


def moments(red: Callable[[Array], Array], x: Array) -> tuple[Array, Array, Array]:
    """(count, mean, variance) per channel over every axis but the last and every replica, as
    tf.nn.moments: the biased variance around a stop-gradient mean."""
    axes = tuple(range(x.ndim - 1))
    count, mean = sum_and_count(red, x, axes)
    return count, mean, red(jnp.sum(jnp.square(x - jax.lax.stop_gradient(mean)), axes)) / count


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def dense_bn_relu(replica_sum: ReplicaSum | None, eps: float, dtype: Any, x: Array, w: Array, bias: Array,
                  scale: Array, beta: Array) -> tuple[Array, Array, Array]:
    """ReLU(BatchNorm(x w + bias)) with the batch's moments, as `BatchNorm` computes them in training;
    returns (output, mean, variance).

    The same function as Dense, BatchNorm, ReLU, with the backward pass written out: autodiff
    stores four [B,N,C] intermediates and makes six passes over them; this stores the matmul's
    output only (the bias cancels in the normalisation) and makes two: one for the two sums
    BatchNorm's gradient needs, one for the gradient itself. `dtype`: the matmuls' compute dtype (`dot`).
    """
    return _dbr_fwd(replica_sum, eps, dtype, x, w, bias, scale, beta)[0]


def _dbr_fwd(replica_sum, eps, dtype, x, w, bias, scale, beta):
    red = replica_sum or (lambda v: v)
    zw = dot(x, w, dtype)
    count, mw, var = moments(red, zw)
    r = jax.lax.rsqrt(var + eps)
    y = jax.nn.relu(_pre(zw, mw, r, scale, beta))
    return (y, mw + bias, var), (x, w, zw, mw, r, scale, beta, count)


def _dbr_bwd(replica_sum, eps, dtype, res, cot):
    red = replica_sum or (lambda v: v)
    x, w, zw, mw, r, scale, beta, count = res
    dy, dmean, dvar = cot
    axes = tuple(range(zw.ndim - 1))
    xhat = (zw - mw) * r
    dpre = jnp.where(_pre(zw, mw, r, scale, beta) > 0, dy, 0.0)
    s1, s2 = jnp.sum(dpre, axes), jnp.sum(dpre * xhat, axes)
    # the moments are sums over every replica's batch: their cotangents are summed over replicas
    # too, here in one reduction (autodiff makes two)
    g1, g2, gm, gv = red(jnp.stack([s1, s2, dmean, dvar])) / count
    dz = (scale * r) * (dpre - g1 - xhat * g2) + gm + 2.0 * gv * (zw - mw)
    dx, dw = matmul_grads(x, w, dz, dtype)
    return dx, dw, jnp.sum(dz, axes), s2, s1


dense_bn_relu.defvjp(_dbr_fwd, _dbr_bwd)


def sum_and_count(red: Callable[[Array], Array], x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """(number of values per channel, their mean) over `axes` and every replica, in one reduction
    (the count rides along with the sums: one synchronisation point fewer per layer)."""
    n = jnp.asarray([x.size // x.shape[-1]], x.dtype)
    tot = red(jnp.concatenate([jnp.sum(x, axes), n]))
    return tot[-1], tot[:-1] / tot[-1]


def _pre(zw: Array, mw: Array, r: Array, scale: Array, beta: Array) -> Array:
    return (zw - mw) * (r * scale) + beta
