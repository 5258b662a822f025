"""`ucluster generate`'s arguments: jet processes (hls4ml layout) or event processes (LHCO layout)."""
from __future__ import annotations

import argparse

from ucluster_jax.data.generate.jobs import generate
from ucluster_jax.data.generate.physics import import_backends
from ucluster_jax.data.generate.spec import EVENT_PROCESSES, PROCESSES, EventConfig, GenConfig
from ucluster_jax.errors import UserError

# options that only one kind of process takes: dest -> option (None: not given)
_JET_ONLY = {"jets": "--jets", "pt_min": "--pt-min", "pt_max": "--pt-max", "pthat_max": "--pthat-max"}
_EVENT_ONLY = {"signal_fraction": "--signal-fraction", "wprime_mass": "--wprime-mass", "x_mass": "--x-mass",
               "y_mass": "--y-mass", "trigger_pt": "--trigger-pt"}


def add_args(parser: argparse.ArgumentParser) -> None:
    d, e = GenConfig(), EventConfig()
    parser.add_argument("--out", required=True,
                        help="output folder (one file per chunk: shard-<rank>-<chunk>.h5), or a file "
                             "name ending in .h5 for one merged file")
    n = parser.add_mutually_exclusive_group(required=True)
    n.add_argument("--jets", type=int, help="total number of jets, split evenly over the processes")
    n.add_argument("--events", type=int, help="total number of Pythia events, split evenly over the processes "
                                              "(event processes: of events that pass the trigger)")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0); same seed, same files")
    parser.add_argument("--processes", default=",".join(d.processes),
                        help="comma list of jet processes w,z,top,q,g (default w,z,top), or of event "
                             "processes qcd-dijet,resonance (LHC Olympics R&D layout)")
    parser.add_argument("--pt-min", type=float, default=None, help=f"jet pT window low edge, GeV ({d.pt_min:g})")
    parser.add_argument("--pt-max", type=float, default=None, help=f"jet pT window high edge, GeV ({d.pt_max:g})")
    parser.add_argument("--pthat-min", type=float, default=None,
                        help=f"Pythia PhaseSpace:pTHatMin (default: --pt-min + 100; qcd-dijet: {e.pthat_min:g})")
    parser.add_argument("--pthat-max", type=float, default=None,
                        help="Pythia PhaseSpace:pTHatMax (default: --pt-max - 100)")
    parser.add_argument("--pt-threshold", type=float, default=None,
                        help=f"particle pT threshold, GeV (default {d.pt_threshold:g}; event processes "
                             f"{e.pt_threshold:g})")
    parser.add_argument("--eta-acceptance", type=float, default=None,
                        help=f"particle |eta| acceptance (default {d.particle_eta_max:g}; event processes "
                             f"{e.particle_eta_max:g})")
    parser.add_argument("--signal-fraction", type=float, default=None,
                        help=f"share of resonance events, in [0, 1] (default {e.signal_fraction:g} with both "
                             "event processes)")
    parser.add_argument("--wprime-mass", type=float, default=None, help=f"W' mass, GeV ({e.wprime_mass:g})")
    parser.add_argument("--x-mass", type=float, default=None, help=f"mass of X (W' -> X Y), GeV ({e.x_mass:g})")
    parser.add_argument("--y-mass", type=float, default=None, help=f"mass of Y, GeV ({e.y_mass:g})")
    parser.add_argument("--trigger-pt", type=float, default=None,
                        help=f"event trigger: an anti-kT R=1 jet above this pT, GeV ({e.trigger_pt:g})")
    parser.add_argument("--smear", type=float, default=d.smear,
                        help="energy resolution a in sigma_E/E = a/sqrt(E/GeV) per particle (default 0: off)")
    parser.add_argument("--pythia", action="append", default=[], metavar="'KEY = VALUE'",
                        help="extra Pythia setting, applied last (repeatable)")
    parser.add_argument("--format", dest="fmt", choices=("h5", "parquet"), default="h5",
                        help="h5: hls4ml raw layout (default; LHCO layout for event processes); "
                             "parquet: project shards")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    parser.add_argument("--chunk", type=int, default=1000,
                        help="jets (with --jets) or events (with --events) per chunk file (default 1000)")
    parser.add_argument("--overwrite", action="store_true", help="replace files of a different earlier run")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def _processes(args: argparse.Namespace) -> tuple[str, ...]:
    procs = tuple(p.strip().lower() for p in args.processes.split(",") if p.strip())
    return tuple("top" if p in ("t", "tt", "ttbar") else p for p in procs)


def _given(args: argparse.Namespace, options: dict) -> list[str]:
    return [flag for dest, flag in options.items() if getattr(args, dest) is not None]


def _pick(value, default):
    return default if value is None else value


def config_from_args(args: argparse.Namespace) -> GenConfig:
    d = GenConfig()
    return GenConfig(
        processes=_processes(args), pt_min=_pick(args.pt_min, d.pt_min), pt_max=_pick(args.pt_max, d.pt_max),
        pthat_min=args.pthat_min, pthat_max=args.pthat_max,
        pt_threshold=_pick(args.pt_threshold, d.pt_threshold),
        particle_eta_max=_pick(args.eta_acceptance, d.particle_eta_max), smear=args.smear,
        pythia_settings=tuple(args.pythia),
    )


def event_config_from_args(args: argparse.Namespace) -> EventConfig:
    """EventConfig of the command line; the signal fraction defaults to what the processes allow."""
    e, procs = EventConfig(), _processes(args)
    fraction = e.signal_fraction if set(procs) == set(EVENT_PROCESSES) else float("resonance" in procs)
    return EventConfig(
        processes=procs, signal_fraction=_pick(args.signal_fraction, fraction),
        pthat_min=_pick(args.pthat_min, e.pthat_min), wprime_mass=_pick(args.wprime_mass, e.wprime_mass),
        x_mass=_pick(args.x_mass, e.x_mass), y_mass=_pick(args.y_mass, e.y_mass),
        pt_threshold=_pick(args.pt_threshold, e.pt_threshold),
        particle_eta_max=_pick(args.eta_acceptance, e.particle_eta_max),
        trigger_pt=_pick(args.trigger_pt, e.trigger_pt), smear=args.smear, pythia_settings=tuple(args.pythia),
    )


def run(args: argparse.Namespace) -> int:
    procs = _processes(args)
    events = [p for p in procs if p in EVENT_PROCESSES]
    if events:
        jets = [p for p in procs if p in PROCESSES]
        if jets:
            raise UserError(f"cannot mix jet processes ({','.join(jets)}) with event processes "
                            f"({','.join(events)}): they write different layouts")
        wrong = _given(args, _JET_ONLY) + (["--format parquet"] if args.fmt == "parquet" else [])
        if wrong:
            raise UserError(f"not for event processes ({','.join(events)}): {', '.join(wrong)}")
        config = event_config_from_args(args)
        config.validate()  # argument errors before the backends' import
        import_backends()
        from ucluster_jax.data.generate.events import generate_events

        generate_events(args.out, events=args.events, seed=args.seed, config=config, workers=args.workers,
                        chunk_size=args.chunk, overwrite=args.overwrite, progress=not args.quiet)
        return 0
    wrong = _given(args, _EVENT_ONLY)
    if wrong:
        raise UserError(f"only for event processes ({','.join(EVENT_PROCESSES)}): {', '.join(wrong)}")
    import_backends()  # UserError with the install hint; the CLI prints it as one line
    generate(args.out, jets=args.jets, events=args.events, seed=args.seed, config=config_from_args(args),
             workers=args.workers, chunk_size=args.chunk, fmt=args.fmt, overwrite=args.overwrite,
             progress=not args.quiet)
    return 0
