"""The original UCluster run's log (log_dkm.txt): test accuracy per epoch, on the joint-phase sample axis.

The 81 % run (SPEC section 3) trained 302,592 jets per epoch (591 batches of 512) and started the
joint phase at epoch 21; its accuracy is logged after each epoch's training, so epoch e has seen
(e - 20) x 302,592 joint-phase samples. Read it to draw our runs beside it on the same axis.
"""
from __future__ import annotations

import re
from pathlib import Path

from ucluster_jax.errors import DataError

JETS_PER_EPOCH = 302_592
FIRST_JOINT_EPOCH = 21

_EPOCH = re.compile(r"^\*\*\*\* EPOCH (\d+) \*\*\*\*$")
_VALUE = re.compile(r"^(learning rate|train clustering accuracy|testing clustering accuracy): ([0-9.eE+-]+)$")
_KEYS = {"learning rate": "lr", "train clustering accuracy": "train_acc", "testing clustering accuracy": "test_acc"}


def read_log(path: str | Path) -> list[dict]:
    """One record per epoch: epoch, lr, train_acc, test_acc (per-batch matched, as the original logged),
    joint_samples (None before the joint phase)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the original's log ({e.strerror})") from None
    recs: list[dict] = []
    for line in lines:
        if m := _EPOCH.match(line.strip()):
            e = int(m.group(1))
            recs.append({"epoch": e, "joint_samples": (e - FIRST_JOINT_EPOCH + 1) * JETS_PER_EPOCH
                         if e >= FIRST_JOINT_EPOCH else None})
        elif (m := _VALUE.match(line.strip())) and recs:
            recs[-1][_KEYS[m.group(1)]] = float(m.group(2))
    if not recs or not any("test_acc" in r for r in recs):
        raise DataError(f"{path}: no '**** EPOCH n ****' blocks with a test accuracy: not a UCluster log_dkm.txt")
    return recs
