"""The graph attention pooling (GAP) layer of ABCNet, as in the original `attn_feature`."""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from ucluster_jax.model.batchnorm import (
    BatchNorm, ReplicaSum, bn_variables, dense_bn_relu, moments, sum_and_count, update_moving_moments,
)
from ucluster_jax.model.dense import Dense, dot, glorot, matmul
from ucluster_jax.model.knn import adjacency, gather_neighbours, scatter_neighbours

Array = jax.Array


class ConvBN(nn.Module):
    """The original's "1x1 conv": Dense on the last axis, BatchNorm, ReLU.

    Training without a mask runs `dense_bn_relu` (same function, a hand-written backward pass).
    """

    features: int
    use_bias: bool = True
    bn_epsilon: float = 1e-3
    replica_sum: ReplicaSum | None = None
    dtype: Any = None  # the matmul's compute dtype (model.compute_dtype)

    @nn.compact
    def __call__(self, x: Array, *, train: bool, decay: Array | float, mask: Array | None = None) -> Array:
        if train and mask is None:
            w, bias = _DenseVars(self.features, self.use_bias, name="dense")(x.shape[-1])
            bn = _BNVars(name="bn")
            g, b, _, _ = bn(self.features)
            y, mean, var = dense_bn_relu(self.replica_sum, self.bn_epsilon, self.dtype, x, w, bias, g, b)
            bn(self.features, mean, var, decay)
            return y
        y = Dense(self.features, use_bias=self.use_bias, dtype=self.dtype, name="dense")(x)
        y = BatchNorm(self.bn_epsilon, self.replica_sum, name="bn")(y, train=train, decay=decay, mask=mask)
        return nn.relu(y)


class GAPLayer(nn.Module):
    """One-head graph attention: returns (attention features [B,N,F], graph features [B,N,F]).

    `edge_per_point` uses W_e(x_i - x_j) + b = W_e x_i - W_e x_j + b: the edge Dense runs once per
    point and the result is gathered, k times fewer FLOPs than the per-edge form (same function).

    `edge_chunk` > 0 (with `edge_per_point` and no padding mask) computes everything on the
    [B,N,k,F] edge tensor a few jets at a time (`edge_attention`): the same function and
    gradients, but each chunk's edge tensors stay in cache instead of streaming through memory
    several times (the backward pass recomputes them per chunk). 0: the plain layer.
    """

    features: int
    bn_epsilon: float = 1e-3
    replica_sum: ReplicaSum | None = None
    edge_per_point: bool = True
    edge_chunk: int = 0
    dtype: Any = None  # the matmuls' compute dtype (model.compute_dtype); the edge passes stay float32

    @nn.compact
    def __call__(self, x: Array, idx: Array, *, train: bool, decay: Array | float,
                 mask: Array | None = None) -> tuple[Array, Array]:
        bn_kw = dict(bn_epsilon=self.bn_epsilon, replica_sum=self.replica_sum, dtype=self.dtype)
        h = ConvBN(self.features, use_bias=False, name="newfea", **bn_kw)(x, train=train, decay=decay, mask=mask)

        w_e = self.param("edge_kernel", glorot, (x.shape[-1], self.features))
        b_e = self.param("edge_bias", nn.initializers.zeros, (self.features,))
        if self.edge_chunk > 0 and self.edge_per_point and mask is None:
            return self._chunked(matmul(x, w_e, self.dtype), b_e, h, idx, train=train, decay=decay)
        if self.edge_per_point:
            u = matmul(x, w_e, self.dtype)
            e = u[:, :, None, :] - gather_neighbours(u, idx) + b_e
        else:
            e = dot(x[:, :, None, :] - gather_neighbours(x, idx), w_e, self.dtype) + b_e
        edge_mask = None if mask is None else jnp.broadcast_to(mask[:, :, None], idx.shape)
        y = nn.relu(BatchNorm(self.bn_epsilon, self.replica_sum, name="edge_bn")(
            e, train=train, decay=decay, mask=edge_mask))

        s = ConvBN(1, name="self_att", **bn_kw)(h, train=train, decay=decay, mask=mask)  # [B,N,1]
        n = ConvBN(1, name="neib_att", **bn_kw)(y, train=train, decay=decay, mask=edge_mask)  # [B,N,k,1]
        coefs = jax.nn.softmax(nn.leaky_relu(s[:, :, None, :] + n, 0.2), axis=2)
        b_a = self.param("bias", nn.initializers.zeros, (self.features,))
        out = nn.relu(jnp.sum(coefs * y, axis=2) + b_a)
        return out, jnp.max(y, axis=2)

    def _chunked(self, u: Array, b_e: Array, h: Array, idx: Array, *, train: bool, decay) -> tuple[Array, Array]:
        F = self.features
        bn_kw = dict(bn_epsilon=self.bn_epsilon, replica_sum=self.replica_sum, dtype=self.dtype)
        edge_bn = _BNVars(name="edge_bn")
        g1, b1, rm1, rv1 = edge_bn(F)
        s = ConvBN(1, name="self_att", **bn_kw)(h, train=train, decay=decay)  # [B,N,1]
        neib = _ConvBNVars(name="neib_att")
        w_n, b_n, g2, b2, rm2, rv2 = neib(F)
        b_a = self.param("bias", nn.initializers.zeros, (F,))
        fixed = None if train else (rm1, rv1, rm2, rv2)
        out, gmax, stats = edge_attention(u, idx, s, b_e, g1, b1, w_n, b_n, g2, b2, b_a, stats=fixed,
                                          reduce=self.replica_sum, eps=self.bn_epsilon,
                                          chunk=self.edge_chunk)
        if train:
            m1, v1, m2, v2 = stats
            edge_bn(F, m1, v1, decay)
            neib(F, m2, v2, decay)
        return out, gmax


class _BNVars(nn.Module):
    """A BatchNorm's variables (the same names as `BatchNorm`), for code that applies it itself.

    Returns (scale, bias, moving mean, moving variance); given batch moments, updates the moving
    averages as `BatchNorm` does.
    """

    @nn.compact
    def __call__(self, c: int, mean: Array | None = None, var: Array | None = None, decay=None):
        scale, bias, ra_mean, ra_var = bn_variables(self, c)
        if mean is not None:
            update_moving_moments(self, ra_mean, ra_var, mean, var, decay)
        return scale, bias, ra_mean.value, ra_var.value


class _DenseVars(nn.Module):
    """`Dense`'s variables (kernel first, as it creates them: same initial values); no bias: zeros."""

    features: int = 1
    use_bias: bool = True

    @nn.compact
    def __call__(self, c: int):
        kernel = self.param("kernel", glorot, (c, self.features))
        if not self.use_bias:
            return kernel, jnp.zeros((self.features,), kernel.dtype)
        return kernel, self.param("bias", nn.initializers.zeros, (self.features,))


class _ConvBNVars(nn.Module):
    """ConvBN(1)'s variables: dense kernel and bias, BatchNorm scale, bias and moving moments."""

    @nn.compact
    def __call__(self, c: int, mean: Array | None = None, var: Array | None = None, decay=None):
        w, b = _DenseVars(name="dense")(c)
        g, beta, rm, rv = _BNVars(name="bn")(1, mean, var, decay)
        return w, b, g, beta, rm, rv


def _chunk_size(batch: int, most: int) -> int:
    """The largest divisor of the batch not above `most` (chunks must tile the batch exactly)."""
    return max(d for d in range(1, min(batch, most) + 1) if batch % d == 0)


def edge_attention(u: Array, idx: Array, s: Array, b_e: Array, g1: Array, b1: Array, w_n: Array, b_n: Array,
                   g2: Array, b2: Array, b_a: Array, *, stats=None, reduce: ReplicaSum | None = None,
                   eps: float = 1e-3, chunk: int = 8):
    """The edge half of the GAP layer, `chunk` jets at a time; the same function as the plain layer.

    u = x W_e per point [B,N,F], idx [B,N,k], s the self score [B,N,1]. With e_ij = u_i - u_j + b_e:
    y = ReLU(BN(e)) (edge_bn: g1, b1), n = ReLU(BN(y w_n + b_n)) (neib_att: g2, b2),
    c = softmax_j LeakyReLU(s_i + n_ij), returns (ReLU(sum_j c_ij y_ij + b_a), max_j y_ij,
    (mean, var of e, mean, var of the neighbour score)). `stats` given: normalise with those
    (inference), else with the batch's moments, reduced over replicas by `reduce` as `BatchNorm`.

    No [B,N,k,F] tensor is ever stored: the edge BatchNorm's moments come from per-point sums and
    the adjacency matrix, and the passes over the edges (`_edge_passes`) run a chunk at a time.
    """
    red = reduce or (lambda v: v)
    B, N, F = u.shape
    k = idx.shape[-1]
    if stats is None:  # as BatchNorm: biased variance around the stop-gradient mean, replica sums
        # With A the adjacency and d_j the in-degree, sum_ij u_i - u_j = sum_i (k - d_i) u_i, and
        # sum_ij (a_i - v_j)^2 = sum_i k a_i^2 - 2 a_i (A v)_i + d_i v_i^2, for v = u less its
        # mean (fewer cancelling digits) and a_i = v_i + b_e - mean.
        adj = jax.lax.stop_gradient(adjacency(idx, u.dtype))
        deg = jnp.sum(adj, axis=1)[..., None]
        # the count: B N per point, k each (see `sum_and_count`)
        count, m1 = sum_and_count(red, (k - deg) * u, (0, 1))
        count, m1 = k * count, m1 / k + b_e
        v = u - jax.lax.stop_gradient(jnp.mean(u, (0, 1)))
        a = v + b_e - jax.lax.stop_gradient(m1)
        sq = k * jnp.square(a) - 2.0 * a * jnp.einsum("bij,bjf->bif", adj, v) + deg * jnp.square(v)
        v1 = red(jnp.sum(sq, (0, 1))) / count
    else:
        m1, v1 = stats[0], stats[1]
    # y_ij = ReLU(alpha (u_i - u_j) + beta): the edge BatchNorm folded into one scale and shift
    alpha = g1 * jax.lax.rsqrt(v1 + eps)
    beta = b1 + (b_e - m1) * alpha

    c = _chunk_size(B, chunk)
    if stats is None:
        att, gmax, (m2, v2) = _edge_passes(red, eps, c, u, idx, s, alpha, beta, w_n, b_n, g2, b2)
    else:
        m2, v2 = stats[2], stats[3]
        head = partial(_head, lambda nraw: (m2, v2), eps)
        att, gmax, _ = _forward(head, c, *_per_point(u, alpha, beta), idx, s, w_n, b_n, g2, b2)[0]
    return jax.nn.relu(att + b_a), gmax, (m1, v1, m2, v2)


def _batch_moments(red: ReplicaSum, nraw: Array) -> tuple[Array, Array]:
    return moments(red, nraw)[1:]


def _train_head(red: ReplicaSum, eps: float):
    """`_head` with the batch's moments (summed over replicas by `red`), as training runs it."""
    return partial(_head, partial(_batch_moments, red), eps)


def _head(moments, eps: float, nraw: Array, s: Array, g2: Array, b2: Array):
    """The neighbour scores' BatchNorm (moments from `moments(nraw)`) and the attention softmax."""
    m2, v2 = moments(nraw)
    n = jax.nn.relu((nraw - m2) * jax.lax.rsqrt(v2 + eps) * g2 + b2)
    return jax.nn.softmax(jax.nn.leaky_relu(s[:, :, None, :] + n, 0.2), axis=2), (m2, v2)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _edge_passes(red, eps, c, u, idx, s, alpha, beta, w_n, b_n, g2, b2):
    """(sum_j c_ij y_ij, max_j y_ij, head's moments) for y_ij = ReLU(alpha (u_i - u_j) + beta).

    Two passes over the edges, `c` jets at a time: neighbour scores and maxima, then (the scores'
    BatchNorm needs the whole batch) the attention sum. The backward pass is written out because
    autodiff's needs four passes and two scatters; this one needs two passes and one scatter,
    with the per-edge sums turned into per-point ones (d alpha = sum_i u_i (P - Q)_i below).
    The sums over a jet's F features or k edges run as small matrix products, which XLA's CPU
    backend ran 1.5-2.7x faster than the same sums in an elementwise loop (docs/BENCHMARKS.md).
    """
    head = _train_head(red, eps)
    return _forward(head, c, *_per_point(u, alpha, beta), idx, s, w_n, b_n, g2, b2)[0]


def _edge_passes_fwd(red, eps, c, u, idx, s, alpha, beta, w_n, b_n, g2, b2):
    # a and b are kept, so the backward pass recomputes exactly the forward's y from them
    a, b = _per_point(u, alpha, beta)
    head = _train_head(red, eps)
    out, (nraw, ties, coefs) = _forward(head, c, a, b, idx, s, w_n, b_n, g2, b2, with_ties=True)
    return out, (u, a, b, idx, s, alpha, w_n, g2, b2, nraw, out[1], ties, coefs)


def _forward(head, c, a, b, idx, s, w_n, b_n, g2, b2, with_ties=False):
    """((attention sum, max, head's moments), (scores, ties at the max or None, coefficients))."""
    B, N, F = a.shape
    split = partial(_chunks, c)

    def scores_and_max(args):
        ac, bc, ic = args
        y = _edge_y(ac, bc, ic)
        score = (y.reshape(-1, F) @ w_n).reshape(y.shape[:3] + (1,)) + b_n
        gmax = jnp.max(y, axis=2)
        if not with_ties:
            return score, gmax
        # how many edges share the maximum: jnp.max's gradient is split among them
        return score, gmax, jnp.sum((y == gmax[:, :, None, :]).astype(y.dtype), axis=2)

    passes = jax.lax.map(scores_and_max, (split(a), split(b), split(idx)))
    nraw, gmax = passes[0].reshape(B, N, -1, 1), passes[1].reshape(B, N, F)
    ties = passes[2].reshape(B, N, F) if with_ties else None
    coefs, moments = head(nraw, s, g2, b2)

    def attention(args):
        ac, bc, ic, cc = args
        return jnp.einsum("cnk,cnkf->cnf", cc[..., 0], _edge_y(ac, bc, ic))

    att = jax.lax.map(attention, (split(a), split(b), split(idx), split(coefs))).reshape(B, N, F)
    return (att, gmax, moments), (nraw, ties, coefs)


def _edge_passes_bwd(red, eps, c, res, cot):
    u, a, b, idx, s, alpha, w_n, g2, b2, nraw, gmax, ties, coefs = res
    head = _train_head(red, eps)
    d_att, d_gmax, d_moments = cot
    B, N, F = u.shape
    split = partial(_chunks, c)

    def d_coefs(args):  # d/dc_ij of sum_j c_ij y_ij
        ac, bc, ic, dac = args
        return jnp.einsum("cnkf,cnf->cnk", _edge_y(ac, bc, ic), dac)[..., None]

    dc = jax.lax.map(d_coefs, (split(a), split(b), split(idx), split(d_att))).reshape(coefs.shape)
    _, head_vjp = jax.vjp(head, nraw, s, g2, b2)
    d_nraw, d_s, d_g2, d_b2 = head_vjp((dc, d_moments))

    def d_edges(args):  # per chunk: P = sum_j dpre_ij, Q_j = sum over edges into j of dpre, d w_n
        ac, bc, ic, cc, dnc, dac, gmc, dgc = args
        pre = _edge_pre(ac, bc, ic)
        y = jax.nn.relu(pre)
        d_max = jnp.where(y == gmc[:, :, None, :], dgc[:, :, None, :], 0.0)  # dgc: shared among the ties
        dpre = jnp.where(pre > 0, cc * dac[:, :, None, :] + dnc * w_n[:, 0] + d_max, 0.0)
        return jnp.sum(dpre, axis=2), scatter_neighbours(dpre, ic), dnc.reshape(1, -1) @ y.reshape(-1, F)

    P, Q, dw = jax.lax.map(d_edges, (split(a), split(b), split(idx), split(coefs), split(d_nraw), split(d_att),
                                     split(gmax), split(d_gmax / ties)))
    P, Q = P.reshape(B, N, F), Q.reshape(B, N, F)
    du = alpha * (P - Q)
    d_alpha = jnp.sum(u * (P - Q), axis=(0, 1))
    d_beta = jnp.sum(P, axis=(0, 1))
    d_idx = np.zeros(idx.shape, jax.dtypes.float0)
    return (du, d_idx, d_s, d_alpha, d_beta, jnp.sum(dw, 0).reshape(F, 1), jnp.sum(d_nraw, axis=(0, 1, 2)),
            d_g2, d_b2)


_edge_passes.defvjp(_edge_passes_fwd, _edge_passes_bwd)


def _per_point(u: Array, alpha: Array, beta: Array) -> tuple[Array, Array]:
    """(a, b) with a_i - b_j = alpha (u_i - u_j) + beta: one subtraction per edge element instead of three."""
    return alpha * u + beta, alpha * u


def _chunks(c: int, a: Array) -> Array:
    """[B, ...] -> [B/c, c, ...]: the leading axis `lax.map` runs over."""
    return a.reshape((a.shape[0] // c, c) + a.shape[1:])


def _edge_pre(ac: Array, bc: Array, ic: Array) -> Array:
    """alpha (u_i - u_j) + beta for the chunk's edges, as a_i - b_j."""
    return ac[:, :, None, :] - gather_neighbours(bc, ic)


def _edge_y(ac: Array, bc: Array, ic: Array) -> Array:
    return jax.nn.relu(_edge_pre(ac, bc, ic))
