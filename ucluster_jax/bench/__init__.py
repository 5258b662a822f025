"""`ucluster bench`: throughput of training, evaluation, the data path and data parallelism.

Method (docs/BENCHMARKS.md): every figure is a median over `--repeats` timed repeats after a compile
call and `--warmup` untimed calls; the device is synchronised only at the end of a repeat (never
inside the step), inputs are already on the device and the state buffers are donated. Figures:

- train / eval: jets/s of the jitted training step (one Python call per step, as `ucluster train`
  runs it) and of the step as a compiled loop (`lax.scan` over batches already on the device), and
  of the evaluation forward pass, at several batch sizes;
- data: parquet -> numpy -> device alone (the reader + prefetch thread `ucluster train` uses);
- e2e: the training loop's own `run_epoch` on a toy parquet set (the number `ucluster train` logs);
- flops: XLA's cost analysis of the compiled step and an analytic count of the model's matmuls,
  against the machine's peak (given, or a measured matmul rate);
- memory: XLA's buffer assignment of the compiled step, the process peak RSS, device peak bytes;
- mpi: weak scaling over 1..N ranks under mpirun (one thread per rank on CPU), the gradient
  allreduce alone and one small (BatchNorm-moment) allreduce, and a step-time model
  t(n) = t_compute + n_small * 2 log2(n) a + 2 (n-1)/n * S / bw checked against the measured points
  and projected to 8-256 GPUs;
- local: weak scaling over 1..D local devices (pmap engine);
- --compare: one global batch through every parallel path the product has, side by side.

Workers (`python -m ucluster_jax.bench --worker ...`) run the parallel measurements in child
processes, so each gets its own thread settings, device count and MPI world.

Modules: measure (in-process figures), workers (child processes, --compare), report (scaling
model, table, figure), cli (arguments and the run).
"""
from ucluster_jax.bench.cli import add_args, run
from ucluster_jax.bench.measure import model_flops_per_jet, synthetic_jets

__all__ = ["add_args", "model_flops_per_jet", "run", "synthetic_jets"]
