"""The scaling model (fit to the measured allreduces, projected to many GPUs), the table and the figure."""
from __future__ import annotations

import math
from pathlib import Path

from ucluster_jax.bench.measure import BASELINES


# (name, bus bandwidth GB/s, per-message latency us) for the scaling projection.
NETWORKS = [("NVLink (H200, 8/node)", 300.0, 5.0), ("InfiniBand NDR 400G", 45.0, 5.0),
            ("100 GbE", 11.0, 20.0), ("10 GbE", 1.1, 50.0)]


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


def plot(res: dict, path: Path) -> Path:
    from ucluster_jax.plotstyle import save, subplots

    fig, axes = subplots(2, 2, figsize=(12, 9))
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
    _label(ax, "replicas (weak scaling)", "efficiency", "scaling on this machine (x: model)")
    ax = axes[1, 0]
    proj = (res.get("model") or {}).get("projection", {}).get("points", [])
    for name, *_ in NETWORKS:
        pts = [p for p in proj if p["network"] == name]
        if pts:
            ax.plot([p["gpus"] for p in pts], [p["efficiency"] for p in pts], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    _label(ax, "GPUs", "projected efficiency", "step-time model, projected")
    ax = axes[1, 1]
    cmp_ = res.get("compare") or []
    if cmp_:
        ax.barh([c["path"] for c in cmp_][::-1], [c["jets_per_s"] for c in cmp_][::-1])
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlabel("jets/s")
        ax.set_title(f"--compare (global batch {cmp_[0].get('global_batch')})")
    else:
        ax.axis("off")
    return save(fig, path, "toy W/Z/top jets")


def _label(ax, x: str, y: str, title: str) -> None:
    """Axis labels, title, and a legend where something was drawn."""
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


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
            log(f"{c['path']:>26} {c['replicas']:>9} {c['global_batch']:>13} {_fmt(c['jets_per_s']):>9} "
                f"{1e3 * c['step_s']:>9.1f} {c['speedup']:>9.2f}x")
