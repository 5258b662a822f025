"""Parallel measurements in child processes (each its own threads, devices and MPI world), and --compare."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ucluster_jax.bench.measure import (
    median, spread, device_peak_bytes, enable_cache, peak_rss_mb, synthetic_jets, timed,
)


# One thread per rank/device on CPU. (The often-quoted "intra_op_parallelism_threads=1" is not an
# XLA flag: in XLA_FLAGS it silently stops the parsing of every flag after it.) Ranks are also bound
# to one core each by mpirun, and a local-device worker to D cores.
THREAD_ENV = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
              "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "TF_NUM_INTEROP_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1"}


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
    step = rt.make_step(cfg)
    box = {"state": rt.put_state(create_state(cfg))}
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
    med = median(times)
    rec: dict[str, Any] = {
        "engine": rt.engine.name, "world": rt.world, "local_devices": rt.num_local, "replicas": rt.replicas,
        "batch_per_replica": args.batch, "global_batch": args.batch * rt.replicas, "steps_per_repeat": steps,
        "step_s": med / steps, "jets_per_s": args.batch * rt.replicas * steps / med, "spread": spread(times),
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


COMPARED = ("single", "local", "mpi", "jaxdist", "hybrid")  # --compare's paths, by engine


def compare(args, cfg_args: list[str], one_thread: bool, log, reuse: list[dict] = ()) -> list[dict]:
    """The same global batch through every parallel path, in child processes with the same thread policy.

    A path already measured by the scaling sections with the same layout and batch is reused."""
    G = args.replica_batch * 2
    log(f"compare: global batch {G}, {'one thread' if one_thread else 'default threads'} per replica")
    paths = [("single process", "single", 1, 1, G), ("local devices (pmap) x2", "local", 1, 2, G // 2),
             ("mpi4jax ranks x2", "mpi", 2, 1, G // 2), ("jax.distributed ranks x2", "jaxdist", 2, 1, G // 2)]
    if not args.quick:
        paths.append(("hybrid 2 ranks x 2 devices", "hybrid", 2, 2, G // 4))
    if args.compare != "all":  # checked against COMPARED by the CLI
        paths = [p for p in paths if p[1] in args.compare.split(",")]
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


def worker_parser() -> argparse.ArgumentParser:
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
