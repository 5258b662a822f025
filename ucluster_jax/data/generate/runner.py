"""Running a job (jobs.Job or events.EventJob): MPI ranks, worker processes, resuming, progress,
interruption, and the --out paths. A job supplies chunks(rank), path(chunk) and write_chunk(...)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ucluster_jax.data.generate.writers import read_chunk_key
from ucluster_jax.errors import UserError
from ucluster_jax.progress import Progress

if TYPE_CHECKING:  # no import at run time: jobs.py imports this module
    from ucluster_jax.data.generate.jobs import Job


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
    make_dir(out_dir)
    return merge_to, out_dir


def make_dir(out_dir: Path) -> None:
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
