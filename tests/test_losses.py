"""Focal and Deep k-Means losses against numpy references; the centroids' gradient by phase."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucluster_jax.config import ConfigError, load_config
from ucluster_jax.losses import focal_loss, kmeans_loss, kmeans_weights, mass_bin_target
from ucluster_jax.train.state import create_state
from ucluster_jax.train.step import make_grads_fn


def np_focal(logits, y, gamma, alpha):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    py = p[np.arange(len(y)), y]
    return np.mean(alpha * (1 - py) ** gamma * -np.log(py + 1e-9))


def np_kmeans(d, alpha):
    w = np.exp(-alpha * (d - d.min(1, keepdims=True)))
    w /= w.sum(1, keepdims=True)
    return np.mean((w * d).sum(1))


def test_focal_loss_matches_numpy():
    rng = np.random.default_rng(0)
    for gamma, alpha in ((4.0, 10.0), (2.0, 1.0), (0.0, 1.0)):
        logits = rng.normal(size=(64, 20)).astype(np.float32) * 3
        y = rng.integers(0, 20, 64)
        np.testing.assert_allclose(focal_loss(jnp.asarray(logits), jnp.asarray(y), gamma, alpha),
                                   np_focal(logits.astype(np.float64), y, gamma, alpha), rtol=1e-5)


def test_focal_gamma0_alpha1_is_cross_entropy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(16, 5)).astype(np.float32)
    y = rng.integers(0, 5, 16)
    ce = -jax.nn.log_softmax(logits)[np.arange(16), y].mean()
    np.testing.assert_allclose(focal_loss(jnp.asarray(logits), jnp.asarray(y), 0.0, 1.0), ce, rtol=1e-5)


def test_kmeans_loss_matches_numpy_and_its_gradient():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(32, 3))
    mu = rng.normal(size=(3, 3))
    for alpha in (4.0, 50.0, 380.0):
        d = ((z[:, None] - mu[None]) ** 2).sum(-1)
        np.testing.assert_allclose(kmeans_loss(jnp.asarray(d, jnp.float32), alpha), np_kmeans(d, alpha), rtol=1e-5)
    # gradient through distances, weights included: compare with central differences in float64
    jax.config.update("jax_enable_x64", True)
    try:
        f = lambda m: kmeans_loss(jnp.sum((jnp.asarray(z)[:, None] - m[None]) ** 2, -1), 4.0)  # noqa: E731
        g = np.asarray(jax.grad(f)(jnp.asarray(mu)))
        eps = 1e-6
        num = np.zeros_like(mu)
        for i in np.ndindex(mu.shape):
            dm = np.zeros_like(mu)
            dm[i] = eps
            num[i] = (float(f(jnp.asarray(mu + dm))) - float(f(jnp.asarray(mu - dm)))) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-8)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_centroids_get_gradient_only_in_the_clustering_phase():
    cfg = load_config(None)
    state = create_state(cfg)
    state = state.replace(params={**state.params, "mu": jnp.asarray(np.random.default_rng(0).normal(size=(3, 3)),
                                                                    jnp.float32)})
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 100, 8)).astype(np.float32)
    batch = {"x": jnp.asarray(x), "target": jnp.asarray(rng.integers(0, 20, 8)), "label": jnp.zeros(8, jnp.int32)}
    grads_fn = jax.jit(make_grads_fn(cfg))
    g_pre, _, _ = grads_fn(state.replace(alpha=jnp.float32(0), cluster_weight=jnp.float32(0)), batch)
    g_joint, _, _ = grads_fn(state.replace(alpha=jnp.float32(4), cluster_weight=jnp.float32(1)), batch)
    assert np.all(np.asarray(g_pre["mu"]) == 0)
    assert np.abs(np.asarray(g_joint["mu"])).sum() > 0
    # the clustering loss also reaches the network through z
    diff = np.abs(np.asarray(g_joint["agg"]["dense"]["kernel"]) - np.asarray(g_pre["agg"]["dense"]["kernel"])).sum()
    assert diff > 0


def test_per_particle_focal_reductions_match_the_original_seg_loss():
    """models/gapnet_seg.py get_focal_loss: fl = alpha*onehot*(1-p)^g*-log(p) [B,N,C], reduce_max over the
    point axis, mean over events and classes."""
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(5, 7, 21)) * 3
    y = rng.integers(0, 21, size=(5, 7))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(21)[y]
    fl = 10.0 * onehot * (1 - (p + 1e-9)) ** 2 * -np.log(p + 1e-9)
    got = focal_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(y), 2.0, 10.0, "max_per_class")
    np.testing.assert_allclose(got, fl.max(axis=1).mean(), rtol=2e-5)
    mean = focal_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(y), 2.0, 10.0, "mean")
    np.testing.assert_allclose(mean, fl.sum(-1).mean(), rtol=2e-5)
    assert float(got) != float(mean)


@pytest.mark.parametrize("scale,f,f_inv", [("linear", lambda v: v, lambda v: v), ("sqrt", np.sqrt, np.square)])
def test_mass_bins_are_uniform_in_their_scale_with_open_ends(scale, f, f_inv):
    lo, hi, n = 30.0, 200.0, 40
    edges = f_inv(f(lo) + np.arange(n + 1) * (f(hi) - f(lo)) / n)
    inside = np.concatenate([edges[:-1] * 1.0005, edges[1:] * 0.9995])  # just inside each bin's two ends
    expect = np.concatenate([np.arange(n), np.arange(n)])
    got = mass_bin_target(jnp.asarray(inside, jnp.float32), n, (lo, hi), scale)
    np.testing.assert_array_equal(np.asarray(got), expect)
    ends = np.asarray(mass_bin_target(jnp.asarray([0.0, 10.0, 250.0, 1e4]), n, (lo, hi), scale))
    np.testing.assert_array_equal(ends, [0, 0, n - 1, n - 1])


def test_mass_bins_replace_the_prepared_target_in_the_step():
    """With loss.mass_bins=sqrt the step's focal target comes from the jets' mass, not the target column."""
    rng = np.random.default_rng(4)
    mass = rng.uniform(40, 200, 8).astype(np.float32)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 100, 8)).astype(np.float32)), "mass": jnp.asarray(mass),
             "label": jnp.zeros(8, jnp.int32)}
    sqrt_target = mass_bin_target(jnp.asarray(mass), 20, (30.0, 200.0), "sqrt")
    zeros = jnp.zeros(8, jnp.int32)
    cfg = load_config(None)
    state = create_state(cfg)

    def grads(overrides, target):
        g, _, _ = jax.jit(make_grads_fn(load_config(None, overrides)))(state, {**batch, "target": target})
        return np.asarray(g["agg"]["dense"]["kernel"])

    from_mass = grads(["loss.mass_bins=sqrt"], zeros)
    np.testing.assert_allclose(from_mass, grads(["loss.mass_bins=prepared"], sqrt_target), rtol=1e-6, atol=1e-9)
    assert np.abs(from_mass - grads(["loss.mass_bins=prepared"], zeros)).max() > 1e-6


def test_kmeans_weights_are_the_losses_soft_assignment():
    d = jnp.asarray([[0.0016, 0.0017, 0.45], [0.1, 0.3, 0.5]], jnp.float32)
    w = np.asarray(kmeans_weights(d, 45.0))
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    assert abs(w[0, 0] - w[0, 1]) < 0.01 and w[0, 2] < 1e-6  # distances 1e-4 apart at alpha 45: no pull either way
    assert w[1, 0] > 0.99  # distances apart by 0.2 at alpha 45: a hard assignment
    np.testing.assert_allclose(kmeans_loss(d, 45.0), np.mean(np.sum(w * np.asarray(d), 1)), rtol=1e-6)


def test_mass_bins_from_the_mass_need_not_match_the_datasets_target_count(toy_small):
    """With the target recomputed from the mass the model's head may have any number of bins; with the
    prepared target it must match the dataset's."""
    from ucluster_jax.data.reader import ParquetDataset
    from ucluster_jax.errors import DataError
    from ucluster_jax.train.loop import check_data

    ds = ParquetDataset(toy_small[0])
    base = [f"model.num_points={ds.meta.num_points}", f"model.num_targets={ds.meta.num_targets + 14}"]
    check_data(load_config(None, base + ["loss.mass_bins=linear"]), ds, toy_small[0])
    with pytest.raises(DataError, match="the config's model expects"):
        check_data(load_config(None, base), ds, toy_small[0])


def test_training_refuses_data_prepared_with_another_mass(toy_small):
    """loss.mass names the mass the target and the selection read; data prepared with the other one is a
    one-line error naming the file, before any training."""
    from ucluster_jax.data.reader import ParquetDataset
    from ucluster_jax.errors import DataError
    from ucluster_jax.train.loop import check_mass

    ds = ParquetDataset(toy_small[0])
    assert ds.meta.mass == "jet"
    check_mass(load_config(None, []), ds, toy_small[0])
    with pytest.raises(DataError, match=r"holds the jet mass, the config wants loss.mass: softdrop") as e:
        check_mass(load_config(None, ["loss.mass=softdrop"]), ds, toy_small[0])
    assert str(toy_small[0]) in str(e.value)
    with pytest.raises(ConfigError, match="loss.mass"):
        load_config(None, ["loss.mass=groomed"])
