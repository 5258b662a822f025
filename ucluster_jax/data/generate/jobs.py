"""The work: chunks seeded from (seed, rank, chunk, process), worker processes, MPI ranks, resuming."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ucluster_jax.data.generate.physics import JetSimulator, check_pythia_settings
from ucluster_jax.data.generate.spec import (
    GenConfig, JET_FEATURE_NAMES, MAX_CONSTITUENTS, PARTICLE_FEATURES, PROCESSES, PROCESS_ORDER, PYTHIA_SEED_MAX,
)
from ucluster_jax.data.generate.writers import h5_to_parquet, merge_h5, read_chunk_key, write_h5_atomic
from ucluster_jax.errors import UserError
from ucluster_jax.progress import Progress


def pythia_seed(seed: int, rank: int, chunk: int, process: str) -> int:
    """Pythia seed in 1..900_000_000 for one (run seed, rank, chunk, process); never 0 (= clock)."""
    code = PROCESS_ORDER.index(process)
    state = np.random.SeedSequence([seed, rank, chunk, code]).generate_state(2, np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) % PYTHIA_SEED_MAX) + 1


def _aux_rng(seed: int, rank: int, chunk: int, code: int) -> np.random.Generator:
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
                           _aux_rng(job.seed, chunk.rank, chunk.index, code))
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
    perm = _aux_rng(job.seed, chunk.rank, chunk.index, 99).permutation(len(j))
    return c[perm], j[perm], stats


def mpi_rank_size() -> tuple[int, int]:
    """(rank, size) under mpirun/mpiexec (Open MPI, MPICH/Hydra, PMIx), else (0, 1). No MPI init."""
    for r, s in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                 ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE"), ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE")):
        if os.environ.get(r) is not None and os.environ.get(s) is not None:
            try:
                return int(os.environ[r]), int(os.environ[s])
            except ValueError:
                pass
    return 0, 1


def _run_ranks(job: Job, ranks: list[int], overwrite: bool,
               report: Callable[[str, object], None]) -> None:
    """Generate all chunks of the given ranks in this process, reporting through `report`:
    ("event", jets) per event, ("chunk", info dict) per finished or skipped chunk."""
    for rank in ranks:
        for chunk in job.chunks(rank):
            path = job.path(chunk)
            key = chunk.key(job)
            if path.exists():
                old = read_chunk_key(path)
                if old == key:
                    report("chunk", {"path": str(path), "skipped": True, "jets": None})
                    continue
                if not overwrite:
                    raise UserError(f"{path} exists from a different run (other seed or settings); "
                                    "use --overwrite or another --out")
            attrs = {"ucluster_generate_key": json.dumps(key, sort_keys=True)}
            n, stats = job.write_chunk(chunk, path, attrs, lambda n: report("event", n))
            report("chunk", {"path": str(path), "skipped": False, "jets": n, "stats": stats})


def _prepare_out_dir(job: Job, ranks: list[int], overwrite: bool, check_all_ranks: bool) -> None:
    """Remove temporary files a killed run of these ranks left behind; refuse (or, with --overwrite,
    remove) shard files that are not part of this run, so the folder holds exactly this run."""
    for rank in ranks:
        for p in job.out_dir.glob(f".shard-{rank:04d}-*.h5.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    wanted = {job.path(c) for r in ranks for c in job.chunks(r)}
    mine = {p for r in ranks for p in job.out_dir.glob(f"shard-{r:04d}-*.h5")}
    if check_all_ranks:  # also shards of ranks this run does not have (an earlier, wider run)
        for p in job.out_dir.glob("shard-*-*.h5"):
            with contextlib.suppress(ValueError, IndexError):
                if int(p.name.split("-")[1]) >= job.world:
                    mine.add(p)
    foreign = sorted(mine - wanted)
    if foreign and not overwrite:
        raise UserError(f"{job.out_dir} holds {len(foreign)} shard file(s) that are not part of this run "
                        f"(e.g. {foreign[0].name}); use --overwrite or another --out")
    for p in foreign:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _sigterm_to_interrupt(signum, frame):  # pragma: no cover - exercised via subprocess
    raise KeyboardInterrupt


def _worker_main(job: Job, ranks: list[int], overwrite: bool, queue) -> None:
    """Body of a --workers subprocess: generate its ranks, send progress to the parent."""
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    signal.signal(signal.SIGINT, _sigterm_to_interrupt)
    pending = [0, 0]  # events, jets not yet sent
    last = [time.monotonic()]

    def report(kind, payload):
        if kind == "event":
            pending[0] += 1
            pending[1] += payload
            now = time.monotonic()
            if now - last[0] > 0.25:
                queue.put(("progress", tuple(pending)))
                pending[0] = pending[1] = 0
                last[0] = now
        else:
            if pending[0]:
                queue.put(("progress", tuple(pending)))
                pending[0] = pending[1] = 0
            queue.put(("chunk", payload))

    try:
        _run_ranks(job, ranks, overwrite, report)
        message = ("done", None)
    except KeyboardInterrupt:
        message = ("interrupted", None)
    except UserError as e:
        message = ("error", str(e))
    except BaseException as e:  # noqa: BLE001 - forwarded to the parent
        message = ("error", f"{type(e).__name__}: {e}")
    # nothing left to clean up: a late SIGTERM/SIGINT may end the process quietly
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    queue.put(message)
    queue.close()
    if message[0] == "interrupted":
        queue.cancel_join_thread()  # the parent may have stopped reading: do not block on exit
    else:
        queue.join_thread()


@dataclass
class GenerateResult:
    out: Path
    files: list[Path] = field(default_factory=list)  # chunk files (or the merged file)
    jets: int = 0  # jets written by this call (skipped chunks not counted)
    events: int = 0
    seconds: float = 0.0
    skipped_chunks: int = 0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


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
        _make_dir(out_dir)
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


def check_run_args(total: int | None, seed: int, workers: int, chunk_size: int) -> None:
    if total is None or total < 1:
        raise UserError(f"--jets/--events must be >= 1, got {total}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if chunk_size < 1:
        raise UserError(f"--chunk must be >= 1, got {chunk_size}")


def out_paths(out: Path, overwrite: bool) -> tuple[Path | None, Path]:
    """(merged file or None, folder of the chunk files) for --out, a folder or a name ending in
    .h5/.hdf5 (one merged file; the chunks wait in `<out>.parts/`). Creates the folder."""
    merge_to, out_dir = None, out
    if out.suffix.lower() in (".h5", ".hdf5"):
        if mpi_rank_size()[1] > 1:
            raise UserError("under mpirun --out must be a folder (each rank writes its own shards)")
        if out.exists() and not overwrite:
            raise UserError(f"{out} exists; use --overwrite or another --out")
        merge_to, out_dir = out, out.with_name(out.name + ".parts")
    _make_dir(out_dir)
    return merge_to, out_dir


def _make_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)


def finish_merge(result: GenerateResult, merged: Path, parts_dir: Path) -> None:
    """After the chunks were merged into one file: remove them and their folder."""
    for p in result.files:
        p.unlink()
    with contextlib.suppress(OSError):
        parts_dir.rmdir()
    result.files = [merged]


def run_job(job: Job, out: Path, workers: int, overwrite: bool, progress: bool, count: Callable,
            line: Callable) -> tuple[GenerateResult, Progress, str]:
    """Generate this MPI rank's chunks of `job` (in `workers` subprocesses if > 1) with a progress
    line; Ctrl-C/SIGTERM keeps the complete chunks. `count(events, jets)` is the progress count and
    `line(events, jets, events/s)` its text, where each chunk reports ("event", jets) per event."""
    mpi_rank, mpi_size = mpi_rank_size()
    my_ranks = [mpi_rank * workers + w for w in range(workers)]
    _prepare_out_dir(job, my_ranks, overwrite, check_all_ranks=mpi_rank == 0)

    # progress: totals for this MPI rank's share
    share = sum(sum(c.quotas.values()) for r in my_ranks for c in job.chunks(r))
    prefix = "generate" if mpi_size == 1 else f"generate rank {mpi_rank}/{mpi_size}"
    bar = Progress(share, job.mode, prefix + ":", enabled=progress and mpi_rank == 0, log_interval=30.0)
    result = GenerateResult(out=out)
    counts = {"events": 0, "jets": 0}

    def show():
        ev, jt = counts["events"], counts["jets"]
        bar.update(count(ev, jt), line(ev, jt, bar.rate(ev)))

    def on_report(kind, payload):
        if kind == "event":
            counts["events"] += 1
            counts["jets"] += payload
            show()
        elif kind == "progress":
            counts["events"] += payload[0]
            counts["jets"] += payload[1]
            show()
        elif kind == "chunk":
            result.files.append(Path(payload["path"]))
            if payload["skipped"]:
                result.skipped_chunks += 1

    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _sigterm_to_interrupt) if main_thread else None
    t0 = time.monotonic()
    try:
        if workers == 1:
            _run_ranks(job, my_ranks, overwrite, on_report)
        else:
            _run_workers(job, my_ranks, overwrite, on_report)
    except KeyboardInterrupt:
        kept = sorted(job.out_dir.glob("shard-*.h5"))
        bar.close(f"{prefix}: interrupted after {counts['events']} events; {len(kept)} complete chunk "
                f"file(s) kept in {job.out_dir} (rerun the same command to finish)")
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
    result.seconds = time.monotonic() - t0
    result.events = counts["events"]
    result.jets = counts["jets"]
    result.files.sort()
    return result, bar, prefix


def _run_workers(job: Job, ranks: list[int], overwrite: bool, on_report) -> None:
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(job, [r], overwrite, q), daemon=True) for r in ranks]
    for p in procs:
        p.start()
    running = len(procs)
    error: str | None = None
    try:
        while running:
            try:
                kind, payload = q.get(timeout=0.5)
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs):
                    # drain anything left, then stop
                    try:
                        while True:
                            kind, payload = q.get(timeout=0.2)
                            if kind in ("done", "interrupted", "error"):
                                running -= 1
                                error = error or (payload if kind == "error" else None)
                            else:
                                on_report(kind, payload)
                    except queue_mod.Empty:
                        pass
                    if running:
                        error = error or "a worker process died without finishing"
                    break
                continue
            if kind in ("done", "interrupted"):
                running -= 1
                if kind == "interrupted" and error is None:
                    raise KeyboardInterrupt
            elif kind == "error":
                running -= 1
                error = payload
                break
            else:
                on_report(kind, payload)
    finally:
        if running or error:
            for p in procs:
                if p.is_alive():
                    p.terminate()  # SIGTERM: the worker removes its temporary file and exits
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if error:
        raise UserError(error)
