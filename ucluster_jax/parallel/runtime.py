"""One object that hides how the global batch is split: one device, local devices (pmap), MPI ranks
(mpi4jax), or both at once. The training loop talks only to this.

`setup` maps the user-facing engine name (--engine) once to an `Engine` class: how a run starts, its
compiled step, its per-step metrics. The `Runtime` does the placement and host-side reductions they share.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ucluster_jax.config import Config
from ucluster_jax.data.schema import CLASS_NAMES
from ucluster_jax.errors import UserError
from ucluster_jax.parallel import sliced
from ucluster_jax.parallel.mpi import MPIComm, launched_world, param_checksum, require_mpi4jax
from ucluster_jax.train.step import make_apply_fn, make_grads_fn, make_train_step, step_key

AXIS = "replica"


def _psum(v):
    return jax.lax.psum(v, AXIS)


def _pmean(v):
    return jax.lax.pmean(v, AXIS)


def bn_sum(cfg: Config, replica_sum: Callable) -> Callable | None:
    """The BatchNorm moments' reduction over replicas, or None (per-replica moments) without parallel.sync_bn."""
    return replica_sum if cfg.parallel.sync_bn else None


def first_replica(tree: Any) -> Any:
    """The first local device's copy of a replicated (leading device axis) pytree."""
    return jax.tree_util.tree_map(lambda a: a.addressable_shards[0].data[0], tree)


class Engine:
    """One way of splitting the global batch. Subclasses set `name` (the CLI's) and `replicated`, and
    implement `start` (devices, rank, world) and `make_step`."""

    name: ClassVar[str]
    replicated: ClassVar[bool] = False  # the state carries a leading device axis (pmap)

    def start(self, num_devices: int | None) -> Runtime:
        raise NotImplementedError

    def make_step(self, rt: Runtime, cfg: Config, *, num_classes: int, with_grads: bool) -> Callable:
        raise NotImplementedError

    def step_metrics(self, metrics: dict) -> dict:
        return metrics


class Single(Engine):
    """One device, one process."""

    name = "single"

    def start(self, num_devices: int | None) -> Runtime:
        return Runtime(self, devices=local_devices(num_devices)[:1])

    def make_step(self, rt: Runtime, cfg: Config, *, num_classes: int, with_grads: bool) -> Callable:
        return jax.jit(make_train_step(cfg, num_classes=num_classes, with_grads=with_grads), donate_argnums=0)


class Mpi(Engine):
    """One device per rank; BN moments and the flattened gradients allreduced with mpi4jax inside the
    jitted step, so the run is the single-process run on the global batch."""

    name = "mpi"

    def __init__(self, comm: Any = None) -> None:
        self.group = comm  # an mpi4py communicator to train over (`ucluster tune`'s groups); None: all ranks

    def start(self, num_devices: int | None) -> Runtime:
        require_mpi4jax()  # before any work: the step allreduces with it
        devices = local_devices(num_devices)[:1]
        comm = MPIComm(self.group)
        return Runtime(self, comm.rank, comm.size, devices, comm)

    def make_step(self, rt: Runtime, cfg: Config, *, num_classes: int, with_grads: bool) -> Callable:
        c = rt.comm
        return jax.jit(make_train_step(cfg, replica_sum=bn_sum(cfg, c.device_sum), grad_mean=c.tree_mean,
                                       world=rt.replicas,
                                       num_classes=num_classes, with_grads=with_grads), donate_argnums=0)


class Local(Engine):
    """pmap over this host's devices; BN moments and gradients psum'd/pmean'd over the devices."""

    name = "local"
    replicated = True

    def start(self, num_devices: int | None) -> Runtime:
        return Runtime(self, devices=local_devices(num_devices))

    def make_step(self, rt: Runtime, cfg: Config, *, num_classes: int, with_grads: bool) -> Callable:
        step = make_train_step(cfg, replica_sum=bn_sum(cfg, _psum), grad_mean=_pmean, world=rt.replicas,
                               num_classes=num_classes, with_grads=with_grads)
        # the chosen local devices, or (across processes) all of them, pmap's default
        return jax.pmap(step, axis_name=AXIS, donate_argnums=0, devices=rt.devices if rt.world == 1 else None)

    def step_metrics(self, metrics: dict) -> dict:
        """Summed over local devices; the gradient (`with_grads`), the same on every device, from the first."""
        out = metrics_sum({k: v for k, v in metrics.items() if k != "grads"})
        if "grads" in metrics:
            out["grads"] = first_replica(metrics["grads"])
        return out


class JaxDist(Local):
    """The engine for comparison without mpi4jax: under mpirun, the `local` program with an axis over every
    device of every process (jax.distributed), XLA's collectives (gloo on CPU, NCCL on GPU) in the step;
    MPI serves only the host-side bookkeeping (k-means gather, metric sums, checksums)."""

    name = "jaxdist"

    def start(self, num_devices: int | None) -> Runtime:
        return start_distributed(self, num_devices)


class Hybrid(Engine):
    """Several devices per rank under mpirun. mpi4jax cannot run inside a multi-device computation, so
    gradients are summed over this host's devices, then allreduced across ranks by mpi4jax in a
    single-device jit that also updates; the parameters are replicated back. The BN moments, reduced
    inside the forward pass, reach every process through jax.distributed. Metrics come back summed."""

    name = "hybrid"
    replicated = True

    def start(self, num_devices: int | None) -> Runtime:
        require_mpi4jax()  # before any work: the step allreduces with it
        return start_distributed(self, num_devices)

    def make_step(self, rt: Runtime, cfg: Config, *, num_classes: int, with_grads: bool) -> Callable:
        grads_fn = make_grads_fn(cfg, replica_sum=bn_sum(cfg, _psum), num_classes=num_classes)
        apply_fn = make_apply_fn(cfg, world=rt.replicas, with_grads=with_grads)
        c, dev0, R = rt.comm, rt.devices[0], rt.replicas

        def local(state, batch):
            grads, stats, metrics = grads_fn(state, batch)
            return ravel_pytree(grads)[0], stats, metrics

        local_p = jax.pmap(local, axis_name=AXIS)
        unravel = _unravel(cfg)

        @partial(jax.jit, static_argnums=4)
        def across(state, flat_grads, stats, metrics, local_batch):
            total = c.device_sum(jnp.sum(flat_grads, axis=0))  # sum over devices, then over ranks
            return apply_fn(state, unravel(total / R), stats, metrics_sum(metrics), local_batch)

        def step(state, batch):
            flat, stats, metrics = local_p(state, batch)
            on0 = lambda a: jnp.stack([jax.device_put(sh.data[0], dev0) for sh in a.addressable_shards])  # noqa: E731
            new_state, m = across(first_replica(state), on0(flat), first_replica(stats),
                                  jax.tree_util.tree_map(on0, metrics), batch["x"].shape[1])
            return rt.put_state(new_state), m

        return step


def _unravel(cfg: Config) -> Callable:
    """Flat vector -> parameter pytree, from the parameter shapes alone (no initialisation)."""
    from ucluster_jax.model.networks import init_variables

    shapes = jax.eval_shape(lambda: init_variables(cfg.model, 0)["params"])
    return ravel_pytree(jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), shapes))[1]


ENGINE_CLASSES: dict[str, type[Engine]] = {e.name: e for e in (Single, Local, Mpi, Hybrid, JaxDist)}
ENGINES = ("auto", *ENGINE_CLASSES)  # the CLI's names


@dataclass
class Runtime:
    """A started engine: this process's rank, devices and communicator, and the placement of states and
    batches on them."""

    engine: Engine
    rank: int = 0
    world: int = 1  # processes
    devices: list = field(default_factory=lambda: jax.local_devices()[:1])
    comm: MPIComm | None = None
    stats_per_replica: bool = False  # each replica keeps its own BN moving averages (set by configure)
    slices: int = 0  # parallel.slices (set by configure): the state holds a copy of the BN statistics per slice
    _steps: dict = field(default_factory=dict, repr=False)  # make_step's, by what the step reads of the config

    @property
    def num_local(self) -> int:
        return len(self.devices)

    @property
    def replicas(self) -> int:
        """The parts a global batch is computed in: the slices where set, else processes x devices."""
        return self.slices or self.world * self.num_local

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def settle_each_step(self) -> bool:
        """Several CPU devices in one process: the loop waits for each step's results. Run ahead, a
        later computation needing a step's outputs could take a device's slot for computations in
        flight before the step's own launch there (launches go through a thread pool); the step never
        started on that device while the other waited in its allreduce, which XLA aborts after 40 s
        (2 runs in 40 under load; docs/RELIABILITY.md)."""
        return self.num_local > 1 and self.devices[0].platform == "cpu"

    @property
    def replicated(self) -> bool:
        """State carries a leading device axis (pmap engines)."""
        return self.engine.replicated

    def local_batch(self, global_batch: int) -> int:
        """Jets this process reads per step."""
        if global_batch % self.replicas:
            raise UserError(f"global batch {global_batch} is not divisible by {self.replicas} replicas "
                            f"({self.world} processes x {self.num_local} devices)")
        return global_batch // self.world

    def configure(self, cfg: Config) -> None:
        """Take the config's layout of the step (BN statistics per replica, fixed slices); before placing a
        state or making a step."""
        S = cfg.parallel.slices
        if S and (self.engine.name not in sliced.ENGINES or S % self.world):
            raise UserError(f"parallel.slices={S} needs engine {' or '.join(sliced.ENGINES)} and a number of processes "
                            f"dividing {S}; got engine {self.engine.name} with {self.world} process(es)")
        self.slices = S
        self.stats_per_replica = not S and not cfg.parallel.sync_bn and self.replicas > 1

    def make_step(self, cfg: Config, *, num_classes: int = len(CLASS_NAMES), with_grads: bool = False) -> Callable:
        """A compiled `step(state, batch) -> (state, metrics)` on this runtime's placement.

        `num_classes`: the dataset's classes (contingency width).
        `with_grads`: metrics["grads"] is the replica-averaged gradient the update applied."""
        self.configure(cfg)
        key = (step_key(cfg), num_classes, with_grads)
        if key not in self._steps:  # one compilation for the pre-training candidates and the run's joint phase
            if len(self._steps) >= 4:  # a tune worker trying learning rates: the oldest steps' programs go
                del self._steps[next(iter(self._steps))]
            make = partial(sliced.make_sliced_step, self) if self.slices else partial(self.engine.make_step, self)
            self._steps[key] = make(cfg, num_classes=num_classes, with_grads=with_grads)
        return self._steps[key]

    # ---- placement ----
    @property
    def _sharding(self) -> NamedSharding:
        """Leading axis split over the local devices (what pmap takes and returns)."""
        return NamedSharding(Mesh(np.array(self.devices), (AXIS,)), PartitionSpec(AXIS))

    def put_state(self, state: Any) -> Any:
        """A host state onto this runtime's devices, in the layout `configure` (or `make_step`) set."""
        if self.slices:
            state = sliced.stack_stats(state, self.slices)
        if self.replicated:
            D, sh = self.num_local, self._sharding
            return jax.tree_util.tree_map(lambda a: jax.device_put(jnp.broadcast_to(a, (D,) + jnp.shape(a)), sh), state)
        return jax.device_put(state, self.devices[0])

    def host_state(self, state: Any) -> Any:
        """A host copy of the replicas' (identical) state; with per-replica BatchNorm statistics, their
        moving averages averaged over every replica (a collective then: every rank calls it)."""
        host = jax.device_get(first_replica(state) if self.replicated else state)
        if self.slices:
            return sliced.mean_stats(host)
        if not self.stats_per_replica:
            return host
        copies = (lambda a: [sh.data[0] for sh in a.addressable_shards]) if self.replicated else (lambda a: [a])
        local = jax.tree_util.tree_map(lambda a: sum(np.asarray(c, np.float64) for c in copies(a)), state.batch_stats)
        flat, unravel = ravel_pytree(local)
        mean = unravel(self.sum(np.asarray(flat)) / self.replicas)
        return host.replace(batch_stats=jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), mean))

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Local batch -> devices: [B_local, ...] split over local devices as [D, B_local/D, ...]."""
        if not self.replicated:
            return jax.device_put(batch, self.devices[0])
        D, sh = self.num_local, self._sharding
        return {k: jax.device_put(v.reshape((D, -1) + v.shape[1:]), sh) for k, v in batch.items()}

    def step_metrics(self, metrics: dict) -> dict:
        """Per-step metrics as one record per process (still on device: no host round trip)."""
        return self.engine.step_metrics(metrics)

    # ---- host-side reductions (epoch ends, k-means, checks) ----
    def sum(self, x: np.ndarray) -> np.ndarray:
        return self.comm.host_sum(np.asarray(x)) if self.comm is not None else np.asarray(x)

    def bcast(self, obj: Any) -> Any:
        return self.comm.bcast(obj) if self.comm is not None else obj

    def gather_rows(self, x: np.ndarray) -> np.ndarray | None:
        return self.comm.gather_rows(x) if self.comm is not None else x

    def check_replicas(self, state: Any, where: str) -> None:
        """Stop with a clear error if the replicas' parameters differ (they must be bit-identical)."""
        mine = param_checksum(first_replica(state.params) if self.replicated else state.params)
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


def local_devices(num_devices: int | None) -> list:
    """The devices of a one-process engine: `num_devices` of them, or all GPUs, one CPU."""
    devices = jax.local_devices()
    if num_devices:
        if num_devices > len(devices):
            raise UserError(f"asked for {num_devices} devices, {len(devices)} visible "
                            "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        return devices[:num_devices]
    return devices[:1] if devices[0].platform == "cpu" else devices  # CPU "devices" share the same cores


def start_distributed(engine: Engine, num_devices: int | None) -> Runtime:
    """jax.distributed (initialised from MPI) over every local device of every rank."""
    # jax.distributed must come before anything touches the backend; it gives pmap's psum (the BN
    # moments) cross-process reach: gloo on CPU (this setting is ignored by GPU backends), NCCL on GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(cluster_detection_method="mpi4py")
    comm = MPIComm()
    devices = jax.local_devices()
    if num_devices and num_devices != len(devices):
        raise UserError(f"engine {engine.name} uses every local device ({len(devices)}), not {num_devices}")
    return Runtime(engine, comm.rank, comm.size, devices, comm)


def setup(engine: str = "auto", *, num_devices: int | None = None) -> Runtime:
    """Map the engine's name to its class, once, and start it.

    `auto`: under mpirun one device per rank (engine mpi, the recommended layout; several devices per
    rank is engine hybrid, asked for explicitly); otherwise local with several devices, else single.
    """
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "auto":
        engine = "mpi" if launched_world()[1] > 1 else "local" if len(local_devices(num_devices)) > 1 else "single"
    return ENGINE_CLASSES[engine]().start(num_devices)
