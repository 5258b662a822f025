"""One typed configuration, loaded from YAML with `key=value` command-line overrides.

Every deliberate deviation from the original UCluster is a named option here; the defaults and
`configs/wztop.yaml` are the original's behaviour.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from ucluster_jax.errors import UserError


class ConfigError(UserError):
    """A configuration file or override that cannot be used."""


@dataclass(frozen=True)
class ModelConfig:
    """ABCNet trunk + UCluster head (SPEC section 2)."""

    variant: str = "multiclass"  # "multiclass" (W/Z/top) or "anomaly" (LHC Olympics, per-particle head)
    num_points: int = 100
    num_features: int = 8
    k: int = 10
    gap1_width: int = 16
    gap2_width: int = 128
    conv1_widths: tuple[int, int] = (64, 128)
    conv2_widths: tuple[int, int] = (256, 256)
    latent_dim: int = 3
    head_widths: tuple[int, int] = (256, 128)
    num_targets: int = 20
    num_clusters: int = 3
    num_global: int = 0  # anomaly: 4 global features, joined through a 16-wide 1x1 conv
    global_width: int = 16
    pooling: str = "mean"  # "mean" (multiclass original) or "max" (anomaly original)
    padding_penalty: float = 1000.0
    mask_padding: bool = False  # deviation: exclude padded points from pooling and BN statistics
    bn_epsilon: float = 1e-3


@dataclass(frozen=True)
class LossConfig:
    """Focal + Deep k-Means (SPEC section 3)."""

    focal_gamma: float = 4.0
    focal_alpha: float = 10.0
    beta: float = 1.0  # weight of the clustering loss in the joint phase
    alpha_scale: float = 2.0  # alpha = alpha_scale * (epoch - pretrain_epochs + 2): 4 at the first joint epoch


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedules and the two phases."""

    seed: int = 0
    epochs: int = 200
    pretrain_epochs: int = 11  # epochs 0..10 focal only; k-means after epoch 10
    batch_size: int = 512  # global batch, over all ranks and devices
    learning_rate: float = 1e-3
    lr_decay_samples: int = 500_000
    lr_decay_rate: float = 0.5
    lr_min: float = 1e-5
    lr_scaling: str = "global"  # "global" (same schedule as one process) or "linear" (x world, warm-up)
    lr_warmup_samples: int = 0  # used with lr_scaling="linear"
    bn_decay_init: float = 0.5
    bn_decay_rate: float = 0.5
    bn_decay_samples: int = 500_000
    bn_decay_clip: float = 0.99
    kmeans_restarts: int = 10
    kmeans_iters: int = 100
    kmeans_embeddings: str = "train_mode"  # original: BN with batch statistics; "eval_mode": moving stats
    shuffle: bool = False  # original: no shuffle (files in order); deviation: seeded per-epoch shuffle
    shuffle_buffer_row_groups: int = 4  # shuffle window: this many row groups' worth over all lanes
    data_lanes: int = 8  # epoch layout (docs/DATA.md): divides batch_size, a multiple of the processes
    eval_batch_size: int = 512  # jets per embedding batch: k-means input (with train_mode, BN statistics), scoring
    checkpoint_every_steps: int = 0  # also checkpoint every N steps within an epoch (0: at epoch ends only)
    nonfinite: str = "stop"  # "stop" or "skip" (skip the update, count it)
    checksum_every: int = 200  # steps between cross-replica parameter checksums (0: only per epoch)
    keep_checkpoints: int = 3


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a YAML/override value to the declared field type, or fail naming the key."""
    origin = getattr(typ, "__origin__", None)
    try:
        if origin is tuple:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return tuple(int(v) for v in value)
        if typ is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise TypeError
                return low in ("true", "1", "yes")
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(float(value)) if isinstance(value, str) else int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError, yaml.YAMLError):
        pass
    else:
        return value
    raise ConfigError(f"{where}: cannot use {value!r} as {getattr(typ, '__name__', typ)}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hints[name], f"{where}.{name}")
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML (safe loader only) and apply `section.key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"{p}: cannot read config ({e.strerror})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        where = str(p)
    else:
        where = "config"
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected section.key=value")
        key, value = ov.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {ov!r}: not a valid YAML value ({str(e).splitlines()[0]})") from None
        _set_path(data, key.strip(), parsed)
    cfg = _build(Config, data, where)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], where: str = "config") -> Config:
    cfg = _build(Config, data, where)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    checks = [
        (m.variant in ("multiclass", "anomaly"), f"model.variant must be multiclass or anomaly, got {m.variant}"),
        (m.pooling in ("mean", "max"), f"model.pooling must be mean or max, got {m.pooling}"),
        (0 < m.k <= m.num_points, f"model.k={m.k} must be in 1..num_points"),
        (t.batch_size > 0, "train.batch_size must be positive"),
        (t.data_lanes > 0 and t.batch_size % t.data_lanes == 0,
         f"train.data_lanes={t.data_lanes} must divide train.batch_size={t.batch_size}"),
        (t.eval_batch_size > 0, "train.eval_batch_size must be positive"),
        (t.shuffle_buffer_row_groups > 0, "train.shuffle_buffer_row_groups must be positive"),
        (t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be >= 0"),
        (t.lr_scaling in ("global", "linear"), "train.lr_scaling must be global or linear"),
        (t.kmeans_embeddings in ("train_mode", "eval_mode"), "train.kmeans_embeddings must be train_mode or eval_mode"),
        (t.nonfinite in ("stop", "skip"), "train.nonfinite must be stop or skip"),
        (0 <= t.pretrain_epochs, "train.pretrain_epochs must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
