"""k-nearest-neighbour graphs, computed as the original does (so imported models pick the same edges)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def pairwise_sq_dist(x: Array) -> Array:
    """|x_i|^2 - 2 x_i.x_j + |x_j|^2 over the last axis: [B,N,C] -> [B,N,N] (the original's expansion)."""
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    inner = jnp.einsum("bnc,bmc->bnm", x, x)
    return sq - 2.0 * inner + jnp.swapaxes(sq, 1, 2)


def eta_phi_distance(x: Array, padding_penalty: float = 1000.0) -> Array:
    """Distance in (etarel, phirel), with the original's 2pi phi correction and padding penalty.

    Padded points (feature 2, log ptrel, exactly 0) get `padding_penalty` added to their row and their
    column, so real points never pick them as neighbours.
    """
    pts = x[..., :2]
    d = pairwise_sq_dist(pts)
    dphi = jnp.abs(pts[..., None, :, 1] - pts[..., :, None, 1])
    d = d + jnp.where(dphi >= 2 * math.pi, 4 * math.pi**2 - 4 * math.pi * dphi, 0.0)
    shift = padding_penalty * (x[..., 2] == 0).astype(x.dtype)
    return d + shift[..., :, None] + shift[..., None, :]


def knn_indices(dist: Array, k: int) -> Array:
    """Indices of the k smallest distances per row (the point itself included): [B,N,N] -> [B,N,k]."""
    _, idx = jax.lax.top_k(-jax.lax.stop_gradient(dist), k)
    return idx


def gather_neighbours(x: Array, idx: Array) -> Array:
    """x [B,N,C], idx [B,N,k] -> [B,N,k,C].

    One row gather from the flattened [B*N, C] points (XLA's CPU backend copies whole rows; the
    batched per-jet gather `vmap(x_b[idx_b])` is about 4x slower there). Same values.
    """
    B, N, C = x.shape
    return jnp.take(x.reshape(B * N, C), _flat_rows(idx), axis=0).reshape(idx.shape + (C,))


def scatter_neighbours(d: Array, idx: Array) -> Array:
    """The transpose of `gather_neighbours`: d [B,N,k,C] -> [B,N,C], summed into the points picked."""
    B, N, _, C = d.shape
    return jnp.zeros((B * N, C), d.dtype).at[_flat_rows(idx)].add(d.reshape(-1, C)).reshape(B, N, C)


def _flat_rows(idx: Array) -> Array:
    """Neighbour indices [B,N,k] as rows of the flattened [B*N, C] points."""
    B, N, _ = idx.shape
    return (idx + (jnp.arange(B, dtype=idx.dtype) * N)[:, None, None]).reshape(-1)


def adjacency(idx: Array, dtype=jnp.float32) -> Array:
    """A[b,i,j] = how often j is among i's neighbours: idx [B,N,k] -> [B,N,N].

    Sums over edges become matrix products with it (sum_k x_j = A x, and its transpose A^T),
    which run near the machine's peak, where a gather's transpose is a slow scatter. Built by a
    scatter of ones into the flattened matrix (a fused compare-and-reduce was slower on CPU:
    docs/BENCHMARKS.md).
    """
    B, N, _ = idx.shape
    flat = idx + (jnp.arange(B * N, dtype=idx.dtype) * N).reshape(B, N, 1)
    return jnp.zeros((B * N * N,), dtype).at[flat.reshape(-1)].add(1).reshape(B, N, N)
