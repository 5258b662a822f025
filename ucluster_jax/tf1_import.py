"""`ucluster import-tf1`: turn an original UCluster TensorFlow 1 checkpoint into a run directory.

The checkpoint is read with the pure-numpy bundle reader (no TensorFlow). Every tensor is placed by
an explicit table, generated from the short layer spec `LAYERS` below (docs/TF1_IMPORT.md prints
the whole table): weights, biases, BatchNorm gamma/beta and moving averages, the centroids `mu`,
both Adam slots of every trainable variable, and the global step. The result is a `TrainState`
saved with `ucluster_jax.checkpoint` next to the config, so `ucluster evaluate --run` and
`ucluster train --resume` accept it like any run of ours.

Nothing is guessed silently: a checkpoint tensor that no rule uses, a variable of ours that no
tensor fills, or a shape that disagrees is reported, and the import is refused unless
`--allow-partial` (then the variables without a source keep their seeded initial values and zero
Adam slots).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ucluster_jax.config import Config, ModelConfig, load_config
from ucluster_jax.errors import CheckpointError, UserError

# ----------------------------------------------------------------------------------------- the spec
# One row per original layer scope:
#   (original scope, our kernel path or None, our bias path or None, our BatchNorm path or None, conv)
# `conv`: the original ran it as a 1x1 conv2d, so its kernel is [1,1,Cin,Cout] and loses the leading
# ones; fully connected layers (the jet head fc1..fc3) have [Cin,Cout] kernels, copied as they are.
# "gap1" is the original "layerfilter0" graph-attention block, "gap2" is "layerfilter1". The GAP
# output bias came from tf.contrib.layers.bias_add, which opened its own "BiasAdd" scope (and
# "BiasAdd_1" the second time): it has no kernel. `mu` and the step are single tensors, below.
Row = tuple[str, str | None, str | None, str | None, bool]


def _gap(tf_layer: str, ours: str, bias_add_scope: str) -> list[Row]:
    return [
        (f"{tf_layer}_newfea_conv_head_0", f"{ours}/newfea/dense/kernel", None, f"{ours}/newfea/bn", True),
        (f"{tf_layer}_edgefea_0", f"{ours}/edge_kernel", f"{ours}/edge_bias", f"{ours}/edge_bn", True),
        (f"{tf_layer}_self_att_conv_head_0", f"{ours}/self_att/dense/kernel", f"{ours}/self_att/dense/bias",
         f"{ours}/self_att/bn", True),
        (f"{tf_layer}_neib_att_conv_head_0", f"{ours}/neib_att/dense/kernel", f"{ours}/neib_att/dense/bias",
         f"{ours}/neib_att/bn", True),
        (bias_add_scope, None, f"{ours}/bias", None, False),
    ]


def _conv_bn(name: str, conv: bool = True) -> Row:
    """A 1x1 conv (or fully connected layer) with bias and BatchNorm; same scope name on both sides."""
    return (name, f"{name}/dense/kernel", f"{name}/dense/bias", f"{name}/bn", conv)


def layer_spec(model: ModelConfig) -> list[Row]:
    """The layers of the original network, in graph order, for this model config."""
    per_particle_head = model.variant == "anomaly"  # the anomaly head is 1x1 convs on every point
    rows = [*_gap("layerfilter0", "gap1", "BiasAdd")]
    rows += [_conv_bn("gapnet01"), _conv_bn("gapnet02")]
    rows += [*_gap("layerfilter1", "gap2", "BiasAdd_1")]
    rows += [_conv_bn("gapnet11"), _conv_bn("gapnet12")]
    if model.num_global:
        # Anomaly model only. The scope name follows ours; it is not verified against an original
        # anomaly checkpoint (none is shipped): a different name shows up as unmapped/missing.
        rows.append(_conv_bn("global_expand"))
    rows += [_conv_bn("agg"), _conv_bn("fc1", per_particle_head), _conv_bn("fc2", per_particle_head)]
    rows.append(("fc3", "fc3/kernel", "fc3/bias", None, per_particle_head))  # logits: no BatchNorm, no ReLU
    return rows


# TF1 names inside a layer scope S.  tf.nn.moments under name scope "S/bn/moments" squeezes the mean
# ("Squeeze") and the variance ("Squeeze_1"); ExponentialMovingAverage names its shadow variable
# after the averaged tensor, inside the variable scope "S/bn".
TF_KERNEL = "{s}/weights"
TF_BIAS = "{s}/biases"
TF_GAMMA = "{s}/bn/gamma"
TF_BETA = "{s}/bn/beta"
TF_MOVING_MEAN = "{s}/bn/{s}/bn/moments/Squeeze/ExponentialMovingAverage"
TF_MOVING_VAR = "{s}/bn/{s}/bn/moments/Squeeze_1/ExponentialMovingAverage"
TF_ADAM_M, TF_ADAM_V = "{v}/Adam", "{v}/Adam_1"  # AdamOptimizer slots "m" and "v"
TF_STEP = "Variable"  # tf.Variable(0): the global step, advanced by both minimize ops
TF_BETA_POWERS = {"beta1_power": 0.9, "beta2_power": 0.999}  # Adam's running b^t, checked only


# --------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Rule:
    """One checkpoint tensor -> one or more leaves of our TrainState."""

    tf_name: str
    targets: tuple[str, ...]  # "params/gap1/edge_kernel", "opt_state/mu/...", "step", ...
    op: str  # "copy"; "squeeze11": [1,1,Cin,Cout] conv kernel -> [Cin,Cout]; "check": verified, not stored
    note: str = ""


def build_table(model: ModelConfig) -> list[Rule]:
    """The full mapping, original name -> our path(s), generated from `layer_spec`."""
    trainable: list[Rule] = []
    stats: list[Rule] = []
    for scope, kernel, bias, bn, conv in layer_spec(model):
        fmt = dict(s=scope)
        if kernel:
            trainable.append(Rule(TF_KERNEL.format(**fmt), (f"params/{kernel}",), "squeeze11" if conv else "copy"))
        if bias:
            trainable.append(Rule(TF_BIAS.format(**fmt), (f"params/{bias}",), "copy"))
        if bn:
            trainable.append(Rule(TF_GAMMA.format(**fmt), (f"params/{bn}/scale",), "copy"))
            trainable.append(Rule(TF_BETA.format(**fmt), (f"params/{bn}/bias",), "copy"))
            stats.append(Rule(TF_MOVING_MEAN.format(**fmt), (f"batch_stats/{bn}/mean",), "copy", "moving mean"))
            stats.append(Rule(TF_MOVING_VAR.format(**fmt), (f"batch_stats/{bn}/var",), "copy", "moving variance"))
    trainable.append(Rule("mu", ("params/mu",), "copy", "centroids"))
    slots = []
    for r in trainable:
        ours = r.targets[0].removeprefix("params/")
        slots.append(Rule(TF_ADAM_M.format(v=r.tf_name), (f"opt_state/mu/{ours}",), r.op, "Adam m"))
        slots.append(Rule(TF_ADAM_V.format(v=r.tf_name), (f"opt_state/nu/{ours}",), r.op, "Adam v"))
    scalars = [Rule(TF_STEP, ("step", "opt_state/count"), "copy", "global step = Adam step count")]
    scalars += [Rule(n, (), "check", f"must equal {b}^step (float32)") for n, b in TF_BETA_POWERS.items()]
    return trainable + stats + slots + scalars


# ------------------------------------------------------------------------------------ the mapping
@dataclass
class ImportReport:
    mapped: list[str] = field(default_factory=list)  # checkpoint names placed (or checked), in table order
    unmapped: list[str] = field(default_factory=list)  # checkpoint names no rule uses
    missing: list[str] = field(default_factory=list)  # "our/path (from NAME)": a rule whose tensor is absent
    no_rule: list[str] = field(default_factory=list)  # our leaves no rule writes
    bad_shape: list[str] = field(default_factory=list)  # "NAME [shape] -> our/path [shape]"
    notes: list[str] = field(default_factory=list)
    step: int = 0
    epoch: int = 0
    source: str = ""  # the checkpoint prefix read

    @property
    def complete(self) -> bool:
        return not (self.unmapped or self.missing or self.no_rule or self.bad_shape)

    def problems(self, limit: int | None = None) -> list[str]:
        """One line per kind of problem, naming the variables (the first `limit` of each)."""
        out = []
        for title, items in (("checkpoint tensors left unmapped", self.unmapped),
                             ("variables of ours with no source", self.missing + self.no_rule),
                             ("shape disagreements", self.bad_shape)):
            if items:
                shown = items if limit is None or len(items) <= limit else items[:limit] + [
                    f"... ({len(items) - limit} more)"]
                out.append(f"{len(items)} {title}: {', '.join(shown)}")
        return out


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
    else:
        out[prefix] = tree
    return out


def _unflatten(flat: dict[str, Any], prefix: str) -> dict:
    root: dict = {}
    for path, v in flat.items():
        if not path.startswith(prefix + "/"):
            continue
        parts = path[len(prefix) + 1:].split("/")
        node = root
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return root


def _leaves(state) -> dict[str, Any]:
    """Our state's leaves (arrays or shape structs) as path -> leaf: the ones a checkpoint can fill."""
    flat = {"step": state.step, "opt_state/count": state.opt_state.count}
    flat.update(_flatten(state.params, "params"))
    flat.update(_flatten(state.batch_stats, "batch_stats"))
    flat.update(_flatten(state.opt_state.mu, "opt_state/mu"))
    flat.update(_flatten(state.opt_state.nu, "opt_state/nu"))
    return flat


def _transform(value: np.ndarray, op: str, want: tuple[int, ...]) -> np.ndarray | None:
    """The tensor in our layout, or None if its shape cannot be ours."""
    if op == "squeeze11":  # a 1x1 conv2d kernel [1,1,Cin,Cout] -> [Cin,Cout]
        if value.shape != (1, 1, *want):
            return None
        return value.reshape(want)
    return value if value.shape == want else None


def _beta_power_note(name: str, value: float, base: float, step: int) -> tuple[str, bool]:
    """TF1 Adam keeps b^t in float32, multiplied once per step: rounding error grows ~ t ulp."""
    expected = base ** step
    tol = expected * (step + 1) * 2.0**-23 + 2.0**-126  # relative drift, plus float32's normal floor
    ok = abs(value - expected) <= tol
    what = "underflows to 0 in float32" if expected < 2.0**-149 else f"{expected:.6g}"
    verdict = "consistent" if ok else "INCONSISTENT: the Adam step count differs from the global step"
    return f"{name} = {value:.6g}, {base}^{step} = {what}: {verdict}", ok


def convert(tensors: dict[str, np.ndarray], cfg: Config, *, epoch: int | None = None,
            allow_partial: bool = False):
    """Map checkpoint tensors onto a TrainState of `cfg`. Returns (state, report).

    Raises CheckpointError naming the variables when the import is incomplete and not allowed.
    """
    import jax
    import jax.numpy as jnp

    from ucluster_jax.train.state import phase
    from ucluster_jax.train.state import AdamState, TrainState, create_state

    ours = _leaves(jax.eval_shape(lambda: create_state(cfg)))  # shapes and dtypes only: no init cost
    table = build_table(cfg.model)
    rep = ImportReport()
    filled: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for rule in table:
        if rule.tf_name not in tensors:
            if rule.op == "check":
                rep.notes.append(f"{rule.tf_name} absent: the Adam step count is not cross-checked")
            rep.missing += [f"{t} (from {rule.tf_name})" for t in rule.targets]
            continue
        value = np.asarray(tensors[rule.tf_name])
        used.add(rule.tf_name)
        if rule.op == "check":
            rep.mapped.append(rule.tf_name)
            continue
        ok = True
        for target in rule.targets:
            if target not in ours:
                rep.bad_shape.append(f"{rule.tf_name} {list(value.shape)} -> {target}: no such variable of ours")
                ok = False
                continue
            want = ours[target]
            out = _transform(value, rule.op, want.shape)
            if out is None:
                rep.bad_shape.append(f"{rule.tf_name} {list(value.shape)} -> {target} {list(want.shape)}")
                ok = False
                continue
            if out.dtype.kind != want.dtype.kind:
                rep.bad_shape.append(f"{rule.tf_name} {out.dtype} -> {target} {want.dtype}")
                ok = False
                continue
            filled[target] = out.astype(want.dtype, copy=False)
        if ok:
            rep.mapped.append(rule.tf_name)
    rep.unmapped = sorted(set(tensors) - used)
    written = {t for r in table for t in r.targets}
    rep.no_rule = sorted(set(ours) - written)

    step = int(filled["step"]) if "step" in filled else 0
    rep.step = step
    for name, base in TF_BETA_POWERS.items():
        if name in tensors:
            line, _ = _beta_power_note(name, float(np.asarray(tensors[name])), base, step)
            rep.notes.append(line)
    epoch = cfg.train.epochs - 1 if epoch is None else int(epoch)
    if epoch < 0:
        raise UserError(f"--epoch {epoch}: must be >= 0")
    rep.epoch = epoch
    if step and step % (epoch + 1) == 0:
        rep.notes.append(f"step {step} = {epoch + 1} epochs x {step // (epoch + 1)} steps "
                         f"(about {step // (epoch + 1) * cfg.train.batch_size:,} training jets per epoch at batch "
                         f"{cfg.train.batch_size}, last partial batch dropped)")
    elif step:
        rep.notes.append(f"step {step} is not a multiple of {epoch + 1} epochs: check --epoch")
    samples = step * cfg.train.batch_size
    if samples >= 2**31:
        raise CheckpointError(f"step {step} x batch {cfg.train.batch_size} overflows the int32 samples counter")

    if not rep.complete and not allow_partial:
        raise CheckpointError("refusing a partial import (use --allow-partial to keep initial values for "
                              "variables without a source): " + "; ".join(rep.problems(limit=8)))
    if not rep.complete:
        rep.notes.append("PARTIAL import: " + "; ".join(rep.problems(limit=8)))

    if len(filled) < len(ours):  # partial: the rest keeps the seeded initial values, as a fresh run
        merged = {k: np.asarray(v) for k, v in _leaves(create_state(cfg)).items()}
        merged.update(filled)
    else:
        merged = filled
    alpha, weight, joint_lr = phase(cfg, epoch)
    mu = merged["params/mu"]
    if epoch >= cfg.train.pretrain_epochs and not np.any(mu):
        rep.notes.append(f"epoch {epoch} is a joint-phase epoch but the centroids are all zero")
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    state = TrainState(
        step=i32(merged["step"]),
        samples_seen=i32(samples),
        params=_tree(merged, "params"),
        batch_stats=_tree(merged, "batch_stats"),
        opt_state=AdamState(i32(merged["opt_state/count"]), _tree(merged, "opt_state/mu"),
                            _tree(merged, "opt_state/nu")),
        alpha=jnp.float32(alpha), cluster_weight=jnp.float32(weight), joint_lr=jnp.float32(joint_lr),
        nonfinite_steps=i32(0), first_nonfinite_step=i32(-1),
    )
    return state, rep


def _tree(flat: dict[str, np.ndarray], prefix: str) -> dict:
    import jax

    return jax.tree_util.tree_map(lambda a: jax.numpy.asarray(a), _unflatten(flat, prefix))


# ------------------------------------------------------------------------------------ the command
def import_tf1(prefix: str | Path, cfg: Config, out: Path, *, epoch: int | None = None,
               allow_partial: bool = False) -> tuple[Path, ImportReport]:
    """Read, map, and write a run directory (config.json + one checkpoint). Returns (ckpt path, report)."""
    import jax

    from ucluster_jax import checkpoint
    from ucluster_jax.tf1.bundle import read_tf1_checkpoint, resolve_tf1_prefix

    out = Path(out)
    if checkpoint.list_checkpoints(out):
        raise UserError(f"{out}: already holds checkpoints; import into a new run directory")
    prefix = resolve_tf1_prefix(prefix)
    tensors = read_tf1_checkpoint(prefix)
    state, rep = convert(tensors, cfg, epoch=epoch, allow_partial=allow_partial)
    rep.source = str(prefix)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(out / "config.json", json.dumps(cfg.to_dict(), indent=1))
    meta = {"epoch": rep.epoch, "config": cfg.to_dict(), "world": 1, "replicas": 1, "engine": "tf1-import",
            "tf1_import": {"checkpoint": str(prefix), "mapped": len(rep.mapped), "unmapped": rep.unmapped,
                           "no_source": rep.missing + rep.no_rule, "bad_shape": rep.bad_shape,
                           "notes": rep.notes}}
    path = checkpoint.save(out, jax.device_get(state), step=rep.step, meta=meta, keep=cfg.train.keep_checkpoints)
    return path, rep


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="TF1 checkpoint prefix, e.g. logs/wztop/cluster.ckpt (or its folder)")
    p.add_argument("--config", required=True, help="YAML config of the model the checkpoint holds (configs/wztop.yaml)")
    p.add_argument("--out", required=True, type=Path, help="new run directory to write")
    p.add_argument("--epoch", type=int, default=None,
                   help="epoch the checkpoint was saved after (default: train.epochs - 1, i.e. a finished run); "
                        "sets alpha/cluster weight, and `train --resume` continues at epoch+1")
    p.add_argument("--allow-partial", action="store_true",
                   help="import even if tensors are unmapped or variables lack a source (they keep initial values)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    path, rep = import_tf1(args.checkpoint, cfg, args.out, epoch=args.epoch, allow_partial=args.allow_partial)
    print(f"imported {rep.source}: {len(rep.mapped)} checkpoint tensors mapped, "
          f"{len(rep.unmapped)} unmapped, {len(rep.missing) + len(rep.no_rule)} variables without a source, "
          f"{len(rep.bad_shape)} shape disagreements")
    print(f"global step {rep.step}, epoch {rep.epoch} (alpha, cluster weight set for it; resume continues at "
          f"epoch {rep.epoch + 1})")
    for line in rep.notes:
        print(f"  {line}")
    print(f"wrote {args.out}/config.json and {path}")
    return 0


def table_markdown(model: ModelConfig | None = None) -> str:
    """The mapping as a Markdown table (docs/TF1_IMPORT.md is generated from this)."""
    ops = {"copy": "copied", "squeeze11": "[1,1,Cin,Cout] -> [Cin,Cout]", "check": "not stored"}
    rows = ["| original name | ours | what is done |", "|---|---|---|"]
    for r in build_table(model or ModelConfig()):
        tgt = ", ".join(f"`{t}`" for t in r.targets) or "-"
        what = ops[r.op] + (f"; {r.note}" if r.note else "")
        rows.append(f"| `{r.tf_name}` | {tgt} | {what} |")
    return "\n".join(rows)


if __name__ == "__main__":  # print the table: python -m ucluster_jax.tf1_import
    print(table_markdown())
