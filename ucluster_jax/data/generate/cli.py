"""`ucluster generate`'s arguments."""
from __future__ import annotations

import argparse

from ucluster_jax.data.generate.jobs import generate
from ucluster_jax.data.generate.physics import import_backends
from ucluster_jax.data.generate.spec import GenConfig


def add_args(parser: argparse.ArgumentParser) -> None:
    d = GenConfig()
    parser.add_argument("--out", required=True,
                        help="output folder (one file per chunk: shard-<rank>-<chunk>.h5), or a file "
                             "name ending in .h5 for one merged file")
    n = parser.add_mutually_exclusive_group(required=True)
    n.add_argument("--jets", type=int, help="total number of jets, split evenly over the processes")
    n.add_argument("--events", type=int, help="total number of Pythia events, split evenly over the processes")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0); same seed, same files")
    parser.add_argument("--processes", default=",".join(d.processes),
                        help="comma list of w,z,top,q,g (default w,z,top)")
    parser.add_argument("--pt-min", type=float, default=d.pt_min, help="jet pT window low edge, GeV (850)")
    parser.add_argument("--pt-max", type=float, default=d.pt_max, help="jet pT window high edge, GeV (1250)")
    parser.add_argument("--pthat-min", type=float, default=None,
                        help="Pythia PhaseSpace:pTHatMin (default: --pt-min + 100)")
    parser.add_argument("--pthat-max", type=float, default=None,
                        help="Pythia PhaseSpace:pTHatMax (default: --pt-max - 100)")
    parser.add_argument("--pt-threshold", type=float, default=d.pt_threshold,
                        help="constituent pT threshold, GeV (default 1)")
    parser.add_argument("--eta-acceptance", type=float, default=d.particle_eta_max,
                        help="constituent |eta| acceptance (default 4)")
    parser.add_argument("--smear", type=float, default=d.smear,
                        help="energy resolution a in sigma_E/E = a/sqrt(E/GeV) per constituent (default 0: off)")
    parser.add_argument("--pythia", action="append", default=[], metavar="'KEY = VALUE'",
                        help="extra Pythia setting, applied last (repeatable)")
    parser.add_argument("--format", dest="fmt", choices=("h5", "parquet"), default="h5",
                        help="h5: hls4ml raw layout (default); parquet: project shards")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    parser.add_argument("--chunk", type=int, default=1000,
                        help="jets (with --jets) or events (with --events) per chunk file (default 1000)")
    parser.add_argument("--overwrite", action="store_true", help="replace files of a different earlier run")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def config_from_args(args: argparse.Namespace) -> GenConfig:
    procs = tuple(p.strip().lower() for p in args.processes.split(",") if p.strip())
    procs = tuple("top" if p in ("t", "tt", "ttbar") else p for p in procs)
    return GenConfig(
        processes=procs, pt_min=args.pt_min, pt_max=args.pt_max, pthat_min=args.pthat_min,
        pthat_max=args.pthat_max, pt_threshold=args.pt_threshold,
        particle_eta_max=args.eta_acceptance, smear=args.smear, pythia_settings=tuple(args.pythia),
    )


def run(args: argparse.Namespace) -> int:
    import_backends()  # UserError with the install hint; the CLI prints it as one line
    generate(args.out, jets=args.jets, events=args.events, seed=args.seed, config=config_from_args(args),
             workers=args.workers, chunk_size=args.chunk, fmt=args.fmt, overwrite=args.overwrite,
             progress=not args.quiet)
    return 0
