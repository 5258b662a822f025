#!/usr/bin/env python
"""train.select_from_epoch replayed on a run's kept checkpoints: which state the label-free selection keeps.

    python scripts/select_replay.py --run RUN --train TRAIN --test TEST [--from-epoch E] [--by CRITERION] [--json OUT]

For every checkpoint inside epoch E or later (default: the run's train.select_from_epoch, else its first joint
epoch): the criterion the trainer measures (train.select_by, or --by; train/select.py: the first
train.select_jets jets of TRAIN, no labels) and the globally matched accuracy on TEST. Prints them, the
checkpoint with the lowest value (what the selection keeps, among these points) and the last one. For runs
trained before the option, or to see how the choice does at the epoch ends alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ucluster_jax import checkpoint
from ucluster_jax.data.reader import ParquetDataset
from ucluster_jax.evaluate import load_run
from ucluster_jax.parallel.runtime import setup
from ucluster_jax.train import select
from ucluster_jax.train.scoring import evaluate_split
from ucluster_jax.train.state import create_state, scored


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--train", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--from-epoch", type=int)
    p.add_argument("--by", choices=sorted(select.CRITERIA), help="criterion (default: the run's train.select_by)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    cfg = load_run(a.run, last=True)[0]
    if a.by:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, select_by=a.by))
    by = cfg.train.select_by
    first = a.from_epoch if a.from_epoch is not None else (cfg.train.select_from_epoch or cfg.train.pretrain_epochs)
    rt = setup("single")
    batches, test = select.first_jets(cfg, a.train), ParquetDataset(a.test)
    rows = []
    for path in checkpoint.list_checkpoints(a.run):
        blob, meta = checkpoint.read_verified(path)
        if tuple(meta["next"]) <= (first, 0):  # before epoch `first`'s first step
            continue
        host = checkpoint.restore(blob, create_state(cfg), path)
        acc = evaluate_split(rt, cfg, scored(host), test, alpha=float(host.alpha), prefix="test")["test_acc"]
        rows.append({"step": int(meta["step"]), "epoch_done": int(meta["epoch"]),
                     by: select.measure(rt, cfg, host, batches), "test_acc": acc})
        print(json.dumps(rows[-1]), flush=True)
    if not rows:
        print(f"{a.run}: no checkpoint inside epoch {first} or later", file=sys.stderr)
        return 2
    chosen = min(rows, key=lambda r: r[by] if r[by] == r[by] else float("inf"))  # NaN never wins
    res = {"run": str(a.run), "from_epoch": first, "by": by, "points": rows, "selected": chosen, "last": rows[-1]}
    print(f"selected: step {chosen['step']}, test accuracy {chosen['test_acc']:.4f} "
          f"(last: step {rows[-1]['step']}, {rows[-1]['test_acc']:.4f})")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
