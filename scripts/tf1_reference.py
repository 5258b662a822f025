#!/usr/bin/env python3
"""Developer tool: outputs of the original TensorFlow 1 UCluster graph, as a test fixture.

NOT part of the package and NOT a project dependency: it needs TensorFlow (2.x with
``tf.compat.v1``), numpy and h5py in a separate, throwaway environment, e.g.

    python3.11 -m venv "$TFVENV"                   # TFVENV: a throwaway folder
    "$TFVENV"/bin/pip install tensorflow-cpu numpy h5py
    "$TFVENV"/bin/python scripts/tf1_reference.py            # writes tests/data/tf1_reference.npz

It rebuilds the multiclass network of the original UCluster code (models/gapnet_classify.py,
gat_layers.attn_feature and utils/tf_util.py of ViniciusMikuni/UCluster, in the version that
matches the shipped checkpoint: no ``global_expand``, mean pooling, 1 attention head) with the
original variable names and graph structure (BatchNorm via ExponentialMovingAverage under
``tf.cond``, dropout under ``tf.cond``, ``tf.contrib.layers.bias_add`` emulated as the
``BiasAdd*/biases`` variables, the focal + deep-k-means losses and the two Adam ``minimize`` ops
of train_kmeans.py so that the optimizer slots exist). It then

1. checks that ``tf.train.Saver`` over the whole graph saves exactly the tensors of the
   shipped checkpoint (same names, shapes and dtypes; nothing missing, nothing unused),
   restores it, and checks every restored value against ``ucluster_jax.tf1.bundle``;
2. runs the graph in evaluation mode (``is_training=False``: BatchNorm uses the stored moving
   averages, dropout is the identity) on a deterministic set of jets built from an hls4ml-layout
   file, and saves inputs and outputs to an ``.npz``.

The code below is a re-implementation written for this project; only the layer and variable
names follow the original so that its checkpoint restores.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
v1 = tf.compat.v1
v1.disable_v2_behavior()

# ---------------------------------------------------------------- hyper-parameters of the checkpoint
NUM_POINT = 100
NUM_FEAT = 8
NUM_CLASSES = 20  # mass bins of the auxiliary head
K = 10
N_CLUSTERS = 3
MAX_DIM = 3
BATCH_SIZE_TRAIN = 512  # only used by the (never run) decay schedules
DECAY_STEP = 500000
#        k, heads, gap1, gapnet01, gapnet02, heads, gap2, gapnet11, gapnet12, agg, fc1, fc2
PARAMS = [K, 1, 16, 64, 128, 1, 128, 256, 256, 3, 256, 128]
BN_EPS = 1e-3


# ---------------------------------------------------------------- layer helpers (tf_util equivalents)
def _weights(shape):
    return v1.get_variable("weights", shape, initializer=v1.glorot_uniform_initializer(), dtype=tf.float32)


def _biases(n):
    return v1.get_variable("biases", [n], initializer=v1.zeros_initializer(), dtype=tf.float32)


def batch_norm(x, is_training, moments_axes, bn_decay):
    """tf_util.batch_norm_template: beta/gamma tf.Variables, EMA of batch moments under tf.cond."""
    with v1.variable_scope("bn"):
        channels = x.get_shape()[-1]
        beta = tf.Variable(tf.constant(0.0, shape=[channels]), name="beta", trainable=True)
        gamma = tf.Variable(tf.constant(1.0, shape=[channels]), name="gamma", trainable=True)
        batch_mean, batch_var = tf.nn.moments(x, moments_axes, name="moments")
        ema = v1.train.ExponentialMovingAverage(decay=bn_decay if bn_decay is not None else 0.9)
        ema_apply = v1.cond(is_training, lambda: ema.apply([batch_mean, batch_var]), lambda: tf.no_op())

        def train_moments():
            with tf.control_dependencies([ema_apply]):
                return tf.identity(batch_mean), tf.identity(batch_var)

        mean, var = v1.cond(
            is_training, train_moments, lambda: (ema.average(batch_mean), ema.average(batch_var))
        )
        return tf.nn.batch_normalization(x, mean, var, beta, gamma, BN_EPS)


def conv1x1(x, width, scope, is_training, bn_decay, bias=True, bn=True, act=tf.nn.relu):
    """tf_util.conv2d / conv2d_nobias with a [1,1] kernel on a [B,H,W,C] tensor."""
    with v1.variable_scope(scope):
        kernel = _weights([1, 1, x.get_shape()[-1], width])
        y = tf.nn.conv2d(x, kernel, [1, 1, 1, 1], padding="VALID")
        if bias:
            y = tf.nn.bias_add(y, _biases(width))
        if bn:
            y = batch_norm(y, is_training, [0, 1, 2], bn_decay)
        return act(y) if act is not None else y


def dense(x, width, scope, is_training, bn_decay, bn=True, act=tf.nn.relu):
    """tf_util.fully_connected."""
    with v1.variable_scope(scope):
        y = tf.nn.bias_add(tf.matmul(x, _weights([x.get_shape()[-1], width])), _biases(width))
        if bn:
            y = batch_norm(y, is_training, [0], bn_decay)
        return act(y) if act is not None else y


def dropout(x, keep_prob, is_training, scope):
    with v1.variable_scope(scope):
        return v1.cond(is_training, lambda: tf.nn.dropout(x, rate=1.0 - keep_prob), lambda: x)


def contrib_bias_add(x):
    """tf.contrib.layers.bias_add: a zero-initialised 'biases' in a fresh 'BiasAdd' scope."""
    with v1.variable_scope(None, default_name="BiasAdd"):
        return tf.nn.bias_add(x, _biases(x.get_shape()[-1]))


def pairwise_distance(points):
    """|a|^2 - 2 a.b + |b|^2 on [B,N,C] (tf_util.pairwise_distance), same summation order."""
    inner = -2 * tf.matmul(points, tf.transpose(points, [0, 2, 1]))
    square = tf.reduce_sum(tf.square(points), axis=-1, keepdims=True)
    return square + inner + tf.transpose(square, [0, 2, 1])


def pairwise_distance_r(points3):
    """tf_util.pairwise_distanceR on the first 3 features (eta, phi, log ptrel).

    Squared distance in (eta, phi), plus a phi-wrap term that only fires for |dphi| >= 2 pi,
    plus 1000 for every row and every column whose third feature is exactly 0 (padding).
    """
    flag = points3[:, :, 2:3]
    shift = 1000 * tf.where(tf.equal(flag, 0), tf.ones_like(flag), tf.zeros_like(flag))
    shift_t = tf.transpose(shift, [0, 2, 1])
    pts = points3[:, :, :2]
    pts_t = tf.transpose(pts, [0, 2, 1])
    n = pts.get_shape()[1]
    phi = tf.tile(pts_t[:, 1:, :], [1, n, 1])  # phi[b, i, j] = phi_j
    dphi = tf.abs(phi - tf.transpose(phi, [0, 2, 1]))
    wrap = tf.where(tf.greater_equal(tf.abs(dphi), 2 * np.pi), 4 * np.pi**2 - 4 * np.pi * dphi, dphi - dphi)
    inner = -2 * tf.matmul(pts, pts_t)
    square = tf.reduce_sum(tf.square(pts), axis=-1, keepdims=True)
    return square + inner + tf.transpose(square, [0, 2, 1]) + wrap + shift + shift_t


def knn(adj, k):
    """Indices of the k smallest entries per row (tf.nn.top_k of -adj: ties -> lower index)."""
    return tf.nn.top_k(-adj, k=k)[1]


def gather_neighbours(points, nn_idx):
    """[B,N,C] and [B,N,k] -> [B,N,k,C] (tf_util.get_neighbors)."""
    b, n, c = (int(d) for d in points.get_shape())
    offsets = tf.reshape(tf.range(b) * n, [b, 1, 1])
    return tf.gather(tf.reshape(points, [-1, c]), nn_idx + offsets)


def attention_head(features, width, nn_idx, is_training, bn_decay, layer, k, head):
    """gat_layers.attn_feature (1 head). features: [B,N,C] or [B,N,1,C]."""
    b = int(features.get_shape()[0])
    x = tf.squeeze(features)
    if b == 1:
        x = tf.expand_dims(x, 0)
    x4 = tf.expand_dims(x, axis=-2)  # [B,N,1,C]
    h = conv1x1(x4, width, f"{layer}_newfea_conv_head_{head}", is_training, bn_decay, bias=False)
    neighbours = gather_neighbours(x, nn_idx)  # [B,N,k,C]
    edge = tf.tile(x4, [1, 1, k, 1]) - neighbours  # x_i - x_j
    edge = conv1x1(edge, width, f"{layer}_edgefea_{head}", is_training, bn_decay)  # [B,N,k,F]
    self_att = conv1x1(h, 1, f"{layer}_self_att_conv_head_{head}", is_training, bn_decay)  # [B,N,1,1]
    neib_att = conv1x1(edge, 1, f"{layer}_neib_att_conv_head_{head}", is_training, bn_decay)  # [B,N,k,1]
    logits = tf.transpose(self_att + neib_att, [0, 1, 3, 2])  # [B,N,1,k]
    coefs = tf.nn.softmax(tf.nn.leaky_relu(logits))  # leaky slope 0.2, softmax over k
    out = tf.nn.relu(contrib_bias_add(tf.matmul(coefs, edge)))  # [B,N,1,F]
    return out, coefs, edge


def gap_block(k, nn_idx, features, point_cloud, layer, width, is_training, bn_decay):
    out, coefs, edge = attention_head(features, width, nn_idx, is_training, bn_decay, layer, k, 0)
    net = tf.concat([tf.expand_dims(point_cloud, -2), out], axis=-1)  # [B,N,1,C_in+F]
    graph_features = tf.reduce_max(edge, axis=-2, keepdims=True)  # [B,N,1,F]
    return net, graph_features, coefs


def get_model(point_cloud, is_training, bn_decay):
    """gapnet_classify.get_model (no global_expand, mean pooling)."""
    b = int(point_cloud.get_shape()[0])
    p = PARAMS
    t = {}
    t["adj1"] = pairwise_distance_r(point_cloud[:, :, :3])
    t["knn1"] = knn(t["adj1"], p[0])
    net, loc0, t["coefs1"] = gap_block(p[0], t["knn1"], point_cloud, point_cloud, "layerfilter0", p[2],
                                       is_training, bn_decay)
    t["gap1_out"] = net
    net01 = conv1x1(net, p[3], "gapnet01", is_training, bn_decay)
    net02 = conv1x1(net01, p[4], "gapnet02", is_training, bn_decay)
    feat02 = tf.squeeze(net02, axis=2)
    t["adj2"] = pairwise_distance(feat02)
    t["knn2"] = knn(t["adj2"], p[0])
    net, loc1, t["coefs2"] = gap_block(p[0], t["knn2"], net02, point_cloud, "layerfilter1", p[6],
                                       is_training, bn_decay)
    net11 = conv1x1(net, p[7], "gapnet11", is_training, bn_decay)
    net12 = conv1x1(net11, p[8], "gapnet12", is_training, bn_decay)
    net = tf.concat([net01, net02, net11, net12, loc0, loc1], axis=-1)  # 64+128+256+256+16+128 = 848
    agg = conv1x1(net, p[9], "agg", is_training, bn_decay)
    t["agg_points"] = tf.squeeze(agg, axis=2)
    with v1.variable_scope("avgpool") as sc:
        pooled = tf.nn.avg_pool2d(agg, ksize=[1, NUM_POINT, 1, 1], strides=[1, 2, 2, 1], padding="VALID",
                                  name=sc.name)
    net = tf.reshape(pooled, [b, -1])
    t["z"] = net
    net = dense(net, p[10], "fc1", is_training, bn_decay)
    net = dropout(net, 0.6, is_training, "dp1")
    net = dense(net, p[11], "fc2", is_training, bn_decay)
    net = dense(net, NUM_CLASSES, "fc3", is_training, bn_decay, bn=False, act=None)
    t["logits"] = tf.squeeze(net)
    return t


def focal_loss(logits, labels, gamma=4.0, alpha=10.0):
    y = tf.one_hot(labels, NUM_CLASSES)
    prob = tf.nn.softmax(logits - tf.reduce_max(logits, axis=1, keepdims=True)) + 1e-9
    fl = alpha * y * tf.pow(1.0 - prob, gamma) * (-tf.math.log(prob))
    return tf.reduce_mean(tf.reduce_max(fl, axis=1))


def kmeans_loss(z, mu, alpha):
    dist = tf.stack([tf.reduce_sum(tf.square(z - mu[i : i + 1, :]), axis=1) for i in range(N_CLUSTERS)])  # [K,B]
    shifted = dist - tf.reduce_min(dist, axis=0)
    w = tf.exp(-alpha * shifted)
    w = w / tf.reduce_sum(w, axis=0)
    return tf.reduce_mean(tf.reduce_sum(w * dist, axis=0)), dist


def build_graph(batch_size):
    """The whole training graph of train_kmeans.py, so that every checkpoint entry has a home."""
    x = v1.placeholder(tf.float32, shape=(batch_size, NUM_POINT, NUM_FEAT), name="x")
    labels = v1.placeholder(tf.int32, shape=(batch_size,), name="labels")
    is_training = v1.placeholder(tf.bool, shape=(), name="is_training")
    step = tf.Variable(0)  # the global step; saved as "Variable"
    alpha = v1.placeholder(tf.float32, shape=(), name="alpha")
    bn_momentum = v1.train.exponential_decay(0.5, step * BATCH_SIZE_TRAIN, float(DECAY_STEP), 0.5, staircase=True)
    bn_decay = tf.minimum(0.99, 1 - bn_momentum)
    t = get_model(x, is_training, bn_decay)
    class_loss = focal_loss(t["logits"], labels)
    mu = tf.Variable(tf.zeros(shape=(N_CLUSTERS, MAX_DIM)), name="mu", trainable=True)
    km_loss, dist = kmeans_loss(tf.squeeze(t["z"]), mu, alpha)
    lr = tf.maximum(v1.train.exponential_decay(1e-3, step * BATCH_SIZE_TRAIN, DECAY_STEP, 0.5, staircase=True), 1e-5)
    opt = v1.train.AdamOptimizer(lr)
    train_joint = opt.minimize(10 * km_loss + class_loss, global_step=step)
    train_focal = opt.minimize(class_loss, global_step=step)
    t.update(x=x, labels=labels, alpha=alpha, is_training=is_training, mu=mu, dist=tf.transpose(dist), step=step,
             train_joint=train_joint, train_focal=train_focal)
    return t


# ---------------------------------------------------------------- jets
FEATURES = ["etarel", "phirel", "ptrel", "deltaR", "e", "erel", "pt", "costhetarel"]
LOGGED = {"ptrel", "e", "erel", "pt"}


def particle_features(constituents, names):
    """[N,100,16] hls4ml constituents -> [N,100,8] UCluster features (SPEC section 1)."""
    col = {n.removeprefix("j1_"): i for i, n in enumerate(names)}
    out = []
    for f in FEATURES:
        v = constituents[..., col[f]].astype(np.float32)
        if f in LOGGED:
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.where(v > 0, np.log(np.where(v > 0, v, 1)), 0).astype(np.float32)
        out.append(np.where(np.isfinite(v), v, 0).astype(np.float32))
    return np.stack(out, axis=-1)


def build_jets(path, per_class=20):
    with h5py.File(path, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["particleFeatureNames"][:]]
        jet_names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["jetFeatureNames"][:]]
        cons = f["jetConstituentList"][:]
        jets = f["jets"][:]
    jc = {n: i for i, n in enumerate(jet_names)}
    truth = jets[:, [jc["j_w"], jc["j_z"], jc["j_t"]]]
    mass = jets[:, jc["j_mass"]]
    keep = (truth.sum(1) > 0) & (mass > 10) & (mass < 200)
    label = truth.argmax(1)
    x_all = particle_features(cons, names)
    mult = (x_all[:, :, 2] != 0).sum(1)
    chosen = []
    for c in range(3):
        chosen += [int(i) for i in np.flatnonzero(keep & (label == c))[:per_class]]
    x = [x_all[i] for i in chosen]
    kinds = ["jet"] * len(chosen)
    labels = [int(label[i]) for i in chosen]
    src = list(chosen)
    rng = np.random.default_rng(20201014)
    # a full jet (100 constituents, no padding)
    full = int(np.flatnonzero(keep & (mult == mult[keep].max()))[0])
    x.append(x_all[full]); kinds.append(f"jet, {int(mult[full])} constituents"); labels.append(int(label[full]))
    src.append(full)
    # fewer real constituents than k: the first kNN must pick padded points
    few = x_all[chosen[0]].copy(); few[5:] = 0
    x.append(few); kinds.append("first jet cut to 5 constituents (< k)"); labels.append(labels[0]); src.append(chosen[0])
    # Gaussian noise on the real rows of a jet
    noisy = x_all[chosen[1]].copy(); n_real = int(mult[chosen[1]])
    noisy[:n_real] += rng.normal(0, 0.05, size=(n_real, NUM_FEAT)).astype(np.float32)
    x.append(noisy); kinds.append("noise 0.05 on real rows"); labels.append(labels[1]); src.append(chosen[1])
    # phirel of a few constituents pushed by +-3.3 rad: some |dphi| >= 2 pi, the phi-wrap term fires
    wrap = x_all[chosen[2]].copy()
    wrap[0:3, 1] += 3.3
    wrap[3:6, 1] -= 3.3
    x.append(wrap); kinds.append("phirel +-3.3 on 6 rows (phi-wrap term active)"); labels.append(labels[2])
    src.append(chosen[2])
    return (np.stack(x).astype(np.float32), np.array(kinds), np.array(labels, dtype=np.int32),
            np.array(src, dtype=np.int32))


# ---------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(REPO.parent / "shared" / "original_ucluster_ckpt" / "cluster.ckpt"))
    ap.add_argument("--jets", default=str(REPO.parent / "shared" / "samples" / "pythia_wztop_600.h5"))
    ap.add_argument("--out", default=str(REPO / "tests" / "data" / "tf1_reference.npz"))
    ap.add_argument("--knn-jets", default="0,1,2,20,40,60,61,62,63",
                    help="jets whose kNN indices are saved")
    args = ap.parse_args(argv)

    x, kinds, labels, src = build_jets(args.jets)
    n = x.shape[0]
    print(f"{n} jets, real constituents per jet: {(x[:, :, 2] != 0).sum(1).tolist()}")

    graph = tf.Graph()
    with graph.as_default():
        t = build_graph(n)
        saver = v1.train.Saver()
        # -- 1. the graph's saveable variables are exactly the checkpoint's tensors
        ckpt_vars = dict(tf.train.list_variables(args.checkpoint))
        graph_vars = {v.op.name: v for v in v1.global_variables()}
        missing = sorted(set(ckpt_vars) - set(graph_vars))
        extra = sorted(set(graph_vars) - set(ckpt_vars))
        if missing or extra:
            sys.exit(f"graph/checkpoint mismatch: in checkpoint only {missing}; in graph only {extra}")
        bad = [k for k, v in graph_vars.items() if list(v.get_shape()) != list(ckpt_vars[k])]
        if bad:
            sys.exit(f"shape mismatch for {bad}")
        # tf.Variable(0) (the int32 step) is "trainable" in TF1 but has no gradient: leave it out
        floats = [v for v in v1.trainable_variables() if v.dtype.base_dtype == tf.float32]
        n_train = sum(int(np.prod(v.get_shape())) for v in floats)
        print(f"graph variables == checkpoint tensors: {len(graph_vars)}; float trainable parameters {n_train}"
              f" (network {n_train - N_CLUSTERS * MAX_DIM} + mu {N_CLUSTERS * MAX_DIM})")
        with v1.Session(graph=graph) as sess:
            saver.restore(sess, args.checkpoint)
            values = sess.run(graph_vars)
            # -- cross-check the pure-numpy reader against TensorFlow
            sys.path.insert(0, str(REPO))
            from ucluster_jax.tf1.bundle import read_tf1_checkpoint

            ours = read_tf1_checkpoint(args.checkpoint)
            assert set(ours) == set(values)
            for k, v in values.items():
                assert ours[k].dtype == np.asarray(v).dtype and np.array_equal(ours[k], v), k
            print(f"ucluster_jax.tf1.bundle agrees with TensorFlow on all {len(ours)} tensors")
            # -- 2. evaluation mode
            fetch = {k: t[k] for k in ("z", "logits", "dist", "knn1", "knn2", "agg_points", "mu", "step")}
            out = sess.run(fetch, feed_dict={t["x"]: x, t["is_training"]: False})
            out2 = sess.run(fetch, feed_dict={t["x"]: x, t["is_training"]: False})
            for k in fetch:
                assert np.array_equal(out[k], out2[k]), f"{k} not deterministic"
            # evaluation mode must not depend on the batch: rerun jets one by one is costly in
            # a fixed-shape graph, so check a permutation of the batch instead
            perm = np.random.default_rng(0).permutation(n)
            out3 = sess.run(fetch, feed_dict={t["x"]: x[perm], t["is_training"]: False})
            np.testing.assert_allclose(out3["z"], out["z"][perm], rtol=1e-5, atol=1e-6)
    sel = np.array([int(s) for s in args.knn_jets.split(",")], dtype=np.int32)
    result = dict(
        x=x,
        z=out["z"].astype(np.float32),
        logits=out["logits"].astype(np.float32),
        dist=out["dist"].astype(np.float32),
        cluster=np.argmin(out["dist"], axis=1).astype(np.int32),
        mu=out["mu"].astype(np.float32),
        knn_jets=sel,
        knn1=out["knn1"][sel].astype(np.int32),
        knn2=out["knn2"][sel].astype(np.int32),
        agg_points=out["agg_points"][sel].astype(np.float32),
        labels=labels,
        source_index=src,
        kind=kinds,
        step=np.int64(out["step"]),
        tf_version=np.array(tf.__version__),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **result)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)")
    for k, v in result.items():
        print(f"  {k}: {v.dtype} {list(np.shape(v))}")
    print("cluster counts:", np.bincount(result["cluster"], minlength=3).tolist())


if __name__ == "__main__":
    main()
