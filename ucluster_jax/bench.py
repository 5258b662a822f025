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
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# Stated peak fp32 throughput of the machines this project is measured on (GFLOP/s). The CPU figure is
# the (2 cores of the development machine); the H200 is NVIDIA's dense FP32 (non-tensor) figure.
KNOWN_PEAK_GFLOPS = {"cpu": 157.0, "NVIDIA H200": 67_000.0}
# Baselines, jets/s at batch 512: the and the published figures, and the original graph
# timed side by side on the development CPU by scripts/tf1_speed.py (docs/BENCHMARKS.md).
BASELINES = {
    "tf_2.21_cpu_default_train": 100.0, "tf_2.21_cpu_onednn_train": 170.0,
    "tf_2.21_cpu_default_eval": 350.0, "tf_2.21_cpu_onednn_eval": 690.0,
    "jax_straightforward_cpu_train": 150.0, "tf_t4_gpu_train_published": 1570.0,
    "tf_2.21_cpu_onednn_train_side_by_side": 411.0, "tf_2.21_cpu_onednn_eval_side_by_side": 1319.0,
}
# (name, bus bandwidth GB/s, per-message latency us) for the scaling projection.
NETWORKS = [("NVLink (H200, 8/node)", 300.0, 5.0), ("InfiniBand NDR 400G", 45.0, 5.0),
            ("100 GbE", 11.0, 20.0), ("10 GbE", 1.1, 50.0)]
# One thread per rank/device on CPU. (The often-quoted "intra_op_parallelism_threads=1" is not an
# XLA flag: in XLA_FLAGS it silently stops the parsing of every flag after it.) Ranks are also bound
# to one core each by mpirun, and a local-device worker to D cores.
THREAD_ENV = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
              "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "TF_NUM_INTEROP_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1"}


# ------------------------------------------------------------------------------------------------
# helpers
def _ints(s: str) -> list[int]:
    return [int(v) for v in str(s).split(",") if v.strip()]


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _spread(xs: list[float]) -> float:
    """(max - min) / median: how noisy the repeats were."""
    return float((max(xs) - min(xs)) / statistics.median(xs)) if xs else 0.0


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def enable_cache(path: str | None) -> None:
    """The persistent XLA cache: repeated runs and the worker processes skip recompiling."""
    if not path:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def synthetic_jets(n: int, num_points: int, seed: int = 0) -> dict[str, Any]:
    """n toy W/Z/top jets (realistic padding and neighbours), as numpy arrays."""
    import numpy as np

    from ucluster_jax.data.toy import toy_jets

    d = toy_jets(min(n, 4096), seed, num_points)
    reps = -(-n // len(d["x"]))
    d = {k: np.concatenate([v] * reps)[:n] for k, v in d.items()}
    return {"x": d["x"], "target": d["target"].astype(np.int32), "label": d["label"].astype(np.int32)}


def timed(run: Callable[[], None], *, warmup: int, repeats: int) -> dict[str, Any]:
    """Compile call (timed separately), `warmup` untimed calls, then `repeats` timed calls."""
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        run()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t0)
    return {"first_call_s": compile_s, "times_s": ts, "median_s": _median(ts), "best_s": min(ts), "spread": _spread(ts)}


def _cost(compiled) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        ca = compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0] if ca else {}
        out["xla_flops"] = float(ca.get("flops", 0.0))
        out["xla_bytes_accessed"] = float(ca.get("bytes accessed", 0.0))
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass
    try:
        ma = compiled.memory_analysis()
        out["temp_bytes"] = float(ma.temp_size_in_bytes)
        out["argument_bytes"] = float(ma.argument_size_in_bytes)
        out["output_bytes"] = float(ma.output_size_in_bytes)
        out["alias_bytes"] = float(ma.alias_size_in_bytes)
    except Exception:  # noqa: BLE001
        pass
    return out


def device_peak_bytes() -> float | None:
    import jax

    try:
        s = jax.local_devices()[0].memory_stats()
        return float(s["peak_bytes_in_use"]) if s and "peak_bytes_in_use" in s else None
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------------------------------------
# FLOPs
def model_flops_per_jet(m, *, edge_per_point: bool = True) -> dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of the model's matmuls per jet, forward pass.

    Elementwise work (BN, ReLU, softmax, top-k) is not counted: the usual convention, and what the
    issue's 62 / 32 MFLOP figures count.
    """
    N, k = m.num_points, m.k

    def gap(c, f):
        edge = c * f * (1 if edge_per_point else k)
        return c * f + edge + f * 1 + f * 1 * k  # newfea, edge dense, self_att, neib_att

    per_point = (
        2 * N  # kNN-1 distance matmul on 2 coordinates (N x N x 2 per jet -> 2N per point)
        + gap(m.num_features, m.gap1_width)
        + (m.num_features + m.gap1_width) * m.conv1_widths[0] + m.conv1_widths[0] * m.conv1_widths[1]
        + N * m.conv1_widths[1]  # kNN-2 distance matmul
        + gap(m.conv1_widths[1], m.gap2_width)
        + (m.num_features + m.gap2_width) * m.conv2_widths[0] + m.conv2_widths[0] * m.conv2_widths[1]
        + (m.conv1_widths[0] + m.conv1_widths[1] + m.conv2_widths[0] + m.conv2_widths[1] + m.gap1_width
           + m.gap2_width) * m.latent_dim
    )
    head = m.latent_dim * m.head_widths[0] + m.head_widths[0] * m.head_widths[1] + m.head_widths[1] * m.num_targets
    fwd = 2.0 * (per_point * N + head)
    return {"forward": fwd, "train_estimate": 3.0 * fwd}


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """A measured fp32 matmul rate on the default device (an achievable-peak reference)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2.0 * n**3 / min(ts) / 1e9


# ------------------------------------------------------------------------------------------------
# in-process sections
def bench_train(cfg, batch_sizes: list[int], *, jets_per_repeat: int, warmup: int, repeats: int,
                scan: bool, log) -> list[dict]:
    import jax

    from ucluster_jax.train.state import create_state
    from ucluster_jax.train.step import make_multi_step, make_train_step

    out = []
    host = jax.device_get(create_state(cfg))
    pure = make_train_step(cfg)
    step = jax.jit(pure, donate_argnums=0)
    multi = jax.jit(make_multi_step(pure), donate_argnums=0)
    for B in batch_sizes:
        steps = max(2, -(-jets_per_repeat // B))
        data = synthetic_jets(B * steps, cfg.model.num_points)
        batch = jax.device_put({k: v[:B] for k, v in data.items()})
        box = {"state": jax.device_put(host)}
        t0 = time.perf_counter()
        compiled = step.lower(box["state"], batch).compile()
        rec = {"batch": B, "steps_per_repeat": steps, "compile_s": time.perf_counter() - t0, **_cost(compiled)}

        def run_steps():
            s = box["state"]
            for _ in range(steps):
                s, _m = step(s, batch)
            jax.block_until_ready(s)
            box["state"] = s

        t = timed(run_steps, warmup=warmup, repeats=repeats)
        rec.update(step_s=t["median_s"] / steps, jets_per_s=B * steps / t["median_s"], spread=t["spread"],
                   best_jets_per_s=B * steps / t["best_s"])
        if scan:
            stacked = jax.device_put({k: v.reshape((steps, B) + v.shape[1:]) for k, v in data.items()})

            def run_scan():
                s, _m = multi(box["state"], stacked)
                jax.block_until_ready(s)
                box["state"] = s

            ts = timed(run_scan, warmup=warmup, repeats=repeats)
            rec.update(scan_step_s=ts["median_s"] / steps, scan_jets_per_s=B * steps / ts["median_s"],
                       scan_spread=ts["spread"], scan_compile_s=ts["first_call_s"])
        log(f"  train B={B:5d}: {rec['jets_per_s']:9.1f} jets/s per-step call"
            + (f", {rec['scan_jets_per_s']:9.1f} jets/s compiled loop" if scan else "")
            + f"  (step {1e3 * rec['step_s']:.1f} ms, spread {rec['spread']:.0%}, best repeat "
            f"{rec['best_jets_per_s']:.1f} jets/s, compile {rec['compile_s']:.1f} s)")
        out.append(rec)
        del box
    return out


def bench_eval(cfg, batch_sizes: list[int], *, jets_per_repeat: int, warmup: int, repeats: int, log) -> list[dict]:
    import jax

    from ucluster_jax.train.state import create_state
    from ucluster_jax.train.step import make_eval_fn

    state = jax.device_put(create_state(cfg))
    fn = jax.jit(make_eval_fn(cfg))
    out = []
    for B in batch_sizes:
        calls = max(2, -(-jets_per_repeat // B))
        x = jax.device_put(synthetic_jets(B, cfg.model.num_points)["x"])
        t0 = time.perf_counter()
        compiled = fn.lower(state, x).compile()
        compile_s = time.perf_counter() - t0

        def run():
            r = None
            for _ in range(calls):
                r = fn(state, x)
            jax.block_until_ready(r)

        t = timed(run, warmup=warmup, repeats=repeats)
        rec = {"batch": B, "calls_per_repeat": calls, "jets_per_s": B * calls / t["median_s"],
               "best_jets_per_s": B * calls / t["best_s"], "call_s": t["median_s"] / calls, "spread": t["spread"],
               "compile_s": compile_s, **_cost(compiled)}
        log(f"  eval  B={B:5d}: {rec['jets_per_s']:9.1f} jets/s  (spread {rec['spread']:.0%}, best repeat "
            f"{rec['best_jets_per_s']:.1f})")
        out.append(rec)
    return out


def bench_data(path: Path, batch: int, *, repeats: int, log) -> dict:
    """parquet -> numpy (reader alone) and parquet -> device (reader + prefetch + device_put)."""
    import jax

    from ucluster_jax.config import TrainConfig
    from ucluster_jax.data.prefetch import prefetch
    from ucluster_jax.data.reader import ParquetDataset

    ds = ParquetDataset(path)
    dev = jax.local_devices()[0]
    steps = ds.steps_per_epoch(batch)
    n = steps * batch
    lanes = TrainConfig().data_lanes

    def read_only(epoch):
        for _b in ds.batches(batch, lanes=lanes, seed=0, epoch=epoch, shuffle=True):
            pass

    def to_device(epoch):
        last = None
        for b in prefetch(ds.batches(batch, lanes=lanes, seed=0, epoch=epoch, shuffle=True),
                          lambda b: jax.device_put(b, dev)):
            last = b
        jax.block_until_ready(last)

    res = {"batch": batch, "jets_per_pass": n}
    for name, fn in (("read", read_only), ("to_device", to_device)):
        ep = iter(range(10_000))
        t = timed(lambda: fn(next(ep)), warmup=0, repeats=repeats)
        res[f"{name}_jets_per_s"] = n / t["median_s"]
        res[f"{name}_spread"] = t["spread"]
    log(f"  data  B={batch}: read {res['read_jets_per_s']:,.0f} jets/s, to device {res['to_device_jets_per_s']:,.0f} "
        f"jets/s ({n} jets, shuffled)")
    return res


def bench_e2e(cfg, path: Path, *, repeats: int, log) -> dict:
    """`ucluster train`'s own epoch loop (reader, prefetch, step, metrics) on a toy parquet set."""
    import contextlib
    import io

    import jax

    from ucluster_jax.data.reader import ParquetDataset
    from ucluster_jax.parallel.runtime import setup
    from ucluster_jax.train.loop import run_epoch
    from ucluster_jax.train.state import create_state

    rt = setup("single")
    ds = ParquetDataset(path)
    B = cfg.train.batch_size
    state = rt.put_state(create_state(cfg))
    step = rt.make_step(cfg)
    rates = []
    for epoch in range(1 + repeats):  # epoch 0 compiles
        with contextlib.redirect_stderr(io.StringIO()):
            state, rec = run_epoch(rt, cfg, step, state, ds, epoch)
        if epoch:
            rates.append(rec["jets_per_s"])
    jax.block_until_ready(state)
    res = {"batch": B, "jets_per_epoch": rec["steps"] * B, "jets_per_s": _median(rates), "spread": _spread(rates),
           "epochs": rates}
    log(f"  e2e   B={B}: {res['jets_per_s']:9.1f} jets/s (ucluster train's run_epoch, {res['jets_per_epoch']} jets/epoch)")
    return res


# ------------------------------------------------------------------------------------------------
# workers (child processes)
def worker(args: argparse.Namespace) -> int:
    """One parallel measurement: engine, replicas, per-replica batch -> JSON (rank 0 writes)."""
    if args.bind and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if args.devices <= len(cores):
            os.sched_setaffinity(0, cores[:args.devices])
    enable_cache(args.cache_dir)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ucluster_jax.config import load_config
    from ucluster_jax.parallel.runtime import setup
    from ucluster_jax.train.state import create_state

    cfg = load_config(args.config, args.overrides)
    rt = setup(args.worker, num_devices=args.devices if args.worker in ("local", "hybrid", "jaxdist") else None)
    B = args.batch * rt.num_local  # jets this process reads per step
    data = synthetic_jets(B * rt.world, cfg.model.num_points, seed=0)
    mine = {k: v[rt.rank * B:(rt.rank + 1) * B] for k, v in data.items()}
    batch = rt.put_batch(mine)
    box = {"state": rt.put_state(create_state(cfg))}
    step = rt.make_step(cfg)
    steps = args.steps
    barrier = rt.comm.barrier if rt.comm else (lambda: None)

    def run():
        barrier()
        s = box["state"]
        for _ in range(steps):
            s, _m = step(s, batch)
        jax.block_until_ready(s)
        box["state"] = s
        barrier()

    t = timed(run, warmup=args.warmup, repeats=args.repeats)
    times = t["times_s"]
    if rt.comm:  # the slowest rank sets the pace
        times = [float(v) for v in rt.comm.host_sum(np.array(times)) / rt.world]
    med = _median(times)
    rec: dict[str, Any] = {
        "engine": rt.engine, "world": rt.world, "local_devices": rt.num_local, "replicas": rt.replicas,
        "batch_per_replica": args.batch, "global_batch": args.batch * rt.replicas, "steps_per_repeat": steps,
        "step_s": med / steps, "jets_per_s": args.batch * rt.replicas * steps / med, "spread": _spread(times),
        "compile_s": t["first_call_s"], "peak_rss_mb": peak_rss_mb(), "threads_env": os.environ.get("XLA_FLAGS", ""),
    }
    if rt.comm is not None and args.allreduce:
        from jax.flatten_util import ravel_pytree

        params = jax.device_put(create_state(cfg).params, rt.devices[0])
        flat, _ = ravel_pytree(params)
        rec["grad_bytes"] = int(flat.size * flat.dtype.itemsize)
        grad_ar = jax.jit(rt.comm.tree_mean)
        one_ar = jax.jit(lambda v: rt.comm.device_sum(v))
        small = jnp.ones((128,), jnp.float32)
        calls = 20

        def many(fn, x):
            def go():
                barrier()
                r = None
                for _ in range(calls):
                    r = fn(x)
                jax.block_until_ready(r)
                barrier()
            return go

        tg = timed(many(grad_ar, params), warmup=1, repeats=args.repeats)
        ts = timed(many(one_ar, small), warmup=1, repeats=args.repeats)
        rec["grad_allreduce_s"] = tg["median_s"] / calls
        rec["small_allreduce_s"] = ts["median_s"] / calls
        try:  # allreduces inside one training step (gradient + BatchNorm moments and their cotangents)
            hlo = step.lower(box["state"], batch).as_text()
            rec["allreduces_per_step"] = hlo.count("mpi_allreduce")
        except Exception:  # noqa: BLE001
            pass
    rec["device_peak_bytes"] = device_peak_bytes()
    if rt.rank == 0:
        Path(args.json_out).write_text(json.dumps(rec))
    return 0


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def run_worker(engine: str, *, batch: int, steps: int, repeats: int, warmup: int, ranks: int = 1, devices: int = 1,
               one_thread: bool, cfg_args: list[str], cache_dir: str | None, allreduce: bool = False,
               timeout: float = 900, log=print) -> dict | None:
    """Run a worker in a child process (under mpirun for mpi/hybrid) and return its record."""
    with tempfile.TemporaryDirectory(prefix="ucluster-bench-") as tmp:
        out = Path(tmp) / "rec.json"
        cmd = [sys.executable, "-m", "ucluster_jax.bench", "--worker", engine, "--batch", str(batch), "--steps",
               str(steps), "--repeats", str(repeats), "--warmup", str(warmup), "--devices", str(devices),
               "--json-out", str(out), *cfg_args]
        if cache_dir:
            cmd += ["--cache-dir", cache_dir]
        if allreduce:
            cmd += ["--allreduce"]
        if one_thread and engine in ("single", "local"):
            cmd += ["--bind"]
        env = dict(os.environ)
        env["PATH"] = f"{_venv_bin()}:{env.get('PATH', '')}"
        for k in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK", "PMIX_RANK"):
            env.pop(k, None)
        flags = env.get("XLA_FLAGS", "")
        flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
        if one_thread:
            env.update({k: v for k, v in THREAD_ENV.items() if k != "XLA_FLAGS"})
            flags = f"{flags} {THREAD_ENV['XLA_FLAGS']}"
        if devices > 1:
            flags = f"{flags} --xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = flags.strip()
        if engine in ("mpi", "hybrid", "jaxdist"):
            mpirun = shutil.which("mpirun", path=str(_venv_bin())) or shutil.which("mpirun")
            if not mpirun:
                log("  (no mpirun found: MPI measurements skipped)")
                return None
            ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            bind = ["--map-by", "core", "--bind-to", "core"] if one_thread and ranks * devices <= ncpu else \
                ["--bind-to", "none"]
            cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", *bind, "-np", str(ranks), *cmd]
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"  ({engine} x{ranks}/{devices}: timed out after {timeout:.0f} s)")
            return None
        if p.returncode != 0 or not out.exists():
            tail = (p.stderr or p.stdout).strip().splitlines()[-6:]
            log(f"  ({engine} ranks={ranks} devices={devices} failed, rc={p.returncode}: " + " | ".join(tail) + ")")
            return None
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------
# the scaling model
def allreduce_model(n: int, grad_bytes: float, n_small: int, latency_s: float, bw_Bps: float) -> float:
    """Seconds of communication per step with n replicas.

    The gradient: one ring allreduce, 2(n-1)/n * S / bw + 2(n-1) latencies. The BatchNorm moments
    (and their cotangents) of the mpi engine: n_small tiny allreduces, recursive doubling,
    2 log2(n) latencies each.
    """
    if n <= 1:
        return 0.0
    ring = 2.0 * (n - 1) / n * grad_bytes / bw_Bps + 2.0 * (n - 1) * latency_s
    return ring + n_small * 2.0 * math.log2(n) * latency_s


def fit_and_project(mpi: list[dict], per_gpu_jets_per_s: float, batch_per_gpu: int) -> dict:
    """Fit latency and bandwidth to the measured allreduces, check the measured steps, project GPUs."""
    base = next((r for r in mpi if r["world"] == 1), None)
    two = next((r for r in mpi if r["world"] >= 2 and "grad_allreduce_s" in r), None)
    if base is None or two is None:
        return {}
    n2 = two["world"]
    lat = two["small_allreduce_s"] / (2.0 * math.log2(n2))
    grad_bytes = float(two["grad_bytes"])
    # what the gradient allreduce costs beyond its latencies; when noise hides it, bound it at 10%
    ring_time = max(two["grad_allreduce_s"] - 2.0 * (n2 - 1) * lat, 0.1 * two["grad_allreduce_s"])
    bw = 2.0 * (n2 - 1) / n2 * grad_bytes / ring_time
    n_small = max(int(two.get("allreduces_per_step", 1)) - 1, 0)
    t_c = base["step_s"]
    check = []
    for r in mpi:
        pred = t_c + allreduce_model(r["world"], grad_bytes, n_small, lat, bw)
        check.append({"ranks": r["world"], "measured_step_s": r["step_s"], "model_step_s": pred,
                      "measured_efficiency": t_c / r["step_s"], "model_efficiency": t_c / pred})
    t_gpu = batch_per_gpu / per_gpu_jets_per_s
    proj = []
    for name, gbps, lat_us in NETWORKS:
        for n in (8, 16, 32, 64, 128, 256):
            t = t_gpu + allreduce_model(n, grad_bytes, n_small, lat_us * 1e-6, gbps * 1e9)
            proj.append({"network": name, "gpus": n, "step_s": t, "efficiency": t_gpu / t,
                         "jets_per_s": n * batch_per_gpu / t})
    return {"fit": {"latency_s": lat, "bandwidth_Bps": bw, "grad_bytes": grad_bytes,
                    "small_allreduces_per_step": n_small, "compute_step_s": t_c},
            "check": check,
            "projection": {"per_gpu_jets_per_s": per_gpu_jets_per_s, "batch_per_gpu": batch_per_gpu,
                           "compute_step_s": t_gpu, "points": proj}}


# ------------------------------------------------------------------------------------------------
# output
def plot(res: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0, 0]
    if res.get("train"):
        b = [r["batch"] for r in res["train"]]
        ax.plot(b, [r["jets_per_s"] for r in res["train"]], "o-", label="train step (per-step call)")
        if "scan_jets_per_s" in res["train"][0]:
            ax.plot(b, [r.get("scan_jets_per_s", float("nan")) for r in res["train"]], "s--",
                    label="train (compiled loop)")
    if res.get("eval"):
        ax.plot([r["batch"] for r in res["eval"]], [r["jets_per_s"] for r in res["eval"]], "^-", label="eval")
    if res.get("data"):
        ax.axhline(res["data"]["to_device_jets_per_s"], color="gray", ls=":", label="data path (parquet->device)")
    if res.get("e2e"):
        ax.plot([res["e2e"]["batch"]], [res["e2e"]["jets_per_s"]], "k*", ms=12, label="ucluster train run_epoch")
    if res.get("platform", {}).get("platform") == "cpu":
        for what, ls in (("train", "-."), ("eval", ":")):
            ax.axhline(BASELINES[f"tf_2.21_cpu_onednn_{what}_side_by_side"], color="red", ls=ls, lw=0.8,
                       label=f"TF 2.21 + oneDNN {what}, dev. CPU (tf1_speed.py)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("jets/s")
    ax.set_title("throughput")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    for key, label in (("mpi", "mpi ranks"), ("local", "local devices")):
        pts = res.get(key) or []
        if pts:
            n = [r["replicas"] for r in pts]
            ax.plot(n, [r["efficiency"] for r in pts], "o-", label=f"{label} (measured)")
    for c in (res.get("model") or {}).get("check", []):
        ax.plot([c["ranks"]], [c["model_efficiency"]], "kx")
    ax.set_ylim(0, 1.2)
    ax.set_xlabel("replicas (weak scaling)")
    ax.set_ylabel("efficiency")
    ax.set_title("scaling on this machine (x: model)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax = axes[1, 0]
    proj = (res.get("model") or {}).get("projection", {}).get("points", [])
    for name, *_ in NETWORKS:
        pts = [p for p in proj if p["network"] == name]
        if pts:
            ax.plot([p["gpus"] for p in pts], [p["efficiency"] for p in pts], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("projected efficiency")
    ax.set_title("step-time model, projected")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax = axes[1, 1]
    cmp_ = res.get("compare") or []
    if cmp_:
        names = [c["path"] + (" (skipped)" if c.get("skipped") else "") for c in cmp_]
        ax.barh(names[::-1], [c.get("jets_per_s") or 0 for c in cmp_][::-1])
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlabel("jets/s")
        ax.set_title(f"--compare (global batch {cmp_[0].get('global_batch')})")
    else:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v, spec=",.0f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v / scale, spec)


def print_table(res: dict, log) -> None:
    p = res["platform"]
    log("")
    log(f"ucluster bench: {p['device']} ({p['platform']}), jax {p['jax']}, load average {p.get('load_start')} -> "
        f"{p.get('load_end')} on {p['cpus']} CPUs")
    if res.get("train"):
        log(f"{'batch':>6} {'train jets/s':>13} {'best':>6} {'loop jets/s':>12} {'step ms':>9} {'spread':>7} "
            f"{'eval jets/s':>12} {'temp MB':>8}")
        ev = {r["batch"]: r for r in res.get("eval", [])}
        for r in res["train"]:
            e = ev.get(r["batch"], {})
            log(f"{r['batch']:>6} {_fmt(r['jets_per_s']):>13} {_fmt(r.get('best_jets_per_s')):>6} "
                f"{_fmt(r.get('scan_jets_per_s')):>12} "
                f"{1e3 * r['step_s']:>9.1f} {r['spread']:>7.0%} {_fmt(e.get('jets_per_s')):>12} "
                f"{_fmt(r.get('temp_bytes'), '.0f', 2**20):>8}")
        for b, e in ev.items():
            if b not in {r["batch"] for r in res["train"]}:
                log(f"{b:>6} {'':>13} {'':>6} {'':>12} {'':>9} {'':>7} {_fmt(e['jets_per_s']):>12}")
    if res.get("data"):
        d = res["data"]
        log(f"data path: parquet->numpy {d['read_jets_per_s']:,.0f} jets/s, ->device {d['to_device_jets_per_s']:,.0f} jets/s")
    if res.get("e2e"):
        log(f"ucluster train (run_epoch, batch {res['e2e']['batch']}): {res['e2e']['jets_per_s']:,.1f} jets/s")
    f = res.get("flops")
    if f:
        log(f"FLOPs/jet: model matmuls forward {f['model_forward_per_jet'] / 1e6:.1f} M (as written per edge "
            f"{f['model_forward_per_edge_per_jet'] / 1e6:.1f} M); XLA train step {_fmt(f.get('xla_train_per_jet'), '.1f', 1e6)} M, "
            f"eval {_fmt(f.get('xla_eval_per_jet'), '.1f', 1e6)} M")
        log(f"peak: {f['peak_gflops']:,.0f} GFLOP/s ({f['peak_source']}); measured matmul {f['matmul_gflops']:,.0f} GFLOP/s; "
            f"best train {f['train_jets_per_s']:,.0f} jets/s = {f['train_gflops']:,.1f} GFLOP/s = "
            f"{f['fraction_of_peak']:.1%} of peak (bound {f['bound_jets_per_s']:,.0f} jets/s)"
            + (f"; {f['fraction_of_stated_peak']:.1%} of the stated {f['stated_peak_gflops']:,.0f} GFLOP/s"
               if f.get("stated_peak_gflops") and f["stated_peak_gflops"] != f["peak_gflops"] else ""))
    m = res.get("memory")
    if m:
        log(f"memory: peak RSS {m['peak_rss_mb']:,.0f} MB; step at batch {m['batch']}: XLA temp {m['temp_mb']:,.0f} MB"
            + (f"; device peak {m['device_peak_mb']:,.0f} MB" if m.get("device_peak_mb") else ""))
    for key, label in (("mpi", "mpi ranks (mpirun, 1 thread/rank)"), ("local", "local devices (pmap)")):
        pts = res.get(key)
        if pts:
            log(f"{label}: " + ", ".join(f"{r['replicas']}: {r['jets_per_s']:,.0f} jets/s ({r['efficiency']:.0%})"
                                         for r in pts) + f"  [weak scaling, batch {pts[0]['batch_per_replica']}/replica]")
    mo = res.get("model")
    if mo:
        fit = mo["fit"]
        log(f"allreduce: gradient {fit['grad_bytes'] / 1e6:.2f} MB; fit latency {1e6 * fit['latency_s']:.1f} us, "
            f"bandwidth {fit['bandwidth_Bps'] / 1e9:.2f} GB/s; {fit['small_allreduces_per_step']} small allreduces/step")
        for c in mo["check"]:
            log(f"  model check {c['ranks']} ranks: measured {1e3 * c['measured_step_s']:.1f} ms "
                f"({c['measured_efficiency']:.0%}), model {1e3 * c['model_step_s']:.1f} ms ({c['model_efficiency']:.0%})")
        pr = mo["projection"]
        log(f"  projection at {pr['per_gpu_jets_per_s']:,.0f} jets/s per GPU, batch {pr['batch_per_gpu']}/GPU "
            f"(weak scaling) -> efficiency:")
        for name, *_ in NETWORKS:
            pts = [p for p in pr["points"] if p["network"] == name]
            log(f"    {name:24s} " + "  ".join(f"{p['gpus']}: {p['efficiency']:.0%}" for p in pts))
    if res.get("compare"):
        log(f"{'path':>26} {'replicas':>9} {'global batch':>13} {'jets/s':>9} {'step ms':>9} {'vs single':>10}")
        for c in res["compare"]:
            if c.get("skipped"):
                log(f"{c['path']:>26}  skipped: {c['skipped']}")
                continue
            log(f"{c['path']:>26} {c['replicas']:>9} {c['global_batch']:>13} {_fmt(c['jets_per_s']):>9} "
                f"{1e3 * c['step_s']:>9.1f} {c['speedup']:>9.2f}x")


# ------------------------------------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the original's model)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (model.*), e.g. --set model.k=5")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for bench.json and bench.png")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every section in ~1-2 min")
    p.add_argument("--compare", action="store_true",
                   help="one global batch through every parallel path (single, local devices, mpi, hybrid)")
    p.add_argument("--sections", default="train,eval,data,e2e,mpi,local",
                   help="comma list of train,eval,data,e2e,mpi,local (flops and memory come with train)")
    p.add_argument("--batch-sizes", help="training batch sizes (default 128,512; quick 32)")
    p.add_argument("--eval-batch-sizes", help="evaluation batch sizes (default 512,2048; quick 64)")
    p.add_argument("--jets-per-repeat", type=int, help="jets per timed repeat (default 1024; quick 64)")
    p.add_argument("--repeats", type=int, help="timed repeats; the median is reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the compile call")
    p.add_argument("--no-scan", action="store_true", help="skip the compiled-loop (lax.scan) training figure")
    p.add_argument("--ranks", help="MPI ranks to measure, e.g. 1,2 (default 1,2)")
    p.add_argument("--devices", help="local devices to measure, e.g. 1,2 (default 1,2)")
    p.add_argument("--replica-batch", type=int, help="per-replica batch for scaling (default 128; quick 16)")
    p.add_argument("--scaling-steps", type=int, help="steps per timed repeat in scaling runs (default 4)")
    p.add_argument("--threads-per-rank", default="auto", choices=("auto", "one", "all"),
                   help="scaling/compare workers: one thread per rank/device (auto: on CPU) or XLA's default")
    p.add_argument("--data", type=Path, help="parquet dataset for the data and e2e sections (default: a toy set)")
    p.add_argument("--toy-jets", type=int, help="jets in the generated toy set (default 4096; quick 512)")
    p.add_argument("--peak-gflops", type=float, help="machine fp32 peak (default: known figure or measured matmul)")
    p.add_argument("--project-jets-per-s", type=float,
                   help="per-GPU training jets/s for the 8-256 GPU projection (default: measured on a GPU, "
                        "else the published T4 figure, 1570)")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/ucluster-jax/xla"),
                   help="persistent XLA compilation cache ('' to disable)")


def _defaults(args) -> None:
    q = args.quick
    args.batch_sizes = _ints(args.batch_sizes or ("32" if q else "128,512"))
    args.eval_batch_sizes = _ints(args.eval_batch_sizes or ("64" if q else "512,2048"))
    args.jets_per_repeat = args.jets_per_repeat or (64 if q else 1024)
    args.repeats = args.repeats or (2 if q else 3)
    args.ranks = _ints(args.ranks or "1,2")
    args.devices = _ints(args.devices or "1,2")
    args.replica_batch = args.replica_batch or (16 if q else 128)
    args.scaling_steps = args.scaling_steps or (2 if q else 4)
    args.toy_jets = args.toy_jets or (512 if q else 4096)
    if q and not args.overrides:
        pass  # the real model even in --quick: only sizes shrink


def run(args: argparse.Namespace) -> int:
    _defaults(args)
    enable_cache(args.cache_dir)
    import jax

    from ucluster_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"train", "eval", "data", "e2e", "mpi", "local"}
    if unknown:
        from ucluster_jax.errors import UserError

        raise UserError(f"unknown section(s) {', '.join(sorted(unknown))}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    dev = jax.local_devices()[0]
    plat = dev.platform
    one_thread = args.threads_per_rank == "one" or (args.threads_per_rank == "auto" and plat == "cpu")
    cfg_args = ([] if not args.config else ["--config", str(args.config)]) + sum((["--set", o] for o in args.overrides), [])
    log = lambda s: print(s, flush=True)  # noqa: E731
    res: dict[str, Any] = {
        "platform": {"platform": plat, "device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__,
                     "python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node(),
                     "load_start": load_avg(), "time": time.strftime("%Y-%m-%d %H:%M:%S")},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")},
        "baselines_given": BASELINES,
    }
    t_start = time.perf_counter()
    log(f"ucluster bench on {res['platform']['device']} ({plat}); load average {res['platform']['load_start']}")

    if "train" in sections:
        log("training step:")
        res["train"] = bench_train(cfg, args.batch_sizes, jets_per_repeat=args.jets_per_repeat, warmup=args.warmup,
                                   repeats=args.repeats, scan=not args.no_scan, log=log)
    if "eval" in sections:
        log("evaluation:")
        res["eval"] = bench_eval(cfg, args.eval_batch_sizes, jets_per_repeat=args.jets_per_repeat * 2,
                                 warmup=args.warmup, repeats=args.repeats, log=log)
    tmp_data = None
    if sections & {"data", "e2e"}:
        data = args.data
        if data is None:
            from ucluster_jax.data.toy import write_toy

            tmp_data = Path(tempfile.mkdtemp(prefix="ucluster-bench-toy-"))
            data = tmp_data / "toy"
            write_toy(data, args.toy_jets, 0, cfg.model.num_points, row_group_size=256)
        try:
            if "data" in sections:
                log("data path:")
                res["data"] = bench_data(data, cfg.train.batch_size if not args.quick else args.batch_sizes[-1],
                                         repeats=args.repeats, log=log)
            if "e2e" in sections:
                log("ucluster train's epoch loop:")
                from ucluster_jax.config import config_from_dict

                d = cfg.to_dict()
                if args.quick:
                    d["train"]["batch_size"] = args.batch_sizes[-1]
                res["e2e"] = bench_e2e(config_from_dict(d, "bench"), data, repeats=2 if not args.quick else 1, log=log)
        finally:
            if tmp_data is not None:
                shutil.rmtree(tmp_data, ignore_errors=True)

    if res.get("train"):
        fl = model_flops_per_jet(cfg.model)
        best = max(res["train"], key=lambda r: max(r["jets_per_s"], r.get("scan_jets_per_s", 0)))
        best_rate = max(best["jets_per_s"], best.get("scan_jets_per_s", 0))
        mm = matmul_gflops()
        known = KNOWN_PEAK_GFLOPS.get("cpu" if plat == "cpu" else res["platform"]["device"])
        # a stated peak below what a matmul reaches here is not the peak: take the larger
        peak = args.peak_gflops or max(known or 0.0, mm)
        source = "--peak-gflops" if args.peak_gflops else (
            "stated figure for this machine class" if known and known >= mm else "measured matmul")
        per_jet_train = 3.0 * fl["forward"]
        res["flops"] = {
            "model_forward_per_jet": fl["forward"],
            "model_forward_per_edge_per_jet": model_flops_per_jet(cfg.model, edge_per_point=False)["forward"],
            "train_per_jet_estimate": per_jet_train,
            "xla_train_per_jet": best.get("xla_flops", 0) / best["batch"] or None,
            "xla_eval_per_jet": (res["eval"][0].get("xla_flops", 0) / res["eval"][0]["batch"]) if res.get("eval") else None,
            "peak_gflops": peak, "peak_source": source, "matmul_gflops": mm, "stated_peak_gflops": known,
            "fraction_of_stated_peak": (best_rate * per_jet_train / (known * 1e9)) if known else None,
            "train_jets_per_s": best_rate, "train_batch": best["batch"],
            "train_gflops": best_rate * per_jet_train / 1e9,
            "fraction_of_peak": best_rate * per_jet_train / (peak * 1e9),
            "bound_jets_per_s": peak * 1e9 / per_jet_train,
        }
        big = max(res["train"], key=lambda r: r["batch"])
        res["memory"] = {"batch": big["batch"], "temp_mb": big.get("temp_bytes", 0) / 2**20,
                         "argument_mb": big.get("argument_bytes", 0) / 2**20, "peak_rss_mb": peak_rss_mb(),
                         "device_peak_mb": (device_peak_bytes() or 0) / 2**20 or None}

    if "mpi" in sections:
        log(f"mpi ranks {args.ranks} (weak scaling, batch {args.replica_batch}/rank, "
            f"{'one thread' if one_thread else 'default threads'} per rank):")
        pts = []
        for n in args.ranks:
            r = run_worker("mpi", batch=args.replica_batch, steps=args.scaling_steps, repeats=args.repeats,
                           warmup=args.warmup, ranks=n, one_thread=one_thread, cfg_args=cfg_args,
                           cache_dir=args.cache_dir, allreduce=n > 1, log=log)
            if r:
                pts.append(r)
                log(f"  {n} rank(s): {r['jets_per_s']:,.1f} jets/s, step {1e3 * r['step_s']:.1f} ms"
                    + (f", grad allreduce {1e3 * r['grad_allreduce_s']:.2f} ms, small {1e6 * r['small_allreduce_s']:.0f} us"
                       f", {r.get('allreduces_per_step')} allreduces/step" if "grad_allreduce_s" in r else ""))
        for r in pts:
            base = next((b for b in pts if b["world"] == 1), None)
            r["efficiency"] = base["step_s"] / r["step_s"] if base else None
        res["mpi"] = pts
        if plat != "cpu" or "train" in res:
            per_gpu = args.project_jets_per_s or (
                max(max(r["jets_per_s"], r.get("scan_jets_per_s", 0)) for r in res["train"])
                if plat == "gpu" and res.get("train") else BASELINES["tf_t4_gpu_train_published"])
        else:
            per_gpu = args.project_jets_per_s or BASELINES["tf_t4_gpu_train_published"]
        res["model"] = fit_and_project(pts, per_gpu, cfg.train.batch_size)
    if "local" in sections:
        log(f"local devices {args.devices} (weak scaling, batch {args.replica_batch}/device):")
        pts = []
        for d in args.devices:
            r = run_worker("local" if d > 1 else "single", batch=args.replica_batch, steps=args.scaling_steps,
                           repeats=args.repeats, warmup=args.warmup, devices=d, one_thread=one_thread,
                           cfg_args=cfg_args, cache_dir=args.cache_dir, log=log)
            if r:
                pts.append(r)
                log(f"  {d} device(s): {r['jets_per_s']:,.1f} jets/s, step {1e3 * r['step_s']:.1f} ms")
        for r in pts:
            base = next((b for b in pts if b["replicas"] == 1), None)
            r["efficiency"] = base["step_s"] / r["step_s"] if base else None
        res["local"] = pts

    if args.compare:
        res["compare"] = compare(args, cfg_args, one_thread, log, reuse=res.get("mpi", []) + res.get("local", []))

    res["platform"]["load_end"] = load_avg()
    res["wall_s"] = time.perf_counter() - t_start
    print_table(res, log)
    (out / "bench.json").write_text(json.dumps(res, indent=1, default=float))
    png = plot(res, out / "bench.png")
    log(f"\nwrote {out / 'bench.json'}" + (f" and {png}" if png else "") + f" ({res['wall_s']:.0f} s)")
    return 0


def compare(args, cfg_args: list[str], one_thread: bool, log, reuse: list[dict] = ()) -> list[dict]:
    """The same global batch through every parallel path, in child processes with the same thread policy.

    A path already measured by the scaling sections with the same layout and batch is reused."""
    G = args.replica_batch * 2
    log(f"compare: global batch {G}, {'one thread' if one_thread else 'default threads'} per replica")
    paths = [("single process", "single", 1, 1, G), ("local devices (pmap) x2", "local", 1, 2, G // 2),
             ("mpi4jax ranks x2", "mpi", 2, 1, G // 2), ("jax.distributed ranks x2", "jaxdist", 2, 1, G // 2)]
    if not args.quick:
        paths.append(("hybrid 2 ranks x 2 devices", "hybrid", 2, 2, G // 4))
    rows = []
    for name, engine, ranks, devices, per in paths:
        r = next((dict(p) for p in reuse if p["engine"] == engine and p["world"] == ranks
                  and p["local_devices"] == devices and p["batch_per_replica"] == per), None)
        if r is None:
            r = run_worker(engine, batch=per, steps=args.scaling_steps, repeats=args.repeats, warmup=args.warmup,
                           ranks=ranks, devices=devices, one_thread=one_thread, cfg_args=cfg_args,
                           cache_dir=args.cache_dir, log=log)
        if r:
            rows.append({"path": name, **r})
            log(f"  {name}: {r['jets_per_s']:,.1f} jets/s")
    base = next((r for r in rows if r["engine"] == "single"), None)
    for r in rows:
        r["speedup"] = base["step_s"] / r["step_s"] if base else float("nan")
    return rows


def _worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ucluster_jax.bench")
    p.add_argument("--worker", required=True, choices=("single", "local", "mpi", "hybrid", "jaxdist"))
    p.add_argument("--batch", type=int, required=True, help="per-replica batch")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--allreduce", action="store_true")
    p.add_argument("--bind", action="store_true", help="pin this process to `devices` cores")
    p.add_argument("--json-out", required=True)
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--cache-dir", default="")
    return p


if __name__ == "__main__":
    from ucluster_jax.host_tuning import tune_process

    tune_process()
    sys.exit(worker(_worker_parser().parse_args()))
