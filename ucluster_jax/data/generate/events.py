"""Event-level processes in the LHC Olympics 2020 R&D layout: QCD dijets and a W' -> X Y resonance.

Every event must pass the LHCO trigger (an anti-kT R=1 jet with pT > 1.2 TeV, |eta| < 2.5);
Pythia generates until a chunk's quota of accepted events is reached. An event becomes one row:
up to 700 visible particles' (pT, eta, phi) by decreasing pT, zero-padded, then the truth label
(1 resonance, 0 QCD). The chunks, workers, MPI ranks, resuming and progress line are jobs.py's and runner.py's;
this module supplies the chunk content and the file layout (lhco.py). See docs/GENERATE.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ucluster_jax.data.generate.jobs import Chunk, Job, aux_rng, pythia_seed
from ucluster_jax.data.generate.runner import (
    GenerateResult, check_run_args, finish_merge, mpi_rank_size, out_paths, run_job,
)
from ucluster_jax.data.generate.lhco import merge_lhco, write_lhco_rows
from ucluster_jax.data.generate.physics import (
    check_pythia_settings, cluster, import_backends, select_particles, start_pythia,
)
from ucluster_jax.data.generate.spec import EVENT_PROCESSES, PROCESS_ORDER, EventConfig
from ucluster_jax.errors import UserError


def visible_final_state(event) -> np.ndarray:
    """(px, py, pz, E) [M,4] of the final-state particles a detector sees (no neutrinos)."""
    vis = [(p.px(), p.py(), p.pz(), p.e()) for p in event.particles() if p.isFinal() and p.isVisible()]
    return np.asarray(vis, dtype=np.float64).reshape(-1, 4)


def event_row(p4: np.ndarray, label: int, max_particles: int) -> np.ndarray:
    """One LHCO row: (pT, eta, phi) of the hardest `max_particles` particles, zero-padded, + label."""
    pt = np.hypot(p4[:, 0], p4[:, 1])
    order = np.argsort(-pt, kind="stable")[:max_particles]
    p, pt = p4[order], pt[order]
    row = np.zeros(3 * max_particles + 1)
    row[: 3 * len(p)] = np.stack([pt, np.arcsinh(p[:, 2] / pt), np.arctan2(p[:, 1], p[:, 0])], 1).ravel()
    row[-1] = label
    return row


class EventSimulator:
    """One Pythia instance for one event process; `next_accepted()` returns triggered events."""

    def __init__(self, process: str, config: EventConfig, seed: int, rng: np.random.Generator):
        _, self.fastjet = import_backends()
        self.process, self.config, self.rng = process, config, rng
        self.pythia = start_pythia(config.pythia_strings(process, seed), process)
        self.jetdef = self.fastjet.JetDefinition(self.fastjet.antikt_algorithm, config.jet_r)
        self.generated = self.accepted = self.failed = 0

    def triggered(self, p4: np.ndarray) -> bool:
        jets, _ = cluster(self.fastjet, p4, self.jetdef)
        cfg = self.config
        return any(j.pt() > cfg.trigger_pt and abs(j.eta()) < cfg.trigger_eta for j in jets)

    def next_accepted(self) -> tuple[np.ndarray, int]:
        """(particles [M,4] after the acceptance cuts, Pythia events it took) of the next event
        that passes the trigger."""
        start = self.generated
        while True:
            if self.failed > 100 + self.generated // 10:
                raise UserError(f"process {self.process}: Pythia failed on {self.failed} events")
            if self.generated >= 1000 + 50 * self.accepted:
                raise UserError(f"process {self.process}: only {self.accepted} of {self.generated} events "
                                f"passed the trigger (jet pT > {self.config.trigger_pt:g} GeV); "
                                "check --pthat-min and the masses")
            if not self.pythia.next():
                self.failed += 1
                continue
            self.generated += 1
            p4 = select_particles(visible_final_state(self.pythia.event), self.config, self.rng)
            if len(p4) and self.triggered(p4):
                self.accepted += 1
                return p4, self.generated - start


@dataclass(frozen=True)
class EventJob(Job):
    """A run of event processes: N accepted events, round(f * N) of them resonance events,
    spread over the (rank, chunk) pieces in proportion to their size."""

    def chunks(self, rank: int) -> list[Chunk]:
        n_sig = round(self.config.signal_fraction * self.total)
        start = sum(sum(self.chunk_sizes(r)) for r in range(rank))  # events before this rank's
        chunks = []
        for c, size in enumerate(self.chunk_sizes(rank)):
            sig = (start + size) * n_sig // self.total - start * n_sig // self.total
            quotas = {"qcd-dijet": size - sig, "resonance": sig}
            chunks.append(Chunk(rank, c, {p: quotas[p] for p in self.config.processes}))
            start += size
        return chunks

    def write_chunk(self, chunk: Chunk, path: Path, attrs: dict,
                    on_event: Callable[[int], None]) -> tuple[int, dict]:
        values, stats = generate_event_chunk(self, chunk, on_event)
        write_lhco_rows(path, values, {**attrs, "ucluster_generate_stats": json.dumps(stats, sort_keys=True)})
        return len(values), stats


def generate_event_chunk(job: EventJob, chunk: Chunk,
                         on_event: Callable[[int], None] | None = None) -> tuple[np.ndarray, dict]:
    """Simulate one chunk: (rows [N, 3*max_particles+1], stats), rows shuffled. `on_event` gets,
    per accepted event, the number of Pythia events it took."""
    cfg = job.config
    rows = []
    stats = {"accepted": {}, "generated": {}, "failed_events": {}}
    for process in cfg.processes:
        quota = chunk.quotas[process]
        if quota == 0:  # no Pythia start-up for nothing
            continue
        sim = EventSimulator(process, cfg, pythia_seed(job.seed, chunk.rank, chunk.index, process),
                             aux_rng(job.seed, chunk.rank, chunk.index, PROCESS_ORDER.index(process)))
        for _ in range(quota):
            p4, tries = sim.next_accepted()
            rows.append(event_row(p4, EVENT_PROCESSES[process], cfg.max_particles))
            if on_event is not None:
                on_event(tries)
        stats["accepted"][process] = sim.accepted
        stats["generated"][process] = sim.generated
        stats["failed_events"][process] = sim.failed
    values = np.stack(rows) if rows else np.zeros((0, 3 * cfg.max_particles + 1))
    perm = aux_rng(job.seed, chunk.rank, chunk.index, 99).permutation(len(values))
    return values[perm], stats


def generate_events(out: str | Path, *, events: int, seed: int = 0, config: EventConfig = EventConfig(),
                    workers: int = 1, chunk_size: int = 1000, overwrite: bool = False,
                    progress: bool = True) -> GenerateResult:
    """Simulate `events` triggered events and write them in the LHCO R&D layout under `out`: a
    folder of chunk files, or (name ending in .h5/.hdf5) one merged file. Seeds, chunks, workers,
    MPI ranks and resuming work as in `jobs.generate`. `result.jets` counts the Pythia events
    generated (accepted or not), `result.events` the accepted ones."""
    config.validate()
    check_run_args(events, seed, workers, chunk_size)
    check_pythia_settings(config)  # fail early: missing extra, or a setting Pythia does not know
    out = Path(out)
    merge_to, out_dir = out_paths(out, overwrite)
    job = EventJob(out_dir=out_dir, seed=seed, mode="events", total=events, world=mpi_rank_size()[1] * workers,
                   config=config, chunk_size=chunk_size)
    result, bar, prefix = run_job(
        job, out, workers, overwrite, progress, count=lambda ev, gen: ev,
        line=lambda ev, gen, rate: f"{ev} accepted of {gen} generated ({_pct(ev, gen)})")
    if merge_to is not None:
        merge_lhco(result.files, merge_to)
        finish_merge(result, merge_to, out_dir)
    skipped = f", {result.skipped_chunks} chunk(s) already there" if result.skipped_chunks else ""
    bar.enabled = progress
    bar.close(f"{prefix}: {result.events} events accepted of {result.jets} generated "
              f"({_pct(result.events, result.jets)}) in {result.seconds:.1f} s "
              f"({result.events_per_s:.1f} events/s{skipped}) -> {out}")
    return result


def _pct(accepted: int, generated: int) -> str:
    return f"trigger acceptance {100.0 * accepted / generated:.0f} %" if generated else "none generated"

