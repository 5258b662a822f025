"""The two-phase training loop (SPEC section 3) and `ucluster train`.

Epochs [0, pretrain_epochs) train the focal loss alone; before epoch `pretrain_epochs` k-means++ on
the embedding of the whole training set places the centroids; from then on the joint loss with
alpha growing each epoch. Files -> batches -> step -> metrics; only rank 0 logs and writes.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ucluster_jax import checkpoint
from ucluster_jax.config import Config, ConfigError, load_config, model_from_dict
from ucluster_jax.data.prefetch import prefetch
from ucluster_jax.data.reader import ParquetDataset
from ucluster_jax.errors import CheckpointError, DataError, UserError
from ucluster_jax.metrics import matched_accuracy, per_batch_accuracy
from ucluster_jax.parallel.runtime import ENGINES, Runtime, setup
from ucluster_jax.progress import Progress
from ucluster_jax.tblog import EventLog
from ucluster_jax.train import candidates, select
from ucluster_jax.train.scoring import CurvePoints, format_start, how_started, init_centroids, latent_sample, score_test
from ucluster_jax.train.state import TrainState, create_state, learning_rate, phase, scored, with_params


def check_data(cfg: Config, ds: ParquetDataset, path: Path) -> None:
    """The dataset's shapes against the model's; the number of targets only where the data's target column
    is the focal target (loss.mass_bins prepared)."""
    m = ds.meta
    per_point = cfg.model.variant == "anomaly"
    targets = cfg.model.num_targets if cfg.loss.mass_bins == "prepared" else m.num_targets  # else binned in the step
    want = (cfg.model.num_points, cfg.model.num_features, targets, cfg.model.num_global, per_point)
    have = (m.num_points, m.num_features, m.num_targets, m.num_global, m.target_per_point)
    if want != have:
        raise DataError(f"{path}: data has (points, features, targets, global features, per-particle targets) = "
                        f"{have}, the config's model expects {want}")


def check_mass(cfg: Config, ds: ParquetDataset, path: Path) -> None:
    """Training data whose `mass` column is not the mass the config's target and selection expect."""
    if ds.meta.mass != cfg.loss.mass:
        raise DataError(f"{path}: its mass column holds the {ds.meta.mass} mass, the config wants loss.mass: "
                        f"{cfg.loss.mass} (`ucluster prepare --mass {cfg.loss.mass}`)")


def uneven_read_warning(ds: ParquetDataset, path: Path) -> str | None:
    """One line when row groups are large against a rank's share: every rank trains on the same number of
    jets, but decodes whole row groups, so a rank may read far more than it uses."""
    if ds.read_factor() <= 2:
        return None
    return (f"warning: {path}: row groups of up to {max(g.rows for g in ds.groups)} jets for "
            f"{ds.num_jets // ds.world} jets per rank: a rank may decode {ds.read_factor():.1f}x the jets it "
            f"trains on; rewrite it with 'ucluster prepare --ranks {ds.world}'")


class Logger:
    """One line per epoch on stdout, JSONL records and, with `tensorboard`, the same numbers as
    TensorBoard events in RUN/tb (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.path, self.curve = run_dir / "metrics.jsonl", run_dir / "curve.jsonl"
        self.events = EventLog(run_dir) if enabled and tensorboard else None

    def epoch(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(self.path, rec)
        if self.events is not None:
            self.events.epoch(rec)
        acc = "" if rec.get("train_acc") is None else f" acc {rec['train_acc']:.4f} (per-batch {rec['train_acc_per_batch']:.4f})"
        test = "" if rec.get("test_acc") is None else f" test acc {rec['test_acc']:.4f}"
        print(f"epoch {rec['epoch']:3d} loss {rec['loss']:.5f} (focal {rec['focal']:.5f} kmeans {rec['kmeans']:.5f})"
              f"{acc}{test} lr {rec['lr']:.2e} alpha {rec['alpha']:g} {rec['jets_per_s']:,.0f} jets/s", flush=True)

    def replay(self, rec: dict[str, Any]) -> None:
        """An epoch record made elsewhere (a pre-training candidate's), written as `epoch` writes one."""
        if self.enabled:
            self._append(self.path, rec)
        if self.events is not None:
            self.events.epoch(rec)

    def point(self, rec: dict[str, Any]) -> None:
        """One point of the test curve against joint-phase samples (RUN/curve.jsonl)."""
        if self.enabled:
            self._append(self.curve, rec)
        if self.events is not None:
            self.events.point(rec)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()

    def rewind(self, step: int) -> None:
        """Drop the records written after the checkpoint a resume starts from (step `step`): a run
        killed between checkpoints has logged points that the resumed run logs again."""
        if not self.enabled:
            return
        for path in (self.path, self.curve):
            if path.exists():
                lines = path.read_text().splitlines()
                keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
                if len(keep) < len(lines):
                    checkpoint.atomic_write(path, "".join(line + "\n" for line in keep))

    @staticmethod
    def _append(path: Path, rec: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def train(cfg: Config, data: Path, out: Path, *, test_data: Path | None = None, resume: bool = False,
          engine: str = "auto", num_devices: int | None = None, rt: Runtime | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or continue) training; returns the last epoch's record.

    on_epoch(record) after each epoch is logged and checkpointed: a caller (`ucluster tune`'s pruner)
    watches the scores as they come, and may stop the run by raising."""
    rt = rt or setup(engine, num_devices=num_devices)
    t = cfg.train
    if t.data_lanes % rt.world:
        raise ConfigError(f"train.data_lanes={t.data_lanes} is not a multiple of the {rt.world} processes")
    ds = ParquetDataset(data, rank=rt.rank, world=rt.world)
    check_data(cfg, ds, data)
    check_mass(cfg, ds, data)
    test_ds = ParquetDataset(test_data, rank=rt.rank, world=rt.world) if test_data else None
    rt.configure(cfg)
    rt.local_batch(t.batch_size)  # checks that the replicas divide the global batch
    warning = uneven_read_warning(ds, data)
    if rt.is_root and warning:
        print(warning, file=sys.stderr, flush=True)
    out = Path(out)
    made = None  # (state, mu, start) of the chosen pre-training candidate, when chosen now
    if t.pretrain_candidates > 1:
        seed, made = pretrain_candidates(rt, cfg, data, out, ds, resume)
        cfg = candidates.with_seed(cfg, seed)  # the run goes on as the seed-`seed` run
        t = cfg.train
        resume = resume and made is None
    if rt.is_root:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write(out / "config.json", json.dumps(cfg.to_dict(), indent=1))

    host = create_state(cfg)
    start_epoch, start_step = 0, 0
    if resume:
        host, start_epoch, start_step = resume_state(rt, cfg, out, host)
    elif made is not None:
        host, start_epoch = made[0], t.pretrain_epochs
    step_fn = rt.make_step(cfg, num_classes=len(ds.meta.class_names))
    state = rt.put_state(host)
    rt.check_replicas(state, "start")  # same seed everywhere: check, don't assume
    steps = ds.steps_per_epoch(t.batch_size)
    log = Logger(out, rt.is_root, t.tensorboard)
    if resume:
        log.rewind(int(host.step))
    selection = select.start(rt, cfg, data, out, int(host.step) if resume else None)
    rec: dict[str, Any] = {}

    def save(h: TrainState, epoch: int, next_epoch: int, next_step: int) -> None:
        """Rank 0 writes the host state `h` (`rt.host_state`, which every rank computes: per-replica BN
        statistics are averaged over all of them), the last completed epoch and the iterator state."""
        if rt.is_root:
            checkpoint.save(out, h, step=int(h.step), keep=t.keep_checkpoints,
                            meta={"epoch": epoch, "next": [next_epoch, next_step], "config": cfg.to_dict(),
                                  "world": rt.world, "replicas": rt.replicas, "engine": rt.engine.name})

    if made is not None:  # the run's records and checkpoints start with the chosen candidate's
        for r in candidates.pretraining_records(out, t.seed) if rt.is_root else []:
            log.replay(r)
        save(host, t.pretrain_epochs - 1, t.pretrain_epochs, 0)

    try:
        for epoch in range(start_epoch, t.epochs):
            first = start_step if epoch == start_epoch else 0  # `host`: the state, as placed or last fetched
            start = None
            if epoch == t.pretrain_epochs and first == 0:  # resumed mid-epoch: the centroids are in the state
                mu, start = made[1:] if made is not None else init_centroids(rt, cfg, host, ds)
                host = with_params(host, {**host.params, "mu": jnp.asarray(mu)})
                if rt.is_root:
                    print(f"{how_started(t)} on {ds.num_jets} embeddings: mu =\n{mu}\n"
                          f"start: {format_start(start)}", flush=True)
            alpha, weight, joint_lr = phase(cfg, epoch)
            # at the epoch's first step
            lr = float(learning_rate(int(host.samples_seen) - first * t.batch_size, t, rt.replicas, joint_lr))
            state = rt.put_state(host.replace(alpha=jnp.float32(alpha), cluster_weight=jnp.float32(weight),
                                              joint_lr=jnp.float32(joint_lr)))

            mid_epoch = (lambda st, s: save(rt.host_state(st), epoch - 1, epoch, s)) if t.checkpoint_every_steps \
                else None
            scores = []  # (score, steps between its points inside the epoch)
            if test_ds is not None and epoch >= t.pretrain_epochs:  # clusters exist once the centroids do
                scores.append((functools.partial(score_test, rt, cfg, test_ds, alpha=alpha),
                               steps_between(t.eval_every_samples, t.batch_size)))
            if selection is not None and epoch >= t.select_from_epoch:
                scores.append((functools.partial(selection, epoch=epoch),
                               steps_between(t.select_every_samples or t.eval_every_samples, t.batch_size)))
            score = CurvePoints(scores, log.point, epoch, t.pretrain_epochs * steps * t.batch_size) if scores else None
            state, rec = run_epoch(rt, cfg, step_fn, state, ds, epoch, start_step=first, on_step=mid_epoch, score=score)
            host = rt.host_state(state)
            if int(host.nonfinite_steps) > 0:
                msg = (f"non-finite loss or gradients at step {int(host.first_nonfinite_step)} "
                       f"({int(host.nonfinite_steps)} update(s) skipped)")
                if t.nonfinite == "stop":
                    last = checkpoint.list_checkpoints(out)
                    raise UserError(f"{msg}; stopped. Last good checkpoint: {last[-1] if last else 'none'}")
                rec["nonfinite_skipped"] = int(host.nonfinite_steps)
            rt.check_replicas(state, f"epoch {epoch}")
            if score is not None:
                rec.update(score(host))
            rec.update(lr=lr, alpha=alpha, epoch=epoch, step=int(host.step), samples_seen=int(host.samples_seen))
            if first:
                rec["resumed_at_step"] = first
            if start:  # not after a resume inside the k-means epoch: the start was made before the kill
                rec.update({f"start_{k}": v for k, v in start.items()})
            log.epoch(rec)  # before the checkpoint: a kill between the two repeats the record, which a resume drops
            save(host, epoch, epoch + 1, 0)  # the host copy taken after the epoch: no second transfer
            every = t.tensorboard_latent_every
            if log.events is not None and every and epoch >= t.pretrain_epochs and (epoch + 1) % every == 0:
                # rank 0 only (log.events), on its own jets
                shown = scored(host)
                z, cluster, label = latent_sample(rt, cfg, shown, ds if test_ds is None else test_ds)
                log.events.latent(z, cluster, label, np.asarray(shown.params["mu"]), ds.meta.class_names, epoch)
            if on_epoch is not None:
                on_epoch(rec)
    finally:
        log.close()
    if selection is not None and rt.is_root and np.isfinite(selection.best):
        print(f"result: the state with the lowest {cfg.train.select_by}, {selection.best:.4f} "
              f"({out / 'selected'}; `ucluster evaluate` scores it)", flush=True)
    return rec


def pretrain_candidates(rt: Runtime, cfg: Config, data: Path, out: Path, ds: ParquetDataset,
                        resume: bool) -> tuple[int, tuple | None]:
    """Pre-train each candidate seed (train/candidates.py) as a run of its own and choose one: returns the
    seed, with (its pre-trained state, mu, start) when chosen now; None when a resumed run is past the choice."""
    known = candidates.made_before(rt, out, resume)
    if known is not None:
        return known, None
    made = {}
    for seed in candidates.seeds(cfg):
        c, sub = candidates.pretraining_config(cfg, seed), candidates.candidate_dir(out, seed)
        train(c, data, sub, resume=resume and candidates.has_checkpoints(rt, sub), rt=rt)
        host = resume_state(rt, c, sub, create_state(c))[0]
        made[seed] = (host, *init_centroids(rt, c, host, ds))  # start: rank 0 only
        if rt.is_root:
            print(f"candidate seed {seed}: start: {format_start(made[seed][2])}", flush=True)
    seed = candidates.pick(rt, out, {s: m[2] for s, m in made.items()})
    return seed, made[seed]


def run_epoch(rt: Runtime, cfg: Config, step_fn, state, ds: ParquetDataset, epoch: int, *, start_step: int = 0,
              on_step: Callable[[Any, int], None] | None = None, score: CurvePoints | None = None):
    """Steps start_step.. of an epoch; on_step(state, s) after every train.checkpoint_every_steps-th step
    s inside it, score(host state, s) where score.due(s). The record's losses average the steps run here."""
    t = cfg.train
    steps = ds.steps_per_epoch(t.batch_size)
    if steps == 0:
        raise DataError(f"{ds.path}: {ds.num_jets} jets, fewer than one global batch ({t.batch_size})")
    bar = Progress((steps - start_step) * t.batch_size, "jets", f"epoch {epoch}", enabled=rt.is_root)
    sums = None
    per_batch = []
    batches = epoch_batches(cfg, ds, epoch, start_step)
    n = 0
    for batch in prefetch(batches, rt.put_batch):
        state, m = step_fn(state, batch)
        m = rt.step_metrics(m)
        per_batch.append(m.pop("contingency"))
        sums = m if sums is None else jax.tree_util.tree_map(jnp.add, sums, m)
        if rt.settle_each_step:
            jax.block_until_ready(sums)
        n += 1
        s = start_step + n
        if rt.replicas > 1 and t.checksum_every and n % t.checksum_every == 0:
            rt.check_replicas(state, f"epoch {epoch} step {s}")
        if score is not None and s < steps and score.due(s):  # before the checkpoint, as at epoch ends
            score(rt.host_state(state), s)
        if on_step is not None and s % t.checkpoint_every_steps == 0 and s < steps:
            on_step(state, s)
        if bar.due():
            jax.block_until_ready(sums["loss"])
            bar.update(n * t.batch_size)
    jax.block_until_ready(state)
    bar.close()
    if start_step + n != steps:
        raise DataError(f"{ds.path}: rank {rt.rank} read {n} batches in epoch {epoch} from step {start_step}, "
                        f"expected {steps - start_step}")
    host_sums = {k: float(v) for k, v in jax.device_get(sums).items()}
    rate = n * t.batch_size / (time.perf_counter() - bar.start)
    cont = rt.sum(np.stack(jax.device_get(per_batch)).astype(np.int64))  # [steps, K, C], all ranks
    loss_parts = rt.sum(np.array([host_sums["loss"], host_sums["focal"], host_sums["kmeans"]])) / (n * rt.replicas)
    rec = {"loss": loss_parts[0], "focal": loss_parts[1], "kmeans": loss_parts[2], "jets_per_s": rate, "steps": n}
    if t.pretrain_epochs <= epoch and cont.sum() > 0:
        rec["train_acc"] = matched_accuracy(cont.sum(0))[0]
        rec["train_acc_per_batch"] = per_batch_accuracy(cont)
    return state, rec


def steps_between(samples: int, batch_size: int) -> int:
    """Steps between two points every `samples` samples (0: none inside an epoch)."""
    return max(1, samples // batch_size) if samples else 0


def epoch_batches(cfg: Config, ds: ParquetDataset, epoch: int, start_step: int = 0):
    """This rank's batches of an epoch from `start_step`, as training reads them."""
    t = cfg.train
    return ds.batches(t.batch_size, lanes=t.data_lanes, seed=t.seed, epoch=epoch, shuffle=t.shuffle,
                      buffer_row_groups=t.shuffle_buffer_row_groups, start_step=start_step)


def resume_state(rt: Runtime, cfg: Config, out: Path, template: TrainState) -> tuple[TrainState, int, int]:
    """Rank 0 reads and verifies the newest intact checkpoint; everyone gets the same bytes.

    Returns the state and where to continue: (epoch, step within it), the checkpoint's iterator state
    (checkpoints without one were written at epoch ends)."""
    def same_model(path: Path, meta: dict[str, Any]) -> None:
        # only the model must match: the rest of the stored config may be from an older version, whose
        # train/loss values today's rules would refuse (the run resumes with this config's)
        try:
            model = model_from_dict(meta["config"]["model"], f"{path} config.model")
        except (KeyError, UserError) as e:
            raise CheckpointError(f"{path}: checkpoint metadata has no usable config ({e})") from None
        if model != cfg.model:
            diff = ", ".join(f"{k} {v!r} (config: {getattr(cfg.model, k)!r})"
                             for k, v in vars(model).items() if getattr(cfg.model, k) != v)
            raise CheckpointError(f"{path}: checkpoint was written with a different model configuration: {diff}; "
                                  "resume with the config it was trained with")

    payload = None
    if rt.is_root:
        try:
            state, meta = checkpoint.load_latest(out, template, check=same_model)
            payload = (jax.device_get(state), meta, None)
        except CheckpointError as e:
            payload = (None, None, str(e))
    state, meta, err = rt.bcast(payload)
    if err:
        raise CheckpointError(err)
    epoch, step = meta.get("next", [int(meta["epoch"]) + 1, 0])
    return state, int(epoch), int(step)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (configs/wztop.yaml: the original's)")
    p.add_argument("--data", required=True, type=Path, help="parquet dataset directory (ucluster prepare/toy)")
    p.add_argument("--out", required=True, type=Path, help="run directory: checkpoints, metrics.jsonl, config")
    p.add_argument("--test-data", type=Path, help="parquet dataset scored after every epoch")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --out")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="data-parallel engine (auto: mpi under mpirun, local with several devices)")
    p.add_argument("--devices", type=int, help="local devices to use (default: all GPUs, one CPU)")
    p.add_argument("--checkpoint-every-steps", type=int, metavar="N",
                   help="also checkpoint every N steps within an epoch, for mid-epoch --resume "
                   "(= --set train.checkpoint_every_steps=N)")


def run(args: argparse.Namespace) -> int:
    every = [] if args.checkpoint_every_steps is None else [f"train.checkpoint_every_steps={args.checkpoint_every_steps}"]
    cfg = load_config(args.config, args.overrides + every)
    train(cfg, args.data, args.out, test_data=args.test_data, resume=args.resume, engine=args.engine,
          num_devices=args.devices)
    return 0
