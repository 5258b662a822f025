"""`ucluster info`: the model summary and its trainable parameter count."""
from __future__ import annotations

import argparse

import jax

from ucluster_jax.config import load_config
from ucluster_jax.model.networks import count_params, init_variables


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the original's hyper-parameters)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--verbose", action="store_true", help="list every parameter array")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    variables = init_variables(cfg.model, cfg.train.seed)
    params = variables["params"]
    for name, sub in params.items():
        print(f"  {name:16s} {count_params(sub):>9,d}")
    if args.verbose:
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            print(f"    {jax.tree_util.keystr(path):60s} {tuple(leaf.shape)}")
    print(f"variant: {cfg.model.variant}")
    print(f"params: {count_params(params)}")
    return 0
