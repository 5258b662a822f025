"""Checkpoints: one msgpack file per epoch, written atomically, with a checksum and the config.

Layout in RUN_DIR/checkpoints: `ckpt-<step, 10 digits>.msgpack` and a `.json` sidecar holding the
sha256 of the msgpack, the config, the epoch and the world size. "Latest" is chosen by step number,
never by listing order; a corrupt newest file is reported and the previous one used. msgpack
(flax.serialization) stores arrays only: loading never runs code from the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from flax import serialization

from ucluster_jax.errors import CheckpointError

_NAME = re.compile(r"^ckpt-(\d{10})\.msgpack$")


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(run_dir: Path, state: Any, *, step: int, meta: dict[str, Any], keep: int = 3) -> Path:
    """Save a host copy of the state; keeps the `keep` newest checkpoints."""
    folder = Path(run_dir) / "checkpoints"
    blob = serialization.to_bytes(state)
    path = folder / f"ckpt-{step:010d}.msgpack"
    atomic_write(path, blob)
    sidecar = {**meta, "step": step, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    atomic_write(path.with_suffix(".json"), json.dumps(sidecar, indent=1, sort_keys=True))
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files sorted by step (ascending)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def read_verified(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The checkpoint's bytes and sidecar, after checking size and checksum."""
    side = path.with_suffix(".json")
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{side}: missing or unreadable checkpoint metadata ({e})") from None
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if len(blob) != meta.get("bytes") or hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt: {len(blob)} bytes, "
                              f"expected {meta.get('bytes')})")
    return blob, meta


def load_latest(run_dir: Path, template: Any, check: Callable[[Path, dict[str, Any]], None] | None = None
                ) -> tuple[Any, dict[str, Any]]:
    """Restore the newest intact checkpoint into the structure of `template`.

    Only damage (missing sidecar, size or checksum mismatch) falls back to the previous checkpoint.
    An intact checkpoint that does not fit (`check(path, meta)` raising, or a structure mismatch) is
    an error at once: an older checkpoint of the same run would not fit either.
    """
    paths = list_checkpoints(run_dir)
    if not paths:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: no checkpoint to resume from")
    for path in reversed(paths):
        try:
            blob, meta = read_verified(path)
        except CheckpointError as e:
            print(f"warning: {e}; trying the previous checkpoint", file=sys.stderr)
            continue
        if check is not None:
            check(path, meta)
        return restore(blob, template, path), meta
    raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: no intact checkpoint ({len(paths)} corrupt)")


def restore(blob: bytes, template: Any, path: Path) -> Any:
    """`template` filled from the checkpoint's bytes."""
    try:
        return serialization.from_bytes(template, blob)
    except Exception as e:  # msgpack / structure mismatch
        raise CheckpointError(f"{path}: does not match the model of this config ({e})") from None
