"""What `ucluster bench` measures in its own process: timing, FLOPs, memory, the training and evaluation steps, the data path, the epoch loop."""
from __future__ import annotations

import os
import resource
import statistics
import sys
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


def _ints(s: str) -> list[int]:
    return [int(v) for v in str(s).split(",") if v.strip()]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: list[float]) -> float:
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
    return {"first_call_s": compile_s, "times_s": ts, "median_s": median(ts), "best_s": min(ts), "spread": spread(ts)}


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
        res[f"{name}spread"] = t["spread"]
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
    step = rt.make_step(cfg)
    state = rt.put_state(create_state(cfg))
    rates = []
    for epoch in range(1 + repeats):  # epoch 0 compiles
        with contextlib.redirect_stderr(io.StringIO()):
            state, rec = run_epoch(rt, cfg, step, state, ds, epoch)
        if epoch:
            rates.append(rec["jets_per_s"])
    jax.block_until_ready(state)
    res = {"batch": B, "jets_per_epoch": rec["steps"] * B, "jets_per_s": median(rates), "spread": spread(rates),
           "epochs": rates}
    log(f"  e2e   B={B}: {res['jets_per_s']:9.1f} jets/s (ucluster train's run_epoch, {res['jets_per_epoch']} jets/epoch)")
    return res
