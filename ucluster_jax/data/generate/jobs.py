"""The jet work: chunks seeded from (seed, rank, chunk, process), their content, `generate()`.
runner.py runs the chunks (ranks, workers, resuming, progress)."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ucluster_jax.data.generate.physics import JetSimulator, check_pythia_settings
from ucluster_jax.data.generate.runner import (
    GenerateResult, make_dir, check_run_args, finish_merge, mpi_rank_size, out_paths, run_job,
)
from ucluster_jax.data.generate.spec import (
    GenConfig, JET_FEATURE_NAMES, MAX_CONSTITUENTS, PARTICLE_FEATURES, PROCESSES, PROCESS_ORDER, PYTHIA_SEED_MAX,
)
from ucluster_jax.data.generate.writers import h5_to_parquet, merge_h5, write_h5_atomic
from ucluster_jax.errors import UserError


def pythia_seed(seed: int, rank: int, chunk: int, process: str) -> int:
    """Pythia seed in 1..900_000_000 for one (run seed, rank, chunk, process); never 0 (= clock)."""
    code = PROCESS_ORDER.index(process)
    state = np.random.SeedSequence([seed, rank, chunk, code]).generate_state(2, np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) % PYTHIA_SEED_MAX) + 1


def aux_rng(seed: int, rank: int, chunk: int, code: int) -> np.random.Generator:
    """NumPy generator for smearing (code = process index) or the row shuffle (code 99), per chunk."""
    return np.random.default_rng(np.random.SeedSequence([seed, rank, chunk, 100 + code]))


@dataclass(frozen=True)
class Chunk:
    rank: int
    index: int
    quotas: dict  # process -> jets (mode "jets") or events (mode "events")

    def key(self, job: "Job") -> dict:
        """Everything the chunk's content depends on (stored in the file; resume compares it)."""
        return {
            "format_version": 1,
            "seed": job.seed,
            "rank": self.rank,
            "chunk": self.index,
            "mode": job.mode,
            "quotas": {p: self.quotas[p] for p in job.config.processes},
            "config": job.config.to_json(),
        }


@dataclass(frozen=True)
class Job:
    """A whole generation run: what to make and where."""

    out_dir: Path
    seed: int
    mode: str  # "jets" or "events"
    total: int
    world: int
    config: GenConfig
    chunk_size: int = 1000

    def chunk_sizes(self, rank: int) -> list[int]:
        """This rank's share of the total, in chunks of chunk_size (the last one shorter)."""
        n = self.total // self.world + (rank < self.total % self.world)
        sizes = [self.chunk_size] * (n // self.chunk_size)
        if n % self.chunk_size:
            sizes.append(n % self.chunk_size)
        return sizes

    def chunks(self, rank: int) -> list[Chunk]:
        procs = self.config.processes
        P = len(procs)
        chunks = []
        for c, size in enumerate(self.chunk_sizes(rank)):
            extra = size % P
            quotas = {p: size // P + (((i - c - rank) % P) < extra) for i, p in enumerate(procs)}
            chunks.append(Chunk(rank, c, quotas))
        return chunks

    def path(self, chunk: Chunk) -> Path:
        return self.out_dir / f"shard-{chunk.rank:04d}-{chunk.index:04d}.h5"

    def write_chunk(self, chunk: Chunk, path: Path, attrs: dict,
                    on_event: Callable[[int], None]) -> tuple[int, dict]:
        """Simulate one chunk and write it atomically to `path`; (rows written, stats)."""
        c, j, stats = generate_chunk(self, chunk, on_event)
        write_h5_atomic(path, c, j, {**attrs, "ucluster_generate_stats": json.dumps(stats, sort_keys=True)})
        return len(j), stats


def generate_chunk(job: Job, chunk: Chunk,
                   on_event: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Simulate one chunk: (constituents [N,100,16], jets [N,59], stats), rows shuffled."""
    cfg = job.config
    consts, rows = [], []
    stats = {"events": {}, "jets": {}, "failed_events": {}}
    for process in cfg.processes:
        quota = chunk.quotas[process]
        if quota == 0:
            stats["events"][process] = stats["jets"][process] = stats["failed_events"][process] = 0
            continue
        code = PROCESS_ORDER.index(process)
        sim = JetSimulator(process, cfg, pythia_seed(job.seed, chunk.rank, chunk.index, process),
                           aux_rng(job.seed, chunk.rank, chunk.index, code))
        events = jets = 0
        while True:
            if job.mode == "events" and events >= quota:
                break
            if job.mode == "jets" and jets >= quota:
                break
            if job.mode == "jets" and events >= 1000 + 50 * quota and jets < quota:
                raise UserError(
                    f"process {process}: only {jets} jets passed the selection in {events} events; "
                    f"check --pt-min/--pt-max against the pTHat window {cfg.pthat_window()}")
            if sim.failed > 100 + events // 10:
                raise UserError(f"process {process}: Pythia failed on {sim.failed} events")
            res = sim.next_event()
            if res is None:
                continue
            events += 1
            if job.mode == "jets":
                res = res[: quota - jets]
            for f, r in res:
                consts.append(f)
                rows.append(r)
            jets += len(res)
            if on_event is not None:
                on_event(len(res))
        stats["events"][process] = events
        stats["jets"][process] = jets
        stats["failed_events"][process] = sim.failed
        del sim
    if consts:
        c = np.stack(consts).astype(np.float32)
        j = np.stack(rows).astype(np.float32)
    else:
        c = np.zeros((0, MAX_CONSTITUENTS, len(PARTICLE_FEATURES)), np.float32)
        j = np.zeros((0, len(JET_FEATURE_NAMES)), np.float32)
    perm = aux_rng(job.seed, chunk.rank, chunk.index, 99).permutation(len(j))
    return c[perm], j[perm], stats


def generate(out: str | Path, *, jets: int | None = None, events: int | None = None, seed: int = 0,
             config: GenConfig = GenConfig(), workers: int = 1, chunk_size: int = 1000,
             fmt: str = "h5", overwrite: bool = False, progress: bool = True) -> GenerateResult:
    """Simulate jets and write them under `out` (see the module docstring and docs/GENERATE.md).

    `out` is a folder of chunk files `shard-<rank>-<chunk>.h5`; a path ending in .h5/.hdf5 gives
    one merged file instead (chunks are kept in `<out>.parts/` until the merge). Exactly one of
    `jets` (total jets, split evenly over processes) or `events` (total Pythia events, likewise)
    is required. Under mpirun each MPI rank does its share; `workers` subprocesses split each
    rank's share further (shard rank = mpi_rank * workers + worker).
    """
    config.validate()
    if (jets is None) == (events is None):
        raise UserError("give exactly one of --jets N or --events N")
    total = jets if jets is not None else events
    check_run_args(total, seed, workers, chunk_size)
    if fmt not in ("h5", "parquet"):
        raise UserError(f"--format must be h5 or parquet, got {fmt!r}")
    check_pythia_settings(config)  # fail early: missing extra, or a setting Pythia does not know

    out = Path(out)
    mpi_size = mpi_rank_size()[1]
    if fmt == "parquet":
        if mpi_size > 1:
            raise UserError("--format parquet writes one dataset from one process: use --workers, or "
                            "generate h5 under mpirun and convert with `ucluster prepare`")
        extra = [p for p in config.processes if PROCESSES[p].label > 2]
        if extra:
            raise UserError(f"the parquet dataset holds W/Z/top only; {','.join(extra)} jets need --format h5")
        if out.is_dir() and any(out.glob("*.parquet")) and not overwrite:
            raise UserError(f"{out} already holds parquet files; use --overwrite or another --out")
        merge_to, out_dir = None, out / ".h5chunks"  # chunk files (resumable) until the conversion
        make_dir(out_dir)
    else:
        merge_to, out_dir = out_paths(out, overwrite)

    job = Job(out_dir=out_dir, seed=seed, mode="jets" if jets is not None else "events",
              total=total, world=mpi_size * workers, config=config, chunk_size=chunk_size)
    result, bar, prefix = run_job(
        job, out, workers, overwrite, progress,
        count=lambda ev, jt: jt if job.mode == "jets" else ev,
        line=lambda ev, jt, rate: f"{ev} events, {jt} jets, {rate:.1f} events/s")

    if merge_to is not None:
        merge_h5(result.files, merge_to)
        finish_merge(result, merge_to, out_dir)
    elif fmt == "parquet":
        result.files = h5_to_parquet(result.files, out, overwrite=overwrite)
        for p in job.out_dir.glob("shard-*.h5"):
            p.unlink()
        with contextlib.suppress(OSError):
            job.out_dir.rmdir()

    skipped = f", {result.skipped_chunks} chunk(s) already there" if result.skipped_chunks else ""
    bar.enabled = progress  # every rank reports its own end line
    bar.close(f"{prefix}: {result.jets} jets from {result.events} events in {result.seconds:.1f} s "
            f"({result.events_per_s:.1f} events/s{skipped}) -> {out}")
    return result
