"""How fast two runs of the same config part when their arithmetic differs only by rounding (docs/DATA.md).

`run` trains the first STEPS steps of epoch 0 as `ucluster train` does (same batches, any engine; under
`mpirun` too) and saves the global loss of every step and the parameters at a few steps; `--ulp` moves the
largest weight up by one float32 ulp first, a perturbation of rounding size inside one process. `compare` prints
each run's relative parameter distance from the first and draws it against the step. `bits` prints the SHA-256
of slices' gradients and new BN statistics from one compiled forward-backward (the program `parallel.slices`
runs per slice), each rank its own slices: the same bits in another process needs the same cores.

    python scripts/rounding_divergence.py run --config configs/wztop_cpu.yaml --data TRAIN --out D/one.npz
    mpirun -np 2 python scripts/rounding_divergence.py run ... --out D/two_ranks.npz
    python scripts/rounding_divergence.py run ... --out D/one_ulp.npz --ulp
    python scripts/rounding_divergence.py compare D/one.npz D/two_ranks.npz D/one_ulp.npz --plot D/divergence.png
    python scripts/rounding_divergence.py bits --config configs/wztop_cpu.yaml --data TEST
    mpirun -np 2 python scripts/rounding_divergence.py bits ...      # and with --bind-to none
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAVE_AT = (1, 10, 50, 100, 200, 300, 500)  # steps after which the parameters are kept


def cmd_run(a: argparse.Namespace) -> int:
    import jax
    from jax.flatten_util import ravel_pytree

    from ucluster_jax.config import load_config
    from ucluster_jax.data.reader import ParquetDataset
    from ucluster_jax.parallel.runtime import setup
    from ucluster_jax.train.loop import epoch_batches
    from ucluster_jax.train.state import create_state

    cfg = load_config(a.config, a.overrides)
    rt = setup(a.engine, num_devices=a.devices)
    ds = ParquetDataset(a.data, rank=rt.rank, world=rt.world)
    host = create_state(cfg)
    if a.ulp:
        flat, unravel = ravel_pytree(host.params)
        flat = np.asarray(flat).copy()
        i = int(np.argmax(np.abs(flat)))  # a weight that matters (the first leaf is a bias BatchNorm cancels)
        flat[i] = np.nextafter(flat[i], np.float32(np.inf))
        host = host.replace(params=unravel(jax.numpy.asarray(flat)))
    step = rt.make_step(cfg, num_classes=len(ds.meta.class_names))  # before placing: it sets the layout
    state = rt.put_state(host)
    losses, params = [], {}
    for i, b in zip(range(a.steps), epoch_batches(cfg, ds, 0)):
        state, m = step(state, rt.put_batch(b))
        m = rt.step_metrics(m)
        losses.append(float(rt.sum(np.asarray(jax.device_get(m["loss"]), np.float64)[None])[0]) / rt.replicas)
        if i + 1 in SAVE_AT:
            params[f"params_{i + 1}"] = np.asarray(ravel_pytree(rt.host_state(state).params)[0])
    if rt.is_root:
        np.savez(a.out, loss=np.asarray(losses), world=rt.world, replicas=rt.replicas, ulp=a.ulp, **params)
        print(f"{a.out}: {len(losses)} steps, {rt.replicas} replica(s), mean loss {np.mean(losses):.5f}")
    return 0


def cmd_bits(a: argparse.Namespace) -> int:
    import os

    import jax

    from ucluster_jax.config import load_config
    from ucluster_jax.data.reader import ParquetDataset
    from ucluster_jax.parallel.mpi import launched_world, param_checksum as sha
    from ucluster_jax.train.state import create_state
    from ucluster_jax.train.step import make_grads_fn

    cfg = load_config(a.config, a.overrides)
    rank, world = launched_world()
    b = next(ParquetDataset(a.data).iter_all(a.slice * a.slices))
    f, state = jax.jit(make_grads_fn(cfg)), create_state(cfg)
    for i in range(rank, a.slices, world):
        part = {k: b[k][i * a.slice:(i + 1) * a.slice] for k in ("x", "target", "label", "mass")}
        grads, stats, m = f(state, part)
        print(f"slice {i} (rank {rank} of {world}, {len(os.sched_getaffinity(0))} cores): gradients {sha(grads)} "
              f"BN statistics {sha(stats)} loss {float(m['loss']):.9g}", flush=True)
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    runs = {Path(p).stem: np.load(p) for p in a.runs}
    (ref_name, ref), others = next(iter(runs.items())), list(runs.items())[1:]
    steps = [s for s in SAVE_AT if f"params_{s}" in ref.files]
    print(f"relative parameter distance from {ref_name}, after step: " + " ".join(f"{s:>8d}" for s in steps))
    dist = {}
    for name, r in others:
        dist[name] = [float(np.linalg.norm(r[f"params_{s}"] - ref[f"params_{s}"]) / np.linalg.norm(ref[f"params_{s}"]))
                      for s in steps]
        print(f"{name:>40s}: " + " ".join(f"{d:8.1e}" for d in dist[name])
              + f"   mean loss {r['loss'].mean():.5f} ({ref_name}: {ref['loss'].mean():.5f})")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, d in dist.items():
            ax.loglog(steps, d, "o-", label=name)
        ax.set_xlabel("training step (epoch 0)")
        ax.set_ylabel(f"|params - params({ref_name})| / |params|")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"wrote {a.plot}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--config", required=True)
    r.add_argument("--data", required=True, type=Path)
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--steps", type=int, default=300)
    r.add_argument("--engine", default="auto")
    r.add_argument("--devices", type=int)
    r.add_argument("--ulp", action="store_true", help="the largest weight one float32 ulp up before the first step")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    b = sub.add_parser("bits")
    b.add_argument("--config", required=True)
    b.add_argument("--data", required=True, type=Path)
    b.add_argument("--slice", type=int, default=64, help="jets per slice")
    b.add_argument("--slices", type=int, default=2)
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c = sub.add_parser("compare")
    c.add_argument("runs", nargs="+", help="run .npz files; the first is the reference")
    c.add_argument("--plot", type=Path)
    a = ap.parse_args()
    if a.cmd == "bits":
        from ucluster_jax.host_tuning import tune_process

        tune_process()  # the process settings `ucluster train` runs with
    return {"run": cmd_run, "bits": cmd_bits, "compare": cmd_compare}[a.cmd](a)


if __name__ == "__main__":
    raise SystemExit(main())
