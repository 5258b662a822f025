"""Run a few training steps on a fixed global batch sequence with a chosen engine; save the result.

Launched by tests/test_distributed.py, alone (reference) or under `mpirun -np N`. Each process takes
its contiguous slice of every global batch, so every setup sees the same global batches.
Usage: python equivalence.py ENGINE OUT.npz [DEVICES] [KEY=VALUE ...]   (config overrides)
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ucluster_jax.config import load_config
from ucluster_jax.parallel.runtime import setup
from ucluster_jax.train.state import create_state

GLOBAL_BATCH, STEPS = 8, 3


def global_batches(cfg):
    rng = np.random.default_rng(123)
    for _ in range(STEPS):
        x = rng.normal(size=(GLOBAL_BATCH, cfg.model.num_points, cfg.model.num_features)).astype(np.float32)
        real = rng.integers(10, cfg.model.num_points, GLOBAL_BATCH)
        x[np.arange(cfg.model.num_points)[None, :] >= real[:, None]] = 0.0
        yield {"x": x, "target": rng.integers(0, cfg.model.num_targets, GLOBAL_BATCH).astype(np.int32),
               "label": rng.integers(0, 3, GLOBAL_BATCH).astype(np.int32)}


def main(engine: str, out: str, devices: int | None, overrides: list[str]) -> None:
    cfg = load_config(None, [f"train.batch_size={GLOBAL_BATCH}", "model.num_points=30", "model.k=5", *overrides])
    rt = setup(engine, num_devices=devices)
    host = create_state(cfg)
    # joint phase with non-trivial centroids, so the clustering loss and mu are exercised too
    mu = np.random.default_rng(7).normal(size=(3, 3)).astype(np.float32)
    host = host.replace(params={**host.params, "mu": jnp.asarray(mu)}, alpha=jnp.float32(4.0),
                        cluster_weight=jnp.float32(1.0))
    step = rt.make_step(cfg, with_grads=True)
    state = rt.put_state(host)
    rt.check_replicas(state, "step 0")
    lb = rt.local_batch(GLOBAL_BATCH)
    losses = []
    for gb in global_batches(cfg):
        local = {k: v[rt.rank * lb:(rt.rank + 1) * lb] for k, v in gb.items()}
        state, m = step(state, rt.put_batch(local))
        m = rt.step_metrics(m)
        if not losses:  # the gradient the first step applied (averaged over replicas), and its result
            grads0 = ravel_pytree(jax.device_get(m["grads"]))[0]
            host1 = rt.host_state(state)
            params1, stats1 = ravel_pytree(host1.params)[0], ravel_pytree(host1.batch_stats)[0]
        losses.append(float(rt.sum(np.asarray(jax.device_get(m["loss"]))[None])[0]) / rt.replicas)
    rt.check_replicas(state, "end")
    final = rt.host_state(state)
    flat_p, _ = ravel_pytree(final.params)
    flat_s, _ = ravel_pytree(final.batch_stats)
    if rt.is_root:
        np.savez(out, grads0=np.asarray(grads0), params1=np.asarray(params1), stats1=np.asarray(stats1),
                 params=np.asarray(flat_p),
                 stats=np.asarray(flat_s), losses=np.asarray(losses),
                 step=int(final.step), samples=int(final.samples_seen), replicas=rt.replicas, engine=rt.engine.name)


if __name__ == "__main__":
    rest = sys.argv[3:]
    devices = int(rest.pop(0)) if rest and rest[0].isdigit() else None
    main(sys.argv[1], sys.argv[2], devices, rest)
