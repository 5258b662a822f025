"""SPACE.yaml for `ucluster tune`: config keys (dotted, as `--set` takes them) mapped to Optuna ranges.

Checked in full before any trial runs, so a typo costs one line and exit status 2, not a study of
failed trials.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ucluster_jax.config import ConfigError, load_config

SPEC_KEYS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
             "categorical": {"choices"}}


def _number(v: Any, kind: str) -> Any:
    """YAML reads 1e-4 (no dot) as text: take it as the float it means."""
    try:
        return float(v) if kind == "float" and isinstance(v, str) else v
    except ValueError:
        return v


def _distribution(spec: Any):
    """One SPACE.yaml entry -> an Optuna distribution, or ValueError saying what is wrong with it."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not isinstance(spec, dict) or spec.get("type") not in SPEC_KEYS:
        raise ValueError("expected a mapping with type: float, int or categorical")
    kind = spec["type"]
    extra = sorted(set(spec) - SPEC_KEYS[kind] - {"type"})
    if extra:
        raise ValueError(f"unknown field(s) {', '.join(extra)} for type {kind}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices or \
                not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise ValueError("choices must be a non-empty list of numbers, strings or booleans")
        return CategoricalDistribution(choices)
    num = int if kind == "int" else (int, float)
    low, high, step = (_number(spec.get(k), kind) for k in ("low", "high", "step"))
    log = spec.get("log", False)
    if not all(isinstance(v, num) and not isinstance(v, bool) for v in (low, high)):
        raise ValueError(f"low and high must be {kind} numbers")
    if not low <= high:
        raise ValueError(f"low ({low}) must be <= high ({high})")
    if not isinstance(log, bool) or (log and low <= 0) or (log and step is not None):
        raise ValueError("log must be true or false, needs low > 0 and no step")
    if step is not None and (not isinstance(step, num) or step <= 0):
        raise ValueError(f"step must be a positive {kind}")
    if kind == "int":
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(float(low), float(high), log=log, step=step)


def load_space(path: Path, base: Path, overrides: list[str]) -> dict[str, Any]:
    """Read and check SPACE.yaml: every key a config key, every range's ends (or choices) a valid config."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read search space ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a mapping of config keys (train.learning_rate) to ranges")
    space = {}
    for key, spec in data.items():
        try:
            dist = _distribution(spec)
            ends = dist.choices if hasattr(dist, "choices") else (dist.low, dist.high)
            for v in ends:
                load_config(base, overrides + [f"{key}={json.dumps(v)}"])
        except (ValueError, ConfigError) as e:
            raise ConfigError(f"{path}: {key}: {e}") from None
        space[str(key)] = dist
    return space
