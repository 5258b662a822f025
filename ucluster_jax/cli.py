"""`ucluster` command line: prepare, generate, train, tune, evaluate, info, import-tf1, bench.

Each subcommand lives in the module that owns its concern, as `add_args(parser)` and
`run(args) -> int`; this file only dispatches, so startup imports nothing heavy.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("ucluster_jax.data.prepare", "convert hls4ml or UCluster-prepared HDF5, or ROOT trees, into parquet shards"),
    "generate": ("ucluster_jax.data.generate", "simulate W/Z/top jets with Pythia 8 + FastJet"),
    "toy": ("ucluster_jax.data.toy", "write the built-in W/Z/top-like toy dataset as parquet"),
    "train": ("ucluster_jax.train.loop", "train UCluster (two phases), single process, local devices or mpirun"),
    "evaluate": ("ucluster_jax.evaluate", "cluster a dataset with a trained run; accuracy, plots, per-jet file"),
    "info": ("ucluster_jax.model.info", "print the model summary and trainable parameter count"),
    "import-tf1": ("ucluster_jax.tf1_import", "import an original UCluster TensorFlow 1 checkpoint as a run"),
    "tune": ("ucluster_jax.tune", "search hyper-parameters with Optuna: trials are training runs, over ranks and jobs"),
    "bench": ("ucluster_jax.bench", "measure training, evaluation, data and scaling throughput"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ucluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (_, help_text) in COMMANDS.items():  # each command's arguments: only once it is chosen (`main`)
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a program (not called from Python): speed settings first
        from ucluster_jax.host_tuning import tune_process

        tune_process()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage / help and exits
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"ucluster {name}", description=COMMANDS[name][1])
    module.add_args(sub)
    args = sub.parse_args(argv[1:])
    from ucluster_jax.config import ConfigError
    from ucluster_jax.errors import UserError

    try:
        return int(module.run(args) or 0)
    except (UserError, ConfigError, FileNotFoundError) as e:
        print(f"ucluster {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ucluster {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
