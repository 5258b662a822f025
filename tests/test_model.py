"""The network is the original's function: shapes, parameter count, kNN, GAP layer, BatchNorm."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ucluster_jax.config import load_config
from ucluster_jax.model.batchnorm import BatchNorm, bn_decay
from ucluster_jax.model.knn import eta_phi_distance, knn_indices
from ucluster_jax.model.networks import UCluster, count_params, init_variables


def jets(b=4, n=100, real=40, seed=0, f=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, n, f)).astype(np.float32)
    x[:, real:] = 0.0
    return jnp.asarray(x)


@pytest.mark.parametrize("path", [None, "configs/wztop.yaml"])
def test_parameter_count_is_the_originals(path):
    cfg = load_config(path)
    assert count_params(init_variables(cfg.model, 0)["params"]) == 186_210


def test_jitted_initialiser_gives_the_bits_of_the_op_by_op_one():
    """init_variables is jitted for a fast start; the parameters must stay those of Flax's own init."""
    cfg = load_config(None, ["model.num_points=10", "model.k=3"]).model
    x = jnp.zeros((2, cfg.num_points, cfg.num_features), jnp.float32)
    eager = UCluster(cfg).init(jax.random.PRNGKey(3), x, train=True)
    jitted = init_variables(cfg, 3)
    assert jax.tree_util.tree_structure(eager) == jax.tree_util.tree_structure(jitted)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = init_variables(cfg, 4)["params"]  # and the seed still matters
    assert not np.array_equal(ravel_pytree(other)[0], ravel_pytree(jitted["params"])[0])


def test_knn_includes_self_and_skips_padding():
    x = jets(real=30)
    idx = np.asarray(knn_indices(eta_phi_distance(x), 10))
    assert idx.shape == (4, 100, 10)
    assert (idx[:, :30, 0] == np.arange(30)).all()  # nearest is the point itself
    assert (idx[:, :30] < 30).all()  # real points never pick padded ones


def test_knn_phi_wrap_term():
    # two points 2pi+0.1 apart in phi: the original adds 4pi^2 - 4pi|dphi| to the squared distance
    x = np.zeros((1, 3, 8), np.float32)
    x[0, :, 2] = 1.0
    x[0, 1, 1] = 2 * np.pi + 0.1
    d = np.asarray(eta_phi_distance(jnp.asarray(x)))
    dphi = 2 * np.pi + 0.1
    assert d[0, 0, 1] == pytest.approx(dphi**2 + 4 * np.pi**2 - 4 * np.pi * dphi, abs=1e-4)  # = (dphi - 2pi)^2
    assert d[0, 0, 1] < 0.02


def test_edge_dense_per_point_equals_per_edge():
    cfg = load_config(None).model
    x = jets()
    variables = init_variables(cfg, 1)
    for train in (True, False):
        kw = dict(train=train, decay=0.5, mutable=["batch_stats"]) if train else dict(train=False)
        a = UCluster(cfg, edge_per_point=True).apply(variables, x, **kw)
        b = UCluster(cfg, edge_per_point=False).apply(variables, x, **kw)
        a, b = (a[0], b[0]) if train else (a, b)
        for key in ("z", "logits", "dist"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=2e-5)


def test_batchnorm_matches_tf1_semantics():
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, size=(8, 5, 4)).astype(np.float32))
    bn = BatchNorm(epsilon=1e-3)
    v = bn.init(jax.random.PRNGKey(0), x, train=True, decay=0.9)
    assert np.all(np.asarray(v["batch_stats"]["mean"]) == 0) and np.all(np.asarray(v["batch_stats"]["var"]) == 0)
    y, upd = bn.apply(v, x, train=True, decay=0.9, mutable=["batch_stats"])
    xn = np.asarray(x).reshape(-1, 4)
    mean, var = xn.mean(0), xn.var(0)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 4), (xn - mean) / np.sqrt(var + 1e-3), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.1 * var, rtol=1e-5)
    y_eval = bn.apply({**v, "batch_stats": upd["batch_stats"]}, x, train=False, decay=0.9)
    np.testing.assert_allclose(np.asarray(y_eval).reshape(-1, 4), (xn - 0.1 * mean) / np.sqrt(0.1 * var + 1e-3),
                               rtol=1e-4)


def test_bn_decay_schedule():
    assert float(bn_decay(0)) == pytest.approx(0.5)
    assert float(bn_decay(499_999)) == pytest.approx(0.5)
    assert float(bn_decay(500_000)) == pytest.approx(0.75)
    assert float(bn_decay(1_000_000)) == pytest.approx(0.875)
    assert float(bn_decay(10_000_000)) == pytest.approx(0.99)


def test_mean_pooling_includes_padding_unless_masked():
    cfg = load_config(None).model
    x = jets(real=20)
    v = init_variables(cfg, 0)
    z = UCluster(cfg).apply(v, x, train=False)["z"]
    cfg_m = load_config(None, ["model.mask_padding=true"]).model
    zm = UCluster(cfg_m).apply(v, x, train=False)["z"]
    assert z.shape == (4, 3) and not np.allclose(z, zm)


def test_anomaly_variant_is_a_config_of_the_same_code():
    cfg = load_config("configs/anomaly.yaml").model
    x = jets(b=2, f=7)
    g = jnp.ones((2, 4))
    v = init_variables(cfg, 0)
    assert "global_expand" in v["params"]
    assert v["params"]["agg"]["dense"]["kernel"].shape == (864, 2)
    out = UCluster(cfg).apply(v, x, train=False, global_features=g)
    assert out["z"].shape == (2, 2)
    assert out["logits"].shape == (2, 100, 21)  # per-particle head
    assert out["dist"].shape == (2, 2)


def test_dense_hand_written_gradient_equals_autodiff():
    """`model.dense.matmul` (custom VJP, for speed) is the same function as `x @ w`, gradients included."""
    from ucluster_jax.model.dense import Dense, matmul

    with jax.enable_x64(True):
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
        x = jax.random.normal(k1, (4, 7, 5), jnp.float64)
        w = jax.random.normal(k2, (5, 6), jnp.float64)
        r = jax.random.normal(k3, (4, 7, 6), jnp.float64)
        ours = jax.grad(lambda x, w: jnp.sum(jnp.tanh(matmul(x, w)) * r), argnums=(0, 1))(x, w)
        ref = jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w) * r), argnums=(0, 1))(x, w)
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-13)
    # Same parameter names and initial values as flax's Dense (imported checkpoints rely on the names).
    import flax.linen as nn

    x32 = jnp.ones((2, 5))
    ours = Dense(6).init(jax.random.PRNGKey(0), x32)
    ref = nn.Dense(6, kernel_init=nn.initializers.glorot_uniform()).init(jax.random.PRNGKey(0), x32)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(ref)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def plain_matmul(x, w, dtype=None):
    return x @ w


def plain_dense_bn_relu(red, eps, dtype, x, w, bias, scale, beta):
    """Dense, BatchNorm (global-batch moments as tf.nn.moments), ReLU, written plainly: autodiff's reference."""
    red = red or (lambda v: v)
    z = x @ w + bias
    axes = tuple(range(z.ndim - 1))
    count = red(jnp.asarray(z.size // z.shape[-1], z.dtype))
    m = red(jnp.sum(z, axes)) / count
    v = red(jnp.sum(jnp.square(z - jax.lax.stop_gradient(m)), axes)) / count
    return jax.nn.relu((z - m) * jax.lax.rsqrt(v + eps) * scale + beta), m, v


def test_dense_bn_relu_backward_equals_autodiff_over_replicas():
    """`batchnorm.dense_bn_relu` (hand-written backward, for speed) is Dense, BatchNorm, ReLU: values,
    moments and every gradient, with the moments summed over two replicas (vmap's psum) as in training."""
    from ucluster_jax.model.batchnorm import dense_bn_relu

    eps = 1e-3
    with jax.enable_x64(True):
        ks = jax.random.split(jax.random.PRNGKey(5), 7)
        x = jax.random.normal(ks[0], (2, 3, 7, 5), jnp.float64)  # [replica, B, N, C]
        r = jax.random.normal(ks[1], (2, 3, 7, 6), jnp.float64)
        params = tuple(jax.random.normal(k, shape, jnp.float64)
                       for k, shape in zip(ks[2:], [(5, 6), (6,), (6,), (6,), (2, 6)]))
        red = lambda v: jax.lax.psum(v, "r")  # noqa: E731
        reference = partial(plain_dense_bn_relu, red, eps, None)

        def per_replica(f, x, rr, *p):
            def loss(*a):
                y, m, v = f(*a)
                return jnp.sum(jnp.tanh(y) * rr) + jnp.sum(m * p[-1][0]) + jnp.sum(v * p[-1][1]), (y, m, v)
            return jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, *p[:-1])

        results = [jax.vmap(partial(per_replica, f), in_axes=(0, 0) + (None,) * 5, axis_name="r")(x, r, *params)
                   for f in (reference, partial(dense_bn_relu, red, eps, None))]
        for a, b in zip(jax.tree_util.tree_leaves(results[0]), jax.tree_util.tree_leaves(results[1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


def test_bfloat16_matmuls_round_operands_and_sum_in_float32():
    """model.compute_dtype=bfloat16: a matmul is the float32 matmul of its operands rounded to bfloat16
    (products of bfloat16 are exact in float32), forward and in the hand-written backward, where the
    incoming gradient is rounded too; the result is float32."""
    from ucluster_jax.model.dense import matmul

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(6), 3)
    x, w, g = (jax.random.normal(k, s) for k, s in zip((k1, k2, k3), ((4, 7, 5), (5, 6), (4, 7, 6))))
    r = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    y, vjp = jax.vjp(lambda x, w: matmul(x, w, jnp.bfloat16), x, w)
    assert y.dtype == jnp.float32 and not np.array_equal(np.asarray(y), np.asarray(x @ w))
    np.testing.assert_allclose(np.asarray(y), np.asarray(r(x) @ r(w)), rtol=1e-6, atol=1e-6)
    dx, dw = vjp(g)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(r(g) @ r(w).T), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(r(x).reshape(-1, 5).T @ r(g).reshape(-1, 6)),
                               rtol=1e-6, atol=1e-5)


def test_bfloat16_model_keeps_float32_state_and_a_nearby_loss():
    """The whole model with bfloat16 matmuls: parameters, BatchNorm statistics, outputs and gradients stay
    float32, and the loss moves by rounding, not more (whether accuracy holds is a training question)."""
    from ucluster_jax.bench import synthetic_jets
    from ucluster_jax.losses import combined_loss

    d = synthetic_jets(8, 30, seed=4)
    x, tgt = jnp.asarray(d["x"]), jnp.asarray(d["target"])
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config(None, ["model.num_points=30", "model.k=5", f"model.compute_dtype={dtype}"]).model
        v = init_variables(cfg, 2)
        m = UCluster(cfg, edge_chunk=4)

        def loss(p, m=m, v=v):
            out, new = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True, decay=0.7,
                               mutable=["batch_stats"])
            return combined_loss(out, tgt, alpha=4.0, cluster_weight=1.0, gamma=2.0, focal_alpha=1.0)[0], (out, new)

        # compiled: a third of the op-by-op time
        (value, (out, new)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
        runs[dtype] = float(value), out, new, grads
    l32, (l16, o16, s16, g16) = runs["float32"][0], runs["bfloat16"]
    assert l16 != l32 and abs(l16 / l32 - 1) < 0.02
    leaves = jax.tree_util.tree_leaves((o16, s16, g16))
    assert all(a.dtype == jnp.float32 for a in leaves) and all(bool(jnp.all(jnp.isfinite(a))) for a in leaves)


def test_latent_norm_standardises_the_embedding_so_shrinking_it_does_not_pay():
    """model.latent_norm: BatchNorm without scale or bias on z, no new parameters; its output has zero mean
    and unit variance over the batch whatever the input's scale, so shrinking the latent (how the
    k-means loss falls without separating clusters) changes nothing after it."""
    cfg = load_config(None, ["model.latent_norm=true"]).model
    v = init_variables(cfg, 1)
    assert count_params(v["params"]) == 186_210 and set(v["batch_stats"]["latent_bn"]) == {"mean", "var"}
    assert "latent_bn" not in init_variables(load_config(None).model, 1)["batch_stats"]

    z = jnp.asarray(np.random.default_rng(0).normal(0.3, 1.0, size=(64, 3)).astype(np.float32))
    bn = BatchNorm(1e-6, affine=False)
    w = bn.init(jax.random.PRNGKey(0), z, train=True, decay=0.5)
    assert "params" not in w
    y = {c: np.asarray(bn.apply(w, c * z, train=True, decay=0.5, mutable=["batch_stats"])[0]) for c in (1.0, 0.1)}
    np.testing.assert_allclose(y[1.0].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y[1.0].var(0), 1.0, rtol=1e-3)
    np.testing.assert_allclose(y[0.1], y[1.0], rtol=1e-3, atol=1e-4)


def test_model_training_gradients_equal_autodiff_over_replicas(monkeypatch):
    """The speed path of the model (edges a few jets at a time and every hand-written backward pass)
    against `jax.grad` of a plain forward (x @ w, Dense-BatchNorm-ReLU as written, the unchunked GAP
    layer), two replicas with global-batch BatchNorm (vmap's psum), in float64 so rounding cannot
    hide a difference: losses, moving moments, gradients, and the inference outputs."""
    from ucluster_jax.bench import synthetic_jets
    from ucluster_jax.config import ModelConfig
    from ucluster_jax.losses import combined_loss
    from ucluster_jax.model import dense, gap

    cfg = ModelConfig(num_points=30, k=5)
    with jax.enable_x64(True):
        d = synthetic_jets(8, 30, seed=2)
        x = jnp.asarray(d["x"], jnp.float64).reshape(2, 4, 30, -1)
        tgt = jnp.asarray(d["target"]).reshape(2, 4, *d["target"].shape[1:])
        v = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) + 0.1, init_variables(cfg, 2))

        def run(chunk):
            m = UCluster(cfg, replica_sum=lambda a: jax.lax.psum(a, "r"), edge_chunk=chunk)

            def per_replica(x, t):
                def loss(p):
                    out, new = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                                       decay=0.7, mutable=["batch_stats"])
                    return combined_loss(out, t, alpha=4.0, cluster_weight=1.0, gamma=4.0, focal_alpha=10.0)[0], new
                return jax.value_and_grad(loss, has_aux=True)(v["params"])
            return jax.jit(jax.vmap(per_replica, axis_name="r"))(x, tgt)

        def infer(chunk):
            apply = jax.jit(lambda v, x: UCluster(cfg, edge_chunk=chunk).apply(v, x, train=False))
            return apply(v, x.reshape(8, 30, -1))

        fast = run(3)  # 4 jets per replica: chunks of 2
        infer_fast = infer(3)
        with monkeypatch.context() as mp:  # the plain forward: no custom VJP anywhere
            for module, name, plain in ((dense, "matmul", plain_matmul), (gap, "matmul", plain_matmul),
                                        (gap, "dense_bn_relu", plain_dense_bn_relu)):
                mp.setattr(module, name, plain)
            plain = run(0)
            infer_plain = infer(0)
        # Training averages the gradients over replicas: a parameter that acts only through the
        # global moments (the edge Dense bias, which BatchNorm cancels) may split its zero differently.
        (a, grads_a), (b, grads_b) = plain, fast
        sums = [jax.tree_util.tree_map(lambda g: jnp.sum(g, 0), g) for g in (grads_a, grads_b)]
        for p, q in zip(jax.tree_util.tree_leaves((a, sums[0])), jax.tree_util.tree_leaves((b, sums[1]))):
            np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-9, atol=1e-9)
        for p, q in zip(jax.tree_util.tree_leaves(infer_plain), jax.tree_util.tree_leaves(infer_fast)):
            np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-9, atol=1e-9)


KEEP_ALLOC_PROBE = """
import ctypes
libc = ctypes.CDLL(None)
libc.realloc.restype = ctypes.c_void_p
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
p, q = ctypes.c_void_p(), ctypes.c_void_p()
assert libc.posix_memalign(ctypes.byref(p), 4096, 128 << 20) == 0
ctypes.memset(p, 7, 128 << 20)
before = rss_mb()
libc.free(p)
dropped = before - rss_mb()
assert libc.posix_memalign(ctypes.byref(q), 64, 120 << 20) == 0
r = libc.realloc(q, 200 << 20)
print(dropped, q.value == p.value, ctypes.string_at(r, 1) == bytes([7]) if q.value == p.value else "-")
"""


def test_installed_allocator_wrapper_keeps_the_step_buffer_mapped():
    """The install builds `native/keep_alloc.c`; preloaded, a freed 128 MiB block stays resident and serves
    the next request of a similar size (realloc keeps its contents); with UCLUSTER_KEEP_MB=0 it goes back
    to the kernel as with glibc alone."""
    import os
    import subprocess
    import sys

    from ucluster_jax.host_tuning import KEEP_ALLOC

    assert KEEP_ALLOC.is_file(), f"{KEEP_ALLOC} missing: scripts/install.sh builds it"
    env = {**os.environ, "LD_PRELOAD": str(KEEP_ALLOC)}
    kept = subprocess.run([sys.executable, "-c", KEEP_ALLOC_PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.split()
    assert int(kept[0]) < 8 and kept[1:] == ["True", "True"]
    freed = subprocess.run([sys.executable, "-c", KEEP_ALLOC_PROBE], env={**env, "UCLUSTER_KEEP_MB": "0"},
                           capture_output=True, text=True, check=True).stdout.split()
    assert int(freed[0]) > 100


def test_cli_processes_start_with_the_speed_settings():
    """A program entry re-executes itself once with glibc's huge-page malloc tunable, XLA's AVX-512 flag and
    the allocator wrapper (unless another LD_PRELOAD is set)."""
    import os
    import subprocess
    import sys

    from ucluster_jax.host_tuning import tuned_env

    env = tuned_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4", "XLA_FLAGS": "--xla_cpu_prefer_vector_width=256"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
    assert env["XLA_FLAGS"] == "--xla_cpu_prefer_vector_width=256"  # the user's setting wins
    code = ("import os, sys; from ucluster_jax.host_tuning import tune_process; print('start', flush=True); "
            "tune_process(); print(os.environ.get('GLIBC_TUNABLES', '-'), os.environ['XLA_FLAGS'])")
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "UCLUSTER_NO_TUNING")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, "XLA_FLAGS": ""}, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert out[0] == out[1] == "start"  # ran twice: once as started, once re-executed
    assert "glibc.malloc.hugetlb=1" in out[2] and "--xla_cpu_prefer_vector_width=512" in out[2]
    assert tuned_env({})["LD_PRELOAD"].endswith("libucluster_keep_alloc.so")
    assert tuned_env({"LD_PRELOAD": "libjemalloc.so"})["LD_PRELOAD"] == "libjemalloc.so"  # another malloc: not mixed
    out = subprocess.run([sys.executable, "-c", code], env={**clean, "UCLUSTER_NO_TUNING": "1"},
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "start" and out[1].startswith("- ")  # no re-exec, no tunable
