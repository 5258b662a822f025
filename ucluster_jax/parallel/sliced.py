"""Fixed slices (`parallel.slices: S`): a global batch is computed as the same S slices in every layout, so
a run's bits do not depend on how many processes share it.

Rounding alone parts two runs whose reductions differ in order (docs/DATA.md, "Fixed slices"), and XLA's
compiled programs differ with the batch shape. Here every layout runs the same two compiled programs on
the same inputs: `slice_out` (one slice's gradients, new BatchNorm statistics and metrics, normalised
with the slice's own moments and its own copy of the moving averages) and `combine` (the S slices'
outputs, gathered in slice order, averaged and applied). One process runs its S slices one after another;
R ranks (R dividing S) S/R each and allgather them. Every process holds all S copies of the BN statistics,
so the state is the same everywhere. The bits match given the same number of cores per process: on the CPU
they follow the cores a process sees (measured; on one machine: `mpirun --bind-to none`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ucluster_jax.config import Config
from ucluster_jax.train.step import make_apply_fn, make_grads_fn

ENGINES = ("single", "mpi")  # one device per process: a slice is a whole program run


def stack_stats(state: Any, slices: int) -> Any:
    """The host state (one set of BN moving averages) with a copy per slice: [S, ...] leaves."""
    return state.replace(batch_stats=jax.tree_util.tree_map(
        lambda a: np.broadcast_to(np.asarray(a), (slices,) + np.shape(a)).copy(), state.batch_stats))


def mean_stats(state: Any) -> Any:
    """The slices' moving averages averaged (float64, slice order): what checkpoints and scoring use."""
    return state.replace(batch_stats=jax.tree_util.tree_map(
        lambda a: np.mean(np.asarray(a, np.float64), axis=0).astype(np.float32), state.batch_stats))


def make_sliced_step(rt: Any, cfg: Config, *, num_classes: int, with_grads: bool) -> Callable:
    """`step(state, local_batch) -> (state, metrics)`. Rank 0's metrics sum all S slices, the other ranks'
    are zeros: the loop's sum over ranks then gives the one-process records to the bit."""
    S = cfg.parallel.slices
    mine = S // rt.world
    grads_fn = make_grads_fn(cfg, replica_sum=None, num_classes=num_classes)
    apply_fn = make_apply_fn(cfg, world=S, with_grads=with_grads)

    def outputs(state, v, batch):
        st = state.replace(batch_stats=jax.tree_util.tree_map(lambda a: a[v], state.batch_stats))
        grads, stats, m = grads_fn(st, batch)
        m = {k: m[k] for k in ("loss", "focal", "kmeans")} | {"contingency": m["contingency"].astype(jnp.float32)}
        return grads, stats, m

    @jax.jit
    def slice_out(state, v, batch):
        return ravel_pytree(outputs(state, v, batch))[0]

    unravel: list[Callable] = []  # built at the first call, from the output shapes

    def combine(state, gathered, weights, slice_batch):
        grads, stats, m = jax.vmap(unravel[0])(gathered)
        mean = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0) / S, grads)
        metrics = jax.tree_util.tree_map(lambda a: jnp.tensordot(weights, a, axes=1), m)
        metrics["contingency"] = jnp.round(metrics["contingency"]).astype(jnp.int32)
        return apply_fn(state, mean, stats, metrics, slice_batch)

    combine_jit = jax.jit(combine, static_argnums=3, donate_argnums=0)
    weights = np.full(S, 1.0 if rt.rank == 0 else 0.0, np.float32)

    def step(state, batch):
        n = batch["x"].shape[0] // mine
        parts = [{k: a[i * n:(i + 1) * n] for k, a in batch.items()} for i in range(mine)]
        if not unravel:
            shapes = jax.eval_shape(outputs, state, jnp.int32(0), parts[0])
            unravel.append(ravel_pytree(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes))[1])
        local = jnp.stack([slice_out(state, jnp.int32(rt.rank * mine + i), p) for i, p in enumerate(parts)])
        gathered = local if rt.comm is None else jnp.asarray(rt.comm.allgather_rows(np.asarray(local)))
        return combine_jit(state, gathered, weights, n)

    return step
