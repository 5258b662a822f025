"""Training state in one pytree, the original's Adam, and the samples-seen schedules."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import serialization, struct

from ucluster_jax.config import Config, TrainConfig
from ucluster_jax.model.networks import init_variables

Array = jax.Array


class AdamState(NamedTuple):
    count: Array
    mu: Any
    nu: Any


def tf1_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam as TF1's AdamOptimizer: lr_t = sqrt(1-b2^t)/(1-b1^t), update m/(sqrt(v)+eps), unscaled by lr.

    (optax.adam puts eps inside the bias correction; the difference is tiny, but imported TF1
    optimizer slots then continue exactly.)
    """

    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return AdamState(jnp.zeros((), jnp.int32), zeros, jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        count = state.count + 1
        t = count.astype(jnp.float32)
        scale = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree_util.tree_map(lambda m, v: scale * m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, AdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


@struct.dataclass
class TrainState:
    step: Array  # optimizer steps taken
    samples_seen: Array  # global jets seen: drives the LR and BN-decay schedules
    params: Any
    batch_stats: Any
    opt_state: AdamState
    alpha: Array  # Deep k-Means softmax sharpness, set per epoch
    cluster_weight: Array  # 0 during pre-training, beta in the joint phase
    joint_lr: Array  # > 0: this epoch's joint-phase learning rate (train.joint_learning_rate); 0: the schedule
    nonfinite_steps: Array  # updates skipped because the loss or gradients were not finite
    first_nonfinite_step: Array  # -1 if none
    ema_params: Any = None  # with train.param_ema: the parameters' moving average over the joint phase


def _to_state_dict(state: TrainState) -> dict[str, Any]:
    return {f.name: serialization.to_state_dict(getattr(state, f.name)) for f in dataclasses.fields(TrainState)}


def _from_state_dict(target: TrainState, saved: dict[str, Any]) -> TrainState:
    """Checkpoints restore whether or not they kept the parameters' moving average: train.param_ema may be
    switched on or off across a resume (the average then starts at the checkpoint's parameters, or is
    dropped)."""
    saved = dict(saved)
    kept = saved.get("ema_params") or copy.deepcopy(saved["params"])
    saved["ema_params"] = None if target.ema_params is None else kept
    names = [f.name for f in dataclasses.fields(TrainState)]
    if set(saved) != set(names):
        raise ValueError(f"state fields {sorted(saved)}, expected {sorted(names)}")
    return target.replace(**{n: serialization.from_state_dict(getattr(target, n), saved[n], name=n) for n in names})


serialization.register_serialization_state(TrainState, _to_state_dict, _from_state_dict, override=True)


def create_state(cfg: Config) -> TrainState:
    variables = init_variables(cfg.model, cfg.train.seed)
    params = variables["params"]
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    return TrainState(
        step=i32(0), samples_seen=i32(0), params=params, batch_stats=variables["batch_stats"],
        opt_state=tf1_adam().init(params), alpha=jnp.float32(0.0), cluster_weight=jnp.float32(0.0),
        joint_lr=jnp.float32(0.0),
        nonfinite_steps=i32(0), first_nonfinite_step=i32(-1),
        ema_params=_copy(params) if cfg.train.param_ema > 0 else None)


def with_params(state: TrainState, params: Any) -> TrainState:
    """`state` with new parameters (the placed centroids); the moving average, where kept, restarts there."""
    return state.replace(params=params, ema_params=None if state.ema_params is None else _copy(params))


def scored(state: TrainState) -> TrainState:
    """The state whose parameters are scored and clustered with: the moving average where one is kept."""
    return state if state.ema_params is None else state.replace(params=state.ema_params)


def _copy(tree: Any) -> Any:
    """Arrays of their own: the step donates the state, and a buffer may not be donated twice."""
    return jax.tree_util.tree_map(jnp.array, tree)


def phase(cfg: Config, epoch: int) -> tuple[float, float, float]:
    """(alpha, cluster_weight, joint_lr) of an epoch: zeros while pre-training, then beta with alpha growing
    (SPEC section 3) and, where train.joint_learning_rate is set, that rate decayed per joint epoch."""
    t, lc = cfg.train, cfg.loss
    joint_epoch = epoch - t.pretrain_epochs
    if joint_epoch < 0:
        return 0.0, 0.0, 0.0
    lr = max(t.joint_learning_rate * t.joint_lr_decay ** joint_epoch, t.lr_min) if t.joint_learning_rate else 0.0
    return lc.alpha_scale * (joint_epoch + 2), lc.beta, lr


def learning_rate(samples_seen: Array, t: TrainConfig, world: int = 1, joint_lr: Array | float = 0.0) -> Array:
    """lr0 * rate^floor(samples / decay_samples), floored at lr_min (the original's staircase), or the
    epoch's `joint_lr` where one is set.

    With lr_scaling="linear", lr0 (and joint_lr) are multiplied by the world size, reached by a linear warm-up.
    """
    scale = world if t.lr_scaling == "linear" and world > 1 else 1
    lr = jnp.maximum(scale * t.learning_rate * t.lr_decay_rate ** jnp.floor(samples_seen / t.lr_decay_samples),
                     t.lr_min)
    lr = jnp.where(joint_lr > 0, scale * joint_lr, lr)
    if t.lr_scaling == "linear" and t.lr_warmup_samples > 0:
        lr = lr * jnp.minimum(1.0, (samples_seen + t.batch_size) / t.lr_warmup_samples)
    return lr
