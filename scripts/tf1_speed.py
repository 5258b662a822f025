#!/usr/bin/env python3
"""Developer tool: training and evaluation throughput of the ORIGINAL UCluster code, for the side by
side in docs/BENCHMARKS.md (issue #12: "at least 3x the original TensorFlow graph").

It times the original repository's own files (ViniciusMikuni/UCluster, MIT licensed:
models/gapnet_classify.py, models/gat_layers.py, utils/tf_util.py), not a re-creation. NOT part of
the package: it runs in the throwaway TensorFlow environment of scripts/tf1_reference.py:

    git clone https://github.com/ViniciusMikuni/UCluster ORIG      # any checkout of it
    TF_ENABLE_ONEDNN_OPTS=1 "$TFVENV"/bin/python scripts/tf1_speed.py --original ORIG --json OUT

The three files are copied to a temporary folder with only the edits TensorFlow 2 needs (listed in
EDITS; each must apply, or the script stops): tf.compat.v1 with the v2 behaviour off, contrib's
xavier initialiser as its core equivalent, contrib's bias_add as a bias variable added the same way.
The graph is built as scripts/train_kmeans.py builds it (its `train()`: placeholders, get_model,
get_focal_loss, get_loss_kmeans, Adam with the two minimize ops, the merged summaries). Timed, as its
loops run them: the joint training step (train_one_epoch's sess.run of merged, step, train_op_full,
kmeans_loss, stack_dist, learning_rate) and the evaluation fetch (eval_one_epoch's merged, step,
kmeans_loss, max_pool, stack_dist, mu with is_training False). Inputs are random jets with about 44
of 100 points real; the cost does not depend on the values. Medians over repeats after warm-up, as
`ucluster bench`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ucluster_jax.bench.measure import timed  # noqa: E402  (imports no JAX: fine in the TF venv)

FILES = ("models/gapnet_classify.py", "models/gat_layers.py", "utils/tf_util.py")
BIAS_ADD = '''
def _contrib_bias_add(x):
    """tf.contrib.layers.bias_add: a zero-initialised `biases` variable over the last axis."""
    with tf.variable_scope(None, default_name="BiasAdd"):
        b = tf.get_variable("biases", [x.get_shape()[-1].value], initializer=tf.zeros_initializer())
    return tf.nn.bias_add(x, b)
'''
# (file, old, new): the only changes made to the original's code
EDITS = (
    *((f, "import tensorflow as tf\n", "import tensorflow.compat.v1 as tf\ntf.disable_v2_behavior()\n") for f in FILES),
    ("utils/tf_util.py", "tf.contrib.layers.xavier_initializer()", "tf.glorot_uniform_initializer()"),
    ("models/gat_layers.py", "tf.contrib.layers.bias_add(vals)", "_contrib_bias_add(vals)"),
    ("models/gat_layers.py", "import tf_util\n", "import tf_util\n" + BIAS_ADD),
)


def load_original(repo: Path, work: Path):
    """The original's model module, imported from an edited copy of its files."""
    for f in FILES:
        src = repo / f
        if not src.is_file():
            raise SystemExit(f"{src}: not found (is --original a checkout of ViniciusMikuni/UCluster?)")
        (work / Path(f).name).write_text(src.read_text())
    for f, old, new in EDITS:
        p = work / Path(f).name
        text = p.read_text()
        if old not in text:
            raise SystemExit(f"{repo / f}: the TF2 edit for {old.strip()!r} does not apply")
        p.write_text(text.replace(old, new, 1))
    sys.path.insert(0, str(work))
    return importlib.import_module("gapnet_classify")


def build(model, tf, batch: int, num_point: int = 100, num_feat: int = 8, num_classes: int = 20,
          n_clusters: int = 3, max_dim: int = 3) -> dict:
    """scripts/train_kmeans.py's train() graph, its constants (lr 1e-3 halving every 500k, BN decay)."""
    pointclouds_pl, labels_pl = model.placeholder_inputs(batch, num_point, num_feat)
    is_training_pl = tf.placeholder(tf.bool, shape=())
    step = tf.Variable(0)
    alpha = tf.placeholder(dtype=tf.float32, shape=())
    bn_momentum = tf.train.exponential_decay(0.5, step * batch, 500000.0, 0.5, staircase=True)
    bn_decay = tf.minimum(0.99, 1 - bn_momentum)
    tf.summary.scalar("bn_decay", bn_decay)
    pred, max_pool = model.get_model(pointclouds_pl, is_training=is_training_pl, bn_decay=bn_decay,
                                     num_class=num_classes, weight_decay=0.0)
    class_loss = model.get_focal_loss(pred, labels_pl, num_classes)
    mu = tf.Variable(tf.zeros(shape=(n_clusters, max_dim)), name="mu", trainable=True)
    kmeans_loss, stack_dist = model.get_loss_kmeans(max_pool, mu, max_dim, n_clusters, alpha)
    full_loss = kmeans_loss + class_loss
    learning_rate = tf.maximum(tf.train.exponential_decay(1e-3, step * batch, 500000, 0.5, staircase=True), 1e-5)
    tf.summary.scalar("learning_rate", learning_rate)
    optimizer = tf.train.AdamOptimizer(learning_rate)
    train_op_full = optimizer.minimize(full_loss, global_step=step)
    optimizer.minimize(class_loss, global_step=step)
    merged = tf.summary.merge_all()
    return {"x": pointclouds_pl, "labels": labels_pl, "is_training": is_training_pl, "alpha": alpha,
            "train": [merged, step, train_op_full, kmeans_loss, stack_dist, learning_rate],
            "eval": [merged, step, kmeans_loss, max_pool, stack_dist, mu]}


def jets(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 100, 8)).astype(np.float32)
    real = rng.integers(20, 70, n)
    x[np.arange(100)[None, :] >= real[:, None]] = 0.0
    return x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--original", type=Path, required=True, help="a checkout of ViniciusMikuni/UCluster")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="intra- and inter-op threads (0: TensorFlow's default)")
    ap.add_argument("--json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        model = load_original(a.original, Path(work))
        tf = model.tf
        graph = tf.Graph()
        with graph.as_default():
            t = build(model, tf, a.batch)
            init = tf.global_variables_initializer()
    config = tf.ConfigProto(intra_op_parallelism_threads=a.threads, inter_op_parallelism_threads=a.threads)
    x = jets(a.batch)
    labels = np.random.default_rng(1).integers(0, 20, a.batch).astype(np.int32)
    with tf.Session(graph=graph, config=config) as sess:
        sess.run(init)
        train_feed = {t["x"]: x, t["labels"]: labels, t["is_training"]: True, t["alpha"]: 10.0}
        eval_feed = {**train_feed, t["is_training"]: False}

        def train():
            for _ in range(a.steps):
                sess.run(t["train"], feed_dict=train_feed)

        def evaluate():
            for _ in range(a.steps):
                sess.run(t["eval"], feed_dict=eval_feed)

        tt = timed(train, warmup=a.warmup, repeats=a.repeats)
        te = timed(evaluate, warmup=a.warmup, repeats=a.repeats)
        weights = int(sum(np.prod(v.get_shape().as_list()) for v in graph.get_collection("trainable_variables")))
    rec = {"code": "ViniciusMikuni/UCluster (its own model files, TF2-compat edits only)", "trainable_weights": weights,
           "tensorflow": tf.__version__, "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(default)"),
           "threads": a.threads or "default", "batch": a.batch,
           "train_jets_per_s": a.batch * a.steps / tt["median_s"], "eval_jets_per_s": a.batch * a.steps / te["median_s"],
           "train_best_jets_per_s": a.batch * a.steps / tt["best_s"], "eval_best_jets_per_s": a.batch * a.steps / te["best_s"],
           "train_times_s": tt["times_s"], "eval_times_s": te["times_s"], "load_avg": os.getloadavg()}
    print(json.dumps(rec, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
