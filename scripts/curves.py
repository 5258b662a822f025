"""Accuracy against joint-phase samples: runs' RUN/curve.jsonl beside the original's log (docs/RESULTS.md).

    python scripts/curves.py --run "81 % recipe=RUN_A" --run "CPU recipe=RUN_B" \
        --original ../shared/original_ucluster_ckpt/log_dkm.txt --out docs/img/accuracy_vs_samples.png

Prints, per run, the test accuracy reached at each point and the best one; `--json` keeps them. With
`--cadences 4992,29952`: what the selection would have kept had its points come only every N samples (and at
the epoch ends), read off a run whose test and criterion were both scored at the finest of them
(train.eval_every_samples; points with the criterion alone carry no test accuracy and are left out).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scipy.stats import spearmanr  # noqa: E402

from ucluster_jax import plots  # noqa: E402
from ucluster_jax.config import criterion_in  # noqa: E402
from ucluster_jax.original_log import read_log  # noqa: E402
from ucluster_jax.train.loop import steps_between  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR")
    ap.add_argument("--original", type=Path, help="the original's log_dkm.txt")
    ap.add_argument("--out", type=Path, required=True, help="PNG")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cadences", type=lambda v: [int(x) for x in v.split(",")], default=[],
                    metavar="N,N", help="joint-phase samples between the selection's points to compare")
    args = ap.parse_args()
    runs, dirs = {}, {}
    for spec in args.run:
        name, _, path = spec.rpartition("=")
        curve = Path(path) / "curve.jsonl"
        if not curve.exists():
            print(f"{curve}: no such file (train with --test-data and train.eval_every_samples)", file=sys.stderr)
            return 2
        rows = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()]
        runs[name or Path(path).name] = [r for r in rows if "test_acc" in r]  # selection-only points have none
        dirs[name or Path(path).name] = Path(path)
    original = read_log(args.original) if args.original else None
    plots.accuracy_vs_samples(runs, args.out, original)
    summary = {}
    for name, rows in runs.items():
        best = max(rows, key=lambda r: r["test_acc"])
        summary[name] = {"points": [(r["joint_samples"], round(r["test_acc"], 4)) for r in rows],
                         "best": (best["joint_samples"], best["test_acc"]), "last": (rows[-1]["joint_samples"],
                                                                                   rows[-1]["test_acc"])}
        print(f"{name}: last {rows[-1]['test_acc']:.4f} at {rows[-1]['joint_samples']:,} joint-phase samples; "
              f"best {best['test_acc']:.4f} at {best['joint_samples']:,}")
        by = criterion_in(rows)
        chosen = [r for r in rows if r.get(by) is not None]
        if len(chosen) > 1:  # train.select_from_epoch's points: does the criterion sort the test accuracy?
            low = min(chosen, key=lambda r: r[by])
            rho = spearmanr([r[by] for r in chosen], [r["test_acc"] for r in chosen])[0]
            summary[name]["selection"] = {"by": by, "points": len(chosen), "spearman": float(rho), "lowest": low}
            print(f"{name}: {len(chosen)} selection points, Spearman({by}, test acc) {rho:.2f}; lowest "
                  f"{low[by]:.4f} at {low['joint_samples']:,}: test acc {low['test_acc']:.4f}")
            for n in args.cadences:
                kept = min(at_cadence(dirs[name], chosen, n), key=lambda r: r[by])  # the first of equal values
                summary[name]["selection"][f"every_{n}"] = kept
                print(f"{name}: points every {n:,} samples: lowest {kept[by]:.4f} at {kept['joint_samples']:,}: "
                      f"test acc {kept['test_acc']:.4f}")
    if original:
        for r in original:
            if r.get("joint_samples") and r.get("test_acc", 0) >= 0.75:
                print(f"original (hls4ml, per-batch): first >= 0.75 at {r['joint_samples']:,} joint-phase samples "
                      f"(epoch {r['epoch']})")
                break
    print(f"wrote {args.out}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


def at_cadence(run: Path, rows: list[dict], samples: int) -> list[dict]:
    """The rows a run scored every `samples` joint-phase samples would have: steps within an epoch that are
    multiples of samples // batch, and the epoch ends (as train.loop.run_epoch places its points)."""
    every = steps_between(samples, json.loads((run / "config.json").read_text())["train"]["batch_size"])
    steps = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["steps"]
    return [r for r in rows if (r["step"] - r["epoch"] * steps) % every == 0 or r["step"] == (r["epoch"] + 1) * steps]


if __name__ == "__main__":
    raise SystemExit(main())
