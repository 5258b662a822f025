"""Pure-numpy reader for TensorFlow 1 checkpoints (the "tensor bundle" format).

A TF1 checkpoint with prefix ``P`` is

* ``P.index``: an SSTable (LevelDB table format) mapping tensor names to
  ``BundleEntryProto`` records (dtype, shape, shard, offset, size, masked crc32c); the
  empty key holds a ``BundleHeaderProto`` (number of shards, endianness);
* ``P.data-0000S-of-0000N``: the raw little-endian tensor bytes, one file per shard.

Only what TensorFlow's ``tf.train.Saver`` writes for dense numeric variables is supported:
uncompressed SSTable blocks, unsliced tensors, fixed-width dtypes. Every block and every
tensor is checked against its crc32c; any problem raises
:class:`ucluster_jax.errors.CheckpointError` naming the file (and tensor).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ucluster_jax.errors import CheckpointError

__all__ = [
    "TensorEntry",
    "crc32c",
    "masked_crc32c",
    "read_tf1_checkpoint",
    "read_tf1_index",
    "resolve_tf1_prefix",
]

# ----------------------------------------------------------------------------- crc32c
_POLY = 0x82F63B78  # Castagnoli, reflected


def _make_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table[i] = c
    return table


_TABLE = _make_table()
_TABLE_LIST = [int(v) for v in _TABLE]
_CHUNK = 1024  # bytes per lane in the vectorised crc
_zero_ops: dict[int, list[list[int]]] = {}


def _raw_crc_py(reg: int, data: bytes | memoryview) -> int:
    table = _TABLE_LIST
    for b in data:
        reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


def _zero_operator(n: int) -> list[list[int]]:
    """Byte tables of the linear map "feed n zero bytes into the crc register"."""
    if n not in _zero_ops:
        start = np.concatenate([np.arange(256, dtype=np.uint32) << np.uint32(8 * k) for k in range(4)])
        reg = start
        for _ in range(n):
            reg = _TABLE[reg & 0xFF] ^ (reg >> np.uint32(8))
        _zero_ops[n] = [[int(v) for v in reg[256 * k : 256 * (k + 1)]] for k in range(4)]
    return _zero_ops[n]


def _raw_crc(reg: int, data: bytes | memoryview) -> int:
    """Advance the (unconditioned) crc32c register over data.

    Long inputs are cut into lanes of ``_CHUNK`` bytes whose registers are computed
    side by side with numpy, then chained with the zero-feed operator: the register update
    is linear over GF(2), so F(r, A||B) = Z_|B|(F(r, A)) ^ F(0, B).
    """
    n = len(data)
    n_lanes = n // _CHUNK
    if n_lanes < 4:
        return _raw_crc_py(reg, data)
    body = np.frombuffer(data, dtype=np.uint8, count=n_lanes * _CHUNK).reshape(n_lanes, _CHUNK)
    cols = np.ascontiguousarray(body.T).astype(np.uint32)
    lanes = np.zeros(n_lanes, dtype=np.uint32)
    eight = np.uint32(8)
    for j in range(_CHUNK):
        lanes = _TABLE[(lanes ^ cols[j]) & 0xFF] ^ (lanes >> eight)
    t0, t1, t2, t3 = _zero_operator(_CHUNK)
    for lane in lanes.tolist():
        reg = t0[reg & 0xFF] ^ t1[(reg >> 8) & 0xFF] ^ t2[(reg >> 16) & 0xFF] ^ t3[reg >> 24] ^ lane
    return _raw_crc_py(reg, memoryview(data)[n_lanes * _CHUNK :])


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C (Castagnoli) of data, as used by LevelDB tables and TensorFlow bundles."""
    return _raw_crc(0xFFFFFFFF, data) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | memoryview) -> int:
    """The "masked" crc32c that TensorFlow stores (rotate right by 15, add a constant)."""
    c = crc32c(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- protobuf
def _varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError(f"truncated varint in {what}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError(f"varint too long in {what}")


def _proto_fields(buf: bytes, what: str) -> dict[int, list]:
    """Minimal protobuf wire-format decoder: field number -> list of raw values."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos, what)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos, what)
        elif wire == 1:
            value = buf[pos : pos + 8]
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos, what)
            value = buf[pos : pos + length]
            pos += length
        elif wire == 5:
            value = buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in {what}")
        if pos > len(buf):
            raise ValueError(f"truncated protobuf field {number} in {what}")
        fields.setdefault(number, []).append(value)
    return fields


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


# TensorFlow DataType enum -> numpy dtype (little-endian, fixed width only)
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    17: np.dtype("<u2"),  # DT_UINT16
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}
_DTYPE_NAMES = {7: "string", 8: "complex64", 14: "bfloat16", 18: "complex128", 20: "resource", 21: "variant"}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in the bundle (a decoded BundleEntryProto)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # masked, as stored


# ----------------------------------------------------------------------------- SSTable
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_BLOCK_TRAILER = 5


def _read_block(data: bytes, offset: int, size: int, path: Path) -> bytes:
    end = offset + size
    if offset < 0 or end + _BLOCK_TRAILER > len(data):
        raise CheckpointError(f"{path}: truncated index file (block at {offset}+{size} beyond {len(data)} bytes)")
    contents = data[offset:end]
    ctype = data[end]
    (stored,) = struct.unpack_from("<I", data, end + 1)
    if masked_crc32c(data[offset : end + 1]) != stored:
        raise CheckpointError(f"{path}: corrupt index file (crc32c mismatch in block at offset {offset})")
    if ctype == 1:
        raise CheckpointError(
            f"{path}: snappy-compressed index block at offset {offset}; only uncompressed blocks are supported"
        )
    if ctype != 0:
        raise CheckpointError(f"{path}: unknown block compression type {ctype} at offset {offset}")
    return contents


def _block_entries(block: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    what = f"index block of {path}"
    if len(block) < 4:
        raise CheckpointError(f"{path}: corrupt index file (block shorter than its restart count)")
    (n_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * n_restarts
    if limit < 0:
        raise CheckpointError(f"{path}: corrupt index file (bad restart count {n_restarts})")
    out: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    try:
        while pos < limit:
            shared, pos = _varint(block, pos, what)
            unshared, pos = _varint(block, pos, what)
            vlen, pos = _varint(block, pos, what)
            if shared > len(key) or pos + unshared + vlen > limit:
                raise ValueError("entry overruns its block")
            key = key[:shared] + block[pos : pos + unshared]
            pos += unshared
            out.append((key, block[pos : pos + vlen]))
            pos += vlen
    except ValueError as exc:
        raise CheckpointError(f"{path}: corrupt index file ({exc})") from None
    return out


def _table_items(path: Path) -> list[tuple[bytes, bytes]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint index ({exc.strerror or exc})") from None
    if len(data) < _FOOTER_LEN:
        raise CheckpointError(f"{path}: truncated index file ({len(data)} bytes, footer needs {_FOOTER_LEN})")
    footer = data[-_FOOTER_LEN:]
    (magic,) = struct.unpack_from("<Q", footer, _FOOTER_LEN - 8)
    if magic != _TABLE_MAGIC:
        raise CheckpointError(f"{path}: not a TensorFlow checkpoint index (bad table magic)")
    try:
        pos = 0
        _meta_off, pos = _varint(footer, pos, "footer")
        _meta_size, pos = _varint(footer, pos, "footer")
        idx_off, pos = _varint(footer, pos, "footer")
        idx_size, pos = _varint(footer, pos, "footer")
    except ValueError as exc:
        raise CheckpointError(f"{path}: corrupt index file footer ({exc})") from None
    items: list[tuple[bytes, bytes]] = []
    for _last_key, handle in _block_entries(_read_block(data, idx_off, idx_size, path), path):
        try:
            off, p = _varint(handle, 0, "block handle")
            size, _ = _varint(handle, p, "block handle")
        except ValueError as exc:
            raise CheckpointError(f"{path}: corrupt index file ({exc})") from None
        items.extend(_block_entries(_read_block(data, off, size, path), path))
    return items


# ----------------------------------------------------------------------------- bundle
def resolve_tf1_prefix(path: str | Path) -> Path:
    """Turn a checkpoint directory, ``.index`` file or prefix into the checkpoint prefix.

    A directory must hold a ``checkpoint`` text file whose ``model_checkpoint_path`` names
    the prefix (relative to the directory, or absolute; an absolute path from another
    machine falls back to its basename inside the directory).
    """
    p = Path(path)
    if p.is_dir():
        state = p / "checkpoint"
        try:
            text = state.read_text()
        except OSError:
            raise CheckpointError(
                f"{p}: directory holds no TensorFlow 'checkpoint' file; pass the checkpoint prefix instead"
            ) from None
        m = re.search(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"', text, re.M)
        if not m:
            raise CheckpointError(f"{state}: no model_checkpoint_path entry")
        name = Path(m.group(1).encode().decode("unicode_escape"))
        candidates = [name if name.is_absolute() else p / name, p / name.name]
        for cand in candidates:
            if Path(f"{cand}.index").is_file():
                return cand
        raise CheckpointError(f"{state}: names checkpoint {name}, but {candidates[0]}.index does not exist")
    if p.name.endswith(".index"):
        p = p.with_name(p.name[: -len(".index")])
    if not Path(f"{p}.index").is_file():
        raise CheckpointError(f"{p}.index: no such checkpoint index file")
    return p


def read_tf1_index(prefix: str | Path) -> tuple[Path, int, dict[str, TensorEntry]]:
    """Parse ``<prefix>.index``: returns (prefix, number of data shards, name -> entry)."""
    prefix = resolve_tf1_prefix(prefix)
    index_path = Path(f"{prefix}.index")
    num_shards = 1
    entries: dict[str, TensorEntry] = {}
    for raw_key, value in _table_items(index_path):
        try:
            fields = _proto_fields(value, f"entry {raw_key!r}")
        except ValueError as exc:
            raise CheckpointError(f"{index_path}: corrupt index entry ({exc})") from None
        if raw_key == b"":  # BundleHeaderProto
            num_shards = int(fields.get(1, [1])[0])
            if int(fields.get(2, [0])[0]) != 0:
                raise CheckpointError(f"{index_path}: big-endian checkpoints are not supported")
            continue
        name = raw_key.decode("utf-8", errors="replace")
        if 7 in fields:
            raise CheckpointError(f"{index_path}: tensor {name!r} is stored in slices (partitioned); not supported")
        code = int(fields.get(1, [0])[0])
        if code not in _DTYPES:
            label = _DTYPE_NAMES.get(code, f"enum {code}")
            raise CheckpointError(f"{index_path}: tensor {name!r} has unsupported dtype {label}")
        shape: list[int] = []
        if 2 in fields:
            dims = _proto_fields(fields[2][0], f"shape of {name!r}")
            for dim in dims.get(2, []):
                shape.append(_signed64(int(_proto_fields(dim, f"shape of {name!r}").get(1, [0])[0])))
            if dims.get(3, [0])[0] or any(d < 0 for d in shape):
                raise CheckpointError(f"{index_path}: tensor {name!r} has an unknown shape")
        crc = fields.get(6, [None])[0]
        entries[name] = TensorEntry(
            name=name,
            dtype=_DTYPES[code],
            shape=tuple(shape),
            shard_id=int(fields.get(3, [0])[0]),
            offset=int(fields.get(4, [0])[0]),
            size=int(fields.get(5, [0])[0]),
            crc32c=None if crc is None else struct.unpack("<I", crc)[0],
        )
    return prefix, num_shards, entries


def _data_path(prefix: Path, shard: int, num_shards: int) -> Path:
    return Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")


def read_tf1_checkpoint(prefix: str | Path, *, verify: bool = True) -> dict[str, np.ndarray]:
    """Read every tensor of a TF1 checkpoint into numpy arrays, keyed by variable name.

    ``prefix`` is the checkpoint prefix (``.../cluster.ckpt``), its ``.index`` file, or a
    directory with a ``checkpoint`` file. With ``verify`` (default) each tensor's bytes are
    checked against the stored masked crc32c.
    """
    prefix, num_shards, entries = read_tf1_index(prefix)
    out: dict[str, np.ndarray] = {}
    handles: dict[int, tuple[Path, object, int]] = {}
    try:
        for name, e in entries.items():
            if not 0 <= e.shard_id < num_shards:
                raise CheckpointError(f"{prefix}.index: tensor {name!r} names shard {e.shard_id} of {num_shards}")
            if e.shard_id not in handles:
                path = _data_path(prefix, e.shard_id, num_shards)
                try:
                    fh = open(path, "rb")
                except OSError as exc:
                    raise CheckpointError(f"{path}: cannot open checkpoint data ({exc.strerror or exc})") from None
                fh.seek(0, 2)
                handles[e.shard_id] = (path, fh, fh.tell())
            path, fh, file_size = handles[e.shard_id]
            count = int(np.prod(e.shape, dtype=np.int64))
            expected = count * e.dtype.itemsize
            if e.size != expected:
                raise CheckpointError(
                    f"{path}: tensor {name!r} stores {e.size} bytes, but {e.dtype} {list(e.shape)} needs {expected}"
                )
            if e.offset + e.size > file_size:
                raise CheckpointError(
                    f"{path}: truncated; tensor {name!r} needs bytes {e.offset}..{e.offset + e.size}"
                    f" but the file has {file_size}"
                )
            fh.seek(e.offset)
            raw = fh.read(e.size)
            if len(raw) != e.size:
                raise CheckpointError(f"{path}: truncated while reading tensor {name!r}")
            if verify and e.crc32c is not None and masked_crc32c(raw) != e.crc32c:
                raise CheckpointError(f"{path}: corrupt data, crc32c mismatch for tensor {name!r}")
            arr = np.frombuffer(raw, dtype=e.dtype, count=count).reshape(e.shape)
            out[name] = arr.astype(e.dtype.newbyteorder("="), copy=True)
    finally:
        for _path, fh, _size in handles.values():
            fh.close()
    return out
