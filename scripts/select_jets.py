"""How many training jets the selection's criterion needs (train.select_jets; docs/RESULTS.md).

    # a replay (train.select_by: mass_valley) that measures the criterion at each point on the first N of its
    # select jets as well (slices of the one embedding): RUN/select_slices.jsonl, written afresh, one line per
    # point in the order of curve.jsonl
    python scripts/select_jets.py replay --slices 2560,5120,7680 -- train --config ... --out RUN --resume ...
    # the state each N would keep, scored by a run of the same window that has the test accuracy at every point
    python scripts/select_jets.py kept --run "check14=RUN:SCORED" ... --out docs/img/select_jets.png

The N = select_jets column is read from the scored run's own criterion (its train.select_jets).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ucluster_jax import cli, metrics, plotstyle  # noqa: E402
from ucluster_jax.train import select  # noqa: E402

SLICES = "select_slices.jsonl"


def replay(slices: list[int], train_args: list[str]) -> int:
    """`ucluster train` with the mass_valley criterion also written for the first N jets of each slice."""
    out = Path(train_args[train_args.index("--out") + 1])
    (out / SLICES).unlink(missing_ok=True)

    def criterion(o, mu):
        vals = {n: metrics.mass_valley(o["dist"][:n], mu, o["mass"][:n]) for n in slices if n <= len(o["mass"])}
        with open(out / SLICES, "a") as f:
            f.write(json.dumps(vals) + "\n")
        return metrics.mass_valley(o["dist"], mu, o["mass"])

    select.CRITERIA["mass_valley"] = criterion
    return cli.main(train_args)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kept(specs: list[str], out: Path) -> int:
    """Per set and N: the test accuracy of the first point with the lowest criterion."""
    table, gaps = {}, {}  # gaps: N -> |criterion on N jets - on all of them| at every point
    for spec in specs:
        name, _, dirs = spec.rpartition("=")
        run, scored = (Path(p) for p in dirs.split(":"))
        for f in (run / "curve.jsonl", run / SLICES, scored / "curve.jsonl", scored / "config.json"):
            if not f.exists():
                print(f"{f}: no such file", file=sys.stderr)
                return 2
        points = [r for r in rows(run / "curve.jsonl") if "mass_valley" in r]
        sliced = rows(run / SLICES)
        ref = {r["step"]: r for r in rows(scored / "curve.jsonl") if "mass_valley" in r and "test_acc" in r}
        full = json.loads((scored / "config.json").read_text())["train"]["select_jets"]
        if len(points) != len(sliced) or any(r["step"] not in ref for r in points):
            print(f"{run}: its points do not match {run / SLICES} or {scored}'s test points", file=sys.stderr)
            return 2
        values = [{**{int(n): v for n, v in s.items()}, full: ref[r["step"]]["mass_valley"]}
                  for r, s in zip(points, sliced)]
        table[name] = {}
        for v in values:
            for n in v:
                gaps.setdefault(n, []).append(abs(v[n] - v[full]))
        for n in sorted(values[0]):
            low = min(range(len(points)), key=lambda i: math.inf if math.isnan(values[i][n]) else values[i][n])
            table[name][n] = ref[points[low]["step"]]["test_acc"]
        print(f"{name}: {len(points)} points; kept "
              + ", ".join(f"{n}: {a * 100:.2f} %" for n, a in table[name].items()))
    ns = sorted(next(iter(table.values())))
    for n in ns:
        accs = [t[n] for t in table.values()]
        gap = np.nan_to_num(gaps[n], nan=np.inf)
        print(f"{n:6d} jets: mean {sum(accs) / len(accs) * 100:.2f} %, >= 75 % on {sum(a >= 0.75 for a in accs)} of "
              f"{len(accs)}; criterion off the full one's by {np.median(gap):.2f} GeV (median), "
              f"{np.quantile(gap, 0.9):.2f} (90 %) over {len(gap)} points")
    fig, ax = plotstyle.subplots(figsize=(6.5, 4.5))
    for i, (name, t) in enumerate(table.items()):  # shrinking markers: sets that keep the same states stay visible
        ax.plot(ns, [t[n] * 100 for n in ns], "-", marker="osD^v"[i % 5], ms=10 - 1.5 * (i % 5), label=name)
    ax.axhline(75, color="grey", ls=":", lw=1)
    ax.set(xscale="log", xlabel="training jets the criterion is measured on", ylabel="kept state's test accuracy [%]")
    ax.set_xticks(ns, [f"{n:,}" for n in ns])
    ax.set_xticks([], minor=True)
    ax.margins(y=0.3)
    ax.legend(fontsize=9, ncol=4, loc="lower center")
    plotstyle.save(fig, out)
    print(f"wrote {out}")
    return 0


def main() -> int:
    argv = sys.argv[1:]
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("replay")
    s.add_argument("--slices", required=True, type=lambda v: [int(x) for x in v.split(",")])
    s = sub.add_parser("kept")
    s.add_argument("--run", action="append", required=True, metavar="NAME=RUN:SCORED_RUN")
    s.add_argument("--out", type=Path, required=True, help="PNG")
    a = ap.parse_args(argv[:len(argv) - len(train_args) - bool(train_args)])
    return replay(a.slices, train_args) if a.cmd == "replay" else kept(a.run, a.out)


if __name__ == "__main__":
    raise SystemExit(main())
