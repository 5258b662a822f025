#!/usr/bin/env python3
"""Developer tool: training and evaluation throughput of the original TensorFlow 1 graph, for the
side-by-side comparison in docs/BENCHMARKS.md (issue: "at least 5x TF's best configuration").

NOT part of the package: it runs in the throwaway TensorFlow environment of scripts/tf1_reference.py
(whose graph it times: the original's layers, edge convolutions per edge, BatchNorm, Adam):

    TF_ENABLE_ONEDNN_OPTS=0 "$TFVENV"/bin/python scripts/tf1_speed.py --json tf_default.json
    TF_ENABLE_ONEDNN_OPTS=1 "$TFVENV"/bin/python scripts/tf1_speed.py --json tf_onednn.json

Inputs are random jets with the toy set's padding (about 44 of 100 points real); the cost of the
graph does not depend on the values. Medians over repeats after warm-up, as `ucluster bench`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402

import tf1_reference as ref  # noqa: E402

sys.path.insert(0, str(ref.REPO))
from ucluster_jax.bench import timed  # noqa: E402  (stdlib-only at import: fine in the TF venv)

v1, tf = ref.v1, ref.tf


def jets(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, ref.NUM_POINT, ref.NUM_FEAT)).astype(np.float32)
    real = rng.integers(20, 70, n)
    x[np.arange(ref.NUM_POINT)[None, :] >= real[:, None]] = 0.0
    return x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4, help="training steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    B = a.batch
    graph = v1.Graph()
    with graph.as_default():
        t = ref.build_graph(B)
        init = v1.global_variables_initializer()
    x = jets(B)
    labels = np.random.default_rng(1).integers(0, ref.NUM_CLASSES, B).astype(np.int32)
    with v1.Session(graph=graph) as sess:
        sess.run(init)
        train_feed = {t["x"]: x, t["labels"]: labels, t["is_training"]: True, t["alpha"]: 4.0}
        eval_feed = {t["x"]: x, t["is_training"]: False}

        def train():
            for _ in range(a.steps):
                sess.run(t["train_joint"], feed_dict=train_feed)

        def evaluate():
            for _ in range(a.steps):
                sess.run([t["z"], t["dist"]], feed_dict={**eval_feed, t["alpha"]: 4.0})

        tt = timed(train, warmup=a.warmup, repeats=a.repeats)
        te = timed(evaluate, warmup=a.warmup, repeats=a.repeats)
    rec = {"tensorflow": tf.__version__, "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(default)"),
           "batch": B, "train_jets_per_s": B * a.steps / tt["median_s"],
           "eval_jets_per_s": B * a.steps / te["median_s"], "train_times_s": tt["times_s"],
           "eval_times_s": te["times_s"], "load_avg": os.getloadavg()}
    print(json.dumps(rec, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
