"""One object that hides how the global batch is split: one device, local devices (pmap), MPI ranks
(mpi4jax), or both at once. The training loop talks only to this.

Engines
- single: one device, one process.
- local: pmap over this host's devices; BN moments and gradients psum'd/pmean'd over the devices.
- mpi: one device per rank; BN moments and the flattened gradients allreduced with mpi4jax inside the
  jitted step, so the run is the single-process run on the global batch.
- hybrid: several devices per rank under mpirun. mpi4jax cannot run inside a multi-device computation,
  so the gradient path is two-stage: per-device gradients (flattened) summed over this host's devices,
  then one mpi4jax allreduce across ranks in a single-device jit, the update there, the parameters
  replicated back. The BN moments need a reduction inside the forward pass, over every device of every
  process: for those jax.distributed (initialised from MPI) gives pmap's psum its cross-process reach
  (gloo on CPU, NCCL on GPU). The result is again the single-process step on the global batch.
- jaxdist: the second engine for comparison, without mpi4jax in the step: under mpirun,
  jax.distributed (initialised from MPI) and pmap over every device of every process; BN moments
  and gradients both psum'd by XLA's own collectives (gloo on CPU, NCCL on GPU). MPI serves only
  the host-side bookkeeping (k-means gather, metric sums, checksums).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ucluster_jax.config import Config
from ucluster_jax.data.schema import CLASS_NAMES
from ucluster_jax.errors import UserError
from ucluster_jax.parallel.mpi import MPIComm, launched_world, param_checksum, require_mpi4jax
from ucluster_jax.train.step import make_apply_fn, make_grads_fn, make_train_step

ENGINES = ("auto", "single", "local", "mpi", "hybrid", "jaxdist")
AXIS = "replica"


@dataclass
class Runtime:
    engine: str
    rank: int = 0
    world: int = 1  # processes
    devices: list = field(default_factory=lambda: jax.local_devices()[:1])
    comm: MPIComm | None = None

    @property
    def num_local(self) -> int:
        return len(self.devices)

    @property
    def replicas(self) -> int:
        return self.world * self.num_local

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def replicated(self) -> bool:
        """State carries a leading device axis (pmap engines)."""
        return self.engine in ("local", "hybrid", "jaxdist")

    def local_batch(self, global_batch: int) -> int:
        """Jets this process reads per step."""
        if global_batch % self.replicas:
            raise UserError(f"global batch {global_batch} is not divisible by {self.replicas} replicas "
                            f"({self.world} processes x {self.num_local} devices)")
        return global_batch // self.world

    # ---- the step ----
    def make_step(self, cfg: Config, *, num_classes: int = len(CLASS_NAMES), with_grads: bool = False) -> Callable:
        """A compiled `step(state, batch) -> (state, metrics)` on this runtime's placement.

        `num_classes`: the dataset's classes (contingency width).
        `with_grads`: metrics["grads"] is the replica-averaged gradient the update applied."""
        R = self.replicas
        if self.engine == "single":
            return jax.jit(make_train_step(cfg, num_classes=num_classes, with_grads=with_grads), donate_argnums=0)
        if self.engine == "mpi":
            c = self.comm
            return jax.jit(make_train_step(cfg, replica_sum=c.device_sum, grad_mean=c.tree_mean, world=R,
                                           num_classes=num_classes, with_grads=with_grads), donate_argnums=0)
        psum = lambda v: jax.lax.psum(v, AXIS)  # noqa: E731
        if self.engine in ("local", "jaxdist"):  # jaxdist: the same program, the axis spans processes
            pmean = lambda g: jax.lax.pmean(g, AXIS)  # noqa: E731
            step = make_train_step(cfg, replica_sum=psum, grad_mean=pmean, world=R, num_classes=num_classes,
                                   with_grads=with_grads)
            return jax.pmap(step, axis_name=AXIS, donate_argnums=0, devices=self._pmap_devices)
        # hybrid: BN moments psum'd in-graph over every device of every process (jax.distributed);
        # per-device gradients summed over this host's devices, then ONE mpi4jax allreduce across ranks.
        grads_fn = make_grads_fn(cfg, replica_sum=psum, num_classes=num_classes)
        apply_fn = make_apply_fn(cfg, world=R, with_grads=with_grads)
        c, dev0 = self.comm, self.devices[0]

        def local(state, batch):
            grads, stats, metrics = grads_fn(state, batch)
            return ravel_pytree(grads)[0], stats, metrics

        local_p = jax.pmap(local, axis_name=AXIS)
        unravel = self._unravel(cfg)

        @partial(jax.jit, static_argnums=4)
        def across(state, flat_grads, stats, metrics, local_batch):
            total = c.device_sum(jnp.sum(flat_grads, axis=0))  # sum over devices, then over ranks
            return apply_fn(state, unravel(total / R), stats, metrics_sum(metrics), local_batch)

        def step(state, batch):
            flat, stats, metrics = local_p(state, batch)
            on0 = lambda a: jnp.stack([jax.device_put(sh.data[0], dev0) for sh in a.addressable_shards])  # noqa: E731
            first = lambda t: jax.tree_util.tree_map(lambda a: a.addressable_shards[0].data[0], t)  # noqa: E731
            new_state, m = across(first(state), on0(flat), first(stats),
                                  jax.tree_util.tree_map(on0, metrics), batch["x"].shape[1])
            return self.put_state(new_state), m

        return step

    @property
    def _pmap_devices(self) -> list | None:
        """pmap's devices: the chosen local ones, or (across processes) all of them, pmap's default."""
        return self.devices if self.world == 1 else None

    @staticmethod
    def _unravel(cfg: Config) -> Callable:
        """Flat vector -> parameter pytree, from the parameter shapes alone (no initialisation)."""
        from ucluster_jax.model.networks import init_variables

        shapes = jax.eval_shape(lambda: init_variables(cfg.model, 0)["params"])
        return ravel_pytree(jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), shapes))[1]

    # ---- placement ----
    @property
    def _sharding(self) -> NamedSharding:
        """Leading axis split over the local devices (what pmap takes and returns)."""
        return NamedSharding(Mesh(np.array(self.devices), (AXIS,)), PartitionSpec(AXIS))

    def put_state(self, state: Any) -> Any:
        if self.replicated:
            D, sh = self.num_local, self._sharding
            return jax.tree_util.tree_map(lambda a: jax.device_put(jnp.broadcast_to(a, (D,) + jnp.shape(a)), sh), state)
        return jax.device_put(state, self.devices[0])

    def host_state(self, state: Any) -> Any:
        """A host copy of the (identical) replica's state."""
        if self.replicated:
            state = jax.tree_util.tree_map(lambda a: a.addressable_shards[0].data[0], state)
        return jax.device_get(state)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Local batch -> devices: [B_local, ...] split over local devices as [D, B_local/D, ...]."""
        if not self.replicated:
            return jax.device_put(batch, self.devices[0])
        D, sh = self.num_local, self._sharding
        return {k: jax.device_put(v.reshape((D, -1) + v.shape[1:]), sh) for k, v in batch.items()}

    def step_metrics(self, metrics: dict) -> dict:
        """Per-step metrics summed over local devices (still on device: no host round trip); the
        gradient (`make_step(with_grads=True)`), the same on every device, from the first."""
        if not self.replicated or self.engine == "hybrid":
            return metrics
        out = metrics_sum({k: v for k, v in metrics.items() if k != "grads"})
        if "grads" in metrics:
            out["grads"] = jax.tree_util.tree_map(lambda a: a.addressable_shards[0].data[0], metrics["grads"])
        return out

    # ---- host-side reductions (epoch ends, k-means, checks) ----
    def sum(self, x: np.ndarray) -> np.ndarray:
        return self.comm.host_sum(np.asarray(x)) if self.comm is not None else np.asarray(x)

    def bcast(self, obj: Any) -> Any:
        return self.comm.bcast(obj) if self.comm is not None else obj

    def gather_rows(self, x: np.ndarray) -> np.ndarray | None:
        return self.comm.gather_rows(x) if self.comm is not None else x

    def check_replicas(self, state: Any, where: str) -> None:
        """Stop with a clear error if the replicas' parameters differ (they must be bit-identical)."""
        params = self.host_state(state).params
        mine = param_checksum(params)
        if self.replicated and self.num_local > 1:
            local = {param_checksum(jax.device_get(jax.tree_util.tree_map(lambda a: a.addressable_shards[i].data[0],
                                                                          state.params)))
                     for i in range(self.num_local)}
            if len(local) > 1:
                raise UserError(f"{where}: parameters differ between the local devices of rank {self.rank}")
        if self.comm is not None:
            sums = self.comm.allgather(mine)
            if len(set(sums)) > 1:
                bad = [r for r, s in enumerate(sums) if s != sums[0]]
                raise UserError(f"{where}: replicas diverged: parameters on rank(s) {bad} differ from rank 0")


def metrics_sum(metrics: dict) -> dict:
    """Sum over the leading device axis: losses become sums of per-device means."""
    return jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), metrics)


def setup(engine: str = "auto", *, num_devices: int | None = None) -> Runtime:
    """Pick the engine from the launch (mpirun or not) and the visible devices.

    Under mpirun, `auto` means one device per rank (engine mpi, the recommended layout); several
    devices per rank is engine hybrid, asked for explicitly.
    """
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    _, size = launched_world()
    if engine == "auto" and size > 1:
        engine = "mpi"
    if engine in ("mpi", "hybrid"):
        require_mpi4jax()  # before any work: the step allreduces with it
    if engine in ("hybrid", "jaxdist"):
        # jax.distributed must come before anything touches the backend; it gives pmap's psum (the BN
        # moments) cross-process reach: gloo on CPU (this setting is ignored by GPU backends), NCCL on GPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(cluster_detection_method="mpi4py")
        comm = MPIComm()
        devices = jax.local_devices()
        if num_devices and num_devices != len(devices):
            raise UserError(f"engine {engine} uses every local device ({len(devices)}), not {num_devices}")
        return Runtime(engine, comm.rank, comm.size, devices, comm)
    devices = jax.local_devices()
    if num_devices:
        if num_devices > len(devices):
            raise UserError(f"asked for {num_devices} devices, {len(devices)} visible "
                            "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        devices = devices[:num_devices]
    elif devices[0].platform == "cpu":
        devices = devices[:1]  # CPU "devices" share the same cores: one unless asked
    if engine == "mpi":
        comm = MPIComm()
        return Runtime(engine, comm.rank, comm.size, devices[:1], comm)
    if engine == "auto":
        engine = "local" if len(devices) > 1 else "single"
    if engine == "single":
        devices = devices[:1]
    return Runtime(engine, 0, 1, devices, None)
