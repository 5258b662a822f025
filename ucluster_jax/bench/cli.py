"""`ucluster bench`'s arguments and the run of the chosen sections."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ucluster_jax.bench.measure import (
    BASELINES, KNOWN_PEAK_GFLOPS, _ints, bench_data, bench_e2e, bench_eval, bench_train, device_peak_bytes, enable_cache, load_avg, matmul_gflops, model_flops_per_jet, peak_rss_mb,
)
from ucluster_jax.bench.report import fit_and_project, plot, print_table
from ucluster_jax.bench.workers import COMPARED, compare, run_worker
from ucluster_jax.errors import UserError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the original's model)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (model.*), e.g. --set model.k=5")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for bench.json and bench.png")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every section in ~1-2 min")
    p.add_argument("--compare", nargs="?", const="all", metavar="ENGINES",
                   help="one global batch through every parallel path (single, local, mpi, jaxdist, hybrid), "
                        "or through the comma list ENGINES")
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
    args.toy_jets = args.toy_jets or (512 if q else 4096)  # the real model even in --quick: only sizes shrink


def run(args: argparse.Namespace) -> int:
    _defaults(args)
    enable_cache(args.cache_dir)
    import jax

    from ucluster_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"train", "eval", "data", "e2e", "mpi", "local"}
    if unknown:
        raise UserError(f"unknown section(s) {', '.join(sorted(unknown))}")
    if args.compare not in (None, "all") and set(args.compare.split(",")) - set(COMPARED):
        raise UserError(f"--compare {args.compare}: the paths are {', '.join(COMPARED)}")
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
        per_gpu = args.project_jets_per_s or (
            max(max(r["jets_per_s"], r.get("scan_jets_per_s", 0)) for r in res["train"])
            if plat == "gpu" and res.get("train") else BASELINES["tf_t4_gpu_train_published"])
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
    log(f"\nwrote {out / 'bench.json'} and {png} ({res['wall_s']:.0f} s)")
    return 0
