"""One typed configuration, loaded from YAML with `key=value` command-line overrides.

Every deliberate deviation from the original UCluster is a named option here; the defaults and
`configs/wztop.yaml` are the original's 81 % run (SPEC section 3).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from ucluster_jax.data.features import MASS_KINDS
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
    # "bfloat16": the Dense/1x1-conv matmuls take bfloat16 operands and sum in float32 (tensor cores);
    # parameters, BatchNorm, the edge passes, losses and k-means stay float32
    compute_dtype: str = "float32"
    # deviation: standardise the embedding over the batch (BatchNorm without scale or bias) before the
    # centroid distances, so the k-means loss cannot fall by shrinking the whole latent (docs/RESULTS.md)
    latent_norm: bool = False


@dataclass(frozen=True)
class LossConfig:
    """Focal + Deep k-Means (SPEC section 3)."""

    focal_gamma: float = 2.0  # the 81 % run (configs/wztop_committed.yaml: the committed script's 4)
    focal_alpha: float = 1.0  # (committed: 10)
    beta: float = 10.0  # weight of the clustering loss in the joint phase (committed: 1)
    alpha_scale: float = 5.0  # alpha = alpha_scale * (epoch - pretrain_epochs + 2): 10 at the first joint epoch
    # per-particle targets (anomaly): "max_per_class" is the original's reduction (per event and class the
    # largest particle loss, then the mean over events and classes); "mean": over every particle
    point_reduce: str = "max_per_class"
    # the jet-level auxiliary target: "prepared" is the dataset's `target` column (the original's 20
    # mass bins, linear in mass); "linear" and "sqrt" recompute it from the `mass` column as
    # model.num_targets bins uniform in the mass or in sqrt(mass) over mass_range (GeV; under- and
    # overflow in the end bins)
    mass_bins: str = "prepared"
    mass_range: tuple[float, float] = (30.0, 200.0)
    # the mass the training data's `mass` column must hold, which the target's bins and the mass_valley
    # selection read: "jet" (the original's), "massless" or "softdrop" (`ucluster prepare --mass`)
    mass: str = "jet"


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedules and the two phases."""

    seed: int = 0
    epochs: int = 200
    pretrain_epochs: int = 21  # epochs 0..20 focal only; k-means after epoch 20 (committed script: 11)
    # > 1: pre-train seeds seed..seed+N-1, go on with the one whose k-means start splits W from Z along the
    # jet mass most closely (train/candidates.py); 1: the one seed, as the original
    pretrain_candidates: int = 1
    batch_size: int = 512  # global batch, over all ranks and devices
    learning_rate: float = 1e-3
    lr_decay_samples: int = 500_000
    lr_decay_rate: float = 0.5
    lr_min: float = 1e-5
    joint_learning_rate: float = 0.0  # > 0: lr of the first joint epoch (0: the schedule goes on, as the original)
    joint_lr_decay: float = 1.0  # joint_learning_rate x this per joint epoch, floored at lr_min
    # > 0: the joint phase also keeps an exponential moving average of the parameters (this decay per
    # step; the centroids included), and test scores, `ucluster evaluate` and the latent figures use it.
    # 0: the parameters as trained, as the original
    param_ema: float = 0.0
    lr_scaling: str = "global"  # "global" (same schedule as one process) or "linear" (x world, warm-up)
    lr_warmup_samples: int = 0  # used with lr_scaling="linear"
    bn_decay_init: float = 0.5
    bn_decay_rate: float = 0.5
    bn_decay_samples: int = 500_000
    bn_decay_clip: float = 0.99
    kmeans_restarts: int = 10
    kmeans_iters: int = 100
    # where the centroids start: "embedding", k-means++ on the pre-trained embeddings (the original); "mass",
    # the embeddings' means over the groups that k-means finds on mass ** kmeans_mass_power (no labels)
    kmeans_init: str = "embedding"
    kmeans_mass_power: float = 0.25
    kmeans_embeddings: str = "train_mode"  # original: BN with batch statistics; "eval_mode": moving stats
    shuffle: bool = False  # original: no shuffle (files in order); deviation: seeded per-epoch shuffle
    shuffle_buffer_row_groups: int = 4  # shuffle window: this many row groups' worth over all lanes
    data_lanes: int = 8  # epoch layout (docs/DATA.md): divides batch_size, a multiple of the processes
    eval_batch_size: int = 512  # jets per embedding batch: k-means input (with train_mode, BN statistics), scoring
    eval_every_samples: int = 0  # also score --test-data (and select_from_epoch's measure) every N joint-phase samples
                                 # (0: at epoch ends only)
    # > 0: from this (joint-phase) epoch on, at every test point and epoch end, measure the select_by criterion
    # of the two closest clusters on the first select_jets training jets (no labels), and keep the state
    # where it is lowest as the run's result (RUN/selected; train/select.py). 0: the last state
    select_from_epoch: int = 0
    select_every_samples: int = 0  # > 0: from select_from_epoch on, measure the criterion every N joint-phase
                                   # samples (more states to choose from; the test is still scored every
                                   # eval_every_samples); 0: at the test points
    select_jets: int = 15_000
    select_by: str = "boundary_density"  # or "mass_valley" (GeV from their mass edge to the jet-mass dip)
    checkpoint_every_steps: int = 0  # also checkpoint every N steps within an epoch (0: at epoch ends only)
    nonfinite: str = "stop"  # "stop" or "skip" (skip the update, count it)
    checksum_every: int = 200  # steps between cross-replica parameter checksums (0: only per epoch)
    keep_checkpoints: int = 3
    tensorboard: bool = True  # also write TensorBoard event files in RUN/tb (rank 0)
    tensorboard_latent_every: int = 10  # with tensorboard: the latent as a figure after every Nth epoch (0: never)


@dataclass(frozen=True)
class ParallelConfig:
    # BatchNorm moments over the global batch (one allreduce per BN layer and step, forward and backward:
    # the distributed step equals the single-process one). false: each replica normalises with its own
    # batch, a step needs only the gradient allreduce, and the moving averages are averaged over the
    # replicas whenever the state leaves the devices (checkpoints, scoring, each epoch's start).
    sync_bn: bool = True
    # > 0: every global batch is computed as this many fixed slices (each normalised with its own BN
    # moments, as sync_bn false), whatever the number of processes: one process runs them one after
    # another, R ranks (R dividing it) slices/R each, and the same update combines them. A run then has
    # the same bits in one process and under mpirun (same cores per process; docs/DATA.md, "Fixed slices").
    slices: int = 0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

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
            item = typ.__args__[0]  # tuple[int, int] widths, tuple[float, float] ranges
            return tuple(item(v) for v in value)
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


def _build(cls: type, data: dict[str, Any], where: str, only: tuple[str, ...] = (), path: str = "") -> Any:
    """`only` (key prefixes, with `path` the dotted key of `data`): an unknown key outside them, a
    training option removed since a finished run was made, is passed over rather than refused."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(k for k in set(data) - set(known) if not only or any((path + k).startswith(p) for p in only))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        if name not in known:
            continue
        default = getattr(cls(), name)
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}", only, f"{path}{name}.")
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


def config_from_dict(data: dict[str, Any], where: str = "config", only: tuple[str, ...] = ()) -> Config:
    """`only`: validate just the keys starting with these prefixes (see `validate`), and pass over a key
    outside them that this version no longer has (a training option removed since)."""
    cfg = _build(Config, data, where, only)
    validate(cfg, only)
    return cfg


def model_from_dict(data: dict[str, Any], where: str = "config.model") -> ModelConfig:
    """The model section alone, unvalidated: what a checkpoint's stored config is compared with."""
    return _build(ModelConfig, data, where)


# train.select_by's label-free criteria (computed in train.select, drawn in plots): one list of names
SELECT_BY = ("boundary_density", "mass_valley")


def criterion_in(records: list[dict[str, Any]]) -> str | None:
    """The select_by criterion these curve rows (or a kept state's sidecar) carry a value of, if any."""
    return next((k for k in SELECT_BY if any(k in r for r in records)), None)


def validate(cfg: Config, only: tuple[str, ...] = ()) -> None:
    """Refuse a value that would crash or silently misbehave later (a zero divisor, an empty k-means,
    a negative size), naming the key: one line from the CLI, exit status 2. `only` (key prefixes): the
    keys a reader of a finished run uses, so today's rules for training do not lock out an older run."""
    m, lo, t = cfg.model, cfg.loss, cfg.train
    positive = lambda *v: all(x > 0 for x in v)  # noqa: E731
    rules = [
        ("model.variant", m.variant in ("multiclass", "anomaly"), "multiclass or anomaly"),
        ("model.pooling", m.pooling in ("mean", "max"), "mean or max"),
        ("model.compute_dtype", m.compute_dtype in ("float32", "bfloat16"), "float32 or bfloat16"),
        ("model.num_points", m.num_points > 0, "> 0"),
        ("model.num_features", m.num_features > 0, "> 0"),
        ("model.k", 0 < m.k <= m.num_points, f"in 1..model.num_points ({m.num_points})"),
        ("model.gap1_width", m.gap1_width > 0, "> 0"),
        ("model.gap2_width", m.gap2_width > 0, "> 0"),
        ("model.conv1_widths", positive(*m.conv1_widths), "> 0 each"),
        ("model.conv2_widths", positive(*m.conv2_widths), "> 0 each"),
        ("model.latent_dim", m.latent_dim > 0, "> 0"),
        ("model.head_widths", positive(*m.head_widths), "> 0 each"),
        ("model.num_targets", m.num_targets > 0, "> 0"),
        ("model.num_clusters", m.num_clusters > 0, "> 0"),
        ("model.num_global", m.num_global >= 0, ">= 0"),
        ("model.global_width", m.global_width > 0, "> 0"),
        ("model.bn_epsilon", m.bn_epsilon > 0, "> 0"),
        ("loss.focal_gamma", lo.focal_gamma >= 0, ">= 0"),
        ("loss.point_reduce", lo.point_reduce in ("max_per_class", "mean"), "max_per_class or mean"),
        ("loss.mass_bins", lo.mass_bins in ("prepared", "linear", "sqrt"), "prepared, linear or sqrt"),
        ("loss.mass", lo.mass in MASS_KINDS, " or ".join(MASS_KINDS)),
        ("loss.mass_bins", lo.mass_bins == "prepared" or m.variant == "multiclass",
         "'prepared' under model.variant anomaly (its targets are per particle)"),
        ("loss.mass_range", len(lo.mass_range) == 2 and 0 <= lo.mass_range[0] < lo.mass_range[1],
         "two masses in GeV, 0 <= low < high"),
        ("train.epochs", t.epochs > 0, "> 0"),
        ("train.pretrain_epochs", 0 <= t.pretrain_epochs <= t.epochs, f"in 0..train.epochs ({t.epochs})"),
        ("train.pretrain_candidates", t.pretrain_candidates >= 1, ">= 1"),
        ("train.pretrain_candidates", t.pretrain_candidates == 1 or 0 < t.pretrain_epochs < t.epochs,
         "1 unless there are both pre-training and joint epochs"),
        ("train.batch_size", t.batch_size > 0, "> 0"),
        ("train.eval_batch_size", t.eval_batch_size > 0, "> 0"),
        ("train.learning_rate", t.learning_rate > 0, "> 0"),
        ("train.lr_decay_samples", t.lr_decay_samples > 0, "> 0"),
        ("train.lr_decay_rate", 0 < t.lr_decay_rate <= 1, "in (0, 1]"),
        ("train.lr_min", t.lr_min >= 0, ">= 0"),
        ("train.lr_scaling", t.lr_scaling in ("global", "linear"), "global or linear"),
        ("train.lr_warmup_samples", t.lr_warmup_samples >= 0, ">= 0"),
        ("train.bn_decay_init", 0 <= t.bn_decay_init <= 1, "in [0, 1]"),
        ("train.bn_decay_rate", 0 < t.bn_decay_rate <= 1, "in (0, 1]"),
        ("train.bn_decay_samples", t.bn_decay_samples > 0, "> 0"),
        ("train.bn_decay_clip", 0 <= t.bn_decay_clip <= 1, "in [0, 1]"),
        ("train.kmeans_restarts", t.kmeans_restarts >= 1, ">= 1"),
        ("train.kmeans_iters", t.kmeans_iters >= 1, ">= 1"),
        ("train.kmeans_init", t.kmeans_init in ("embedding", "mass"), "embedding or mass"),
        ("train.kmeans_mass_power", t.kmeans_mass_power > 0, "> 0"),
        ("train.kmeans_embeddings", t.kmeans_embeddings in ("train_mode", "eval_mode"), "train_mode or eval_mode"),
        ("train.shuffle_buffer_row_groups", t.shuffle_buffer_row_groups >= 1, ">= 1"),
        ("train.data_lanes", t.data_lanes > 0 and t.batch_size % t.data_lanes == 0,
         f"> 0 and divide train.batch_size ({t.batch_size})"),
        ("train.checkpoint_every_steps", t.checkpoint_every_steps >= 0, ">= 0 (0: at epoch ends only)"),
        ("train.nonfinite", t.nonfinite in ("stop", "skip"), "stop or skip"),
        ("train.checksum_every", t.checksum_every >= 0, ">= 0"),
        ("train.keep_checkpoints", t.keep_checkpoints >= 0, ">= 0 (0: keep all)"),
        ("train.eval_every_samples", t.eval_every_samples >= 0, ">= 0 (0: at epoch ends only)"),
        ("train.joint_learning_rate", t.joint_learning_rate >= 0, ">= 0 (0: the schedule)"),
        ("train.joint_lr_decay", 0 < t.joint_lr_decay <= 1, "in (0, 1]"),
        ("train.param_ema", 0 <= t.param_ema < 1, "in [0, 1)"),
        ("train.select_from_epoch", t.select_from_epoch == 0 or t.pretrain_epochs <= t.select_from_epoch < t.epochs,
         f"0 (off) or a joint-phase epoch, in [{t.pretrain_epochs}, {t.epochs})"),
        ("train.select_every_samples", t.select_every_samples >= 0, ">= 0 (0: at the test points)"),
        ("train.select_jets", t.select_jets > 0, "> 0"),
        ("train.select_by", t.select_by in SELECT_BY, " or ".join(SELECT_BY)),
        ("train.tensorboard_latent_every", t.tensorboard_latent_every >= 0, ">= 0 (0: never)"),
        ("parallel.slices", cfg.parallel.slices >= 0 and t.batch_size % max(cfg.parallel.slices, 1) == 0,
         f">= 0 (0: off) and divide train.batch_size ({t.batch_size})"),
    ]
    for key, ok, need in rules:
        if not ok and (not only or key.startswith(only)):
            section, name = key.split(".")
            raise ConfigError(f"{key}={getattr(getattr(cfg, section), name)!r}: must be {need}")
