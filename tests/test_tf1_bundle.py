"""The pure-numpy TF1 checkpoint reader, on the original UCluster checkpoint."""

from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED
from ucluster_jax.errors import CheckpointError
from ucluster_jax.tf1 import bundle
from ucluster_jax.tf1.bundle import crc32c, masked_crc32c, read_tf1_checkpoint, read_tf1_index, resolve_tf1_prefix

CKPT_DIR = SHARED / "original_ucluster_ckpt"
PREFIX = CKPT_DIR / "cluster.ckpt"
FIXTURE = Path(__file__).parent / "data" / "tf1_reference.npz"

needs_ckpt = pytest.mark.usefixtures("tf1_checkpoint")

BOOKKEEPING = re.compile(r"(/Adam(_1)?$|ExponentialMovingAverage$|^beta[12]_power$|^Variable$)")


@pytest.fixture(scope="module")
def ckpt(tf1_checkpoint) -> dict[str, np.ndarray]:
    return read_tf1_checkpoint(tf1_checkpoint)


def _copy_ckpt(dst: Path) -> Path:
    for f in CKPT_DIR.iterdir():
        if f.name.startswith("cluster.ckpt") or f.name == "checkpoint":
            shutil.copyfile(f, dst / f.name)
            (dst / f.name).chmod(0o644)
    return dst / "cluster.ckpt"


# ---------------------------------------------------------------- crc32c
def test_crc32c_known_vectors():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    # RFC 3720 (iSCSI) B.4
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


@pytest.mark.parametrize("n", [1023, 4096, 4097, 10_000, 70_001])
def test_crc32c_vectorised_path_matches_bytewise(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert crc32c(data) == bundle._raw_crc_py(0xFFFFFFFF, data) ^ 0xFFFFFFFF


def test_masked_crc_roundtrip_definition():
    c = crc32c(b"abc")
    assert masked_crc32c(b"abc") == ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------- the shipped checkpoint
@needs_ckpt
def test_shipped_checkpoint_entries(ckpt):
    assert len(ckpt) == 222
    assert ckpt["agg/weights"].dtype == np.float32 and ckpt["agg/weights"].shape == (1, 1, 848, 3)
    assert ckpt["mu"].shape == (3, 3) and ckpt["mu"].dtype == np.float32
    assert ckpt["Variable"].dtype == np.int32 and ckpt["Variable"].shape == () and int(ckpt["Variable"]) == 118200
    assert ckpt["gapnet01/weights"].shape == (1, 1, 24, 64)
    assert ckpt["gapnet11/weights"].shape == (1, 1, 136, 256)
    assert ckpt["fc3/weights"].shape == (128, 20)
    assert ckpt["BiasAdd/biases"].shape == (16,) and ckpt["BiasAdd_1/biases"].shape == (128,)
    assert "layerfilter0_newfea_conv_head_0/biases" not in ckpt  # the GAP self projection has no bias
    ema = ckpt["gapnet01/bn/gapnet01/bn/moments/Squeeze_1/ExponentialMovingAverage"]
    assert ema.shape == (64,) and (ema > 0).all()  # a variance
    assert all(np.isfinite(v).all() for v in ckpt.values())


@needs_ckpt
def test_trainable_parameter_count(ckpt):
    trainable = {k: v for k, v in ckpt.items() if not BOOKKEEPING.search(k)}
    assert len(trainable) == 63
    assert sum(v.size for v in trainable.values()) == 186_210
    assert sum(v.size for k, v in trainable.items() if k != "mu") == 186_201
    # every trainable tensor has its two Adam slots, every BatchNorm its two moving averages
    for k, v in trainable.items():
        assert ckpt[f"{k}/Adam"].shape == v.shape and ckpt[f"{k}/Adam_1"].shape == v.shape
    n_bn = sum(1 for k in trainable if k.endswith("/bn/gamma"))
    assert n_bn == 15
    assert sum(1 for k in ckpt if k.endswith("ExponentialMovingAverage")) == 2 * n_bn


@needs_ckpt
def test_mu_matches_training_log(ckpt):
    log = (CKPT_DIR / "log_dkm.txt").read_text()
    blocks = re.findall(r"mu: (\[\[.*?\]\])", log, flags=re.S)
    assert blocks
    last = np.array([[float(t) for t in row.split()] for row in re.findall(r"\[([^\[\]]+)\]", blocks[-1])])
    assert last.shape == (3, 3)
    np.testing.assert_allclose(ckpt["mu"], last, rtol=0, atol=5.1e-9)


@needs_ckpt
def test_prefix_resolution(tmp_path):
    assert resolve_tf1_prefix(CKPT_DIR) == PREFIX
    assert resolve_tf1_prefix(f"{PREFIX}.index") == PREFIX
    assert resolve_tf1_prefix(PREFIX) == PREFIX
    prefix, num_shards, entries = read_tf1_index(CKPT_DIR)
    assert prefix == PREFIX and num_shards == 1 and len(entries) == 222
    e = entries["agg/weights"]
    assert e.shape == (1, 1, 848, 3) and e.size == 848 * 3 * 4 and e.shard_id == 0
    # a 'checkpoint' file written on another machine (absolute path) falls back to the basename
    copy = _copy_ckpt(tmp_path)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "/home/someone/logs/cluster.ckpt"\n')
    assert resolve_tf1_prefix(tmp_path) == copy


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint"):
        resolve_tf1_prefix(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nothing.index"))):
        read_tf1_checkpoint(tmp_path / "nothing")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "gone.ckpt"\n')
    with pytest.raises(CheckpointError, match="gone.ckpt"):
        read_tf1_checkpoint(tmp_path)


# ---------------------------------------------------------------- damaged copies
@needs_ckpt
def test_flipped_byte_in_data_names_file_and_tensor(tmp_path):
    prefix = _copy_ckpt(tmp_path)
    data = Path(f"{prefix}.data-00000-of-00001")
    entry = read_tf1_index(prefix)[2]["agg/weights"]
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 10] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as err:
        read_tf1_checkpoint(prefix)
    assert str(data) in str(err.value) and "'agg/weights'" in str(err.value) and "crc32c" in str(err.value)
    # without verification the damaged bytes are read as they are
    assert read_tf1_checkpoint(prefix, verify=False)["agg/weights"].shape == (1, 1, 848, 3)


@needs_ckpt
def test_truncated_data_file(tmp_path):
    prefix = _copy_ckpt(tmp_path)
    data = Path(f"{prefix}.data-00000-of-00001")
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(CheckpointError, match=r"truncated") as err:
        read_tf1_checkpoint(prefix)
    assert str(data) in str(err.value)


@needs_ckpt
def test_missing_data_file(tmp_path):
    prefix = _copy_ckpt(tmp_path)
    Path(f"{prefix}.data-00000-of-00001").unlink()
    with pytest.raises(CheckpointError, match=r"data-00000-of-00001"):
        read_tf1_checkpoint(prefix)


@needs_ckpt
def test_corrupt_or_truncated_index(tmp_path):
    prefix = _copy_ckpt(tmp_path)
    index = Path(f"{prefix}.index")
    good = index.read_bytes()
    bad = bytearray(good)
    bad[40] ^= 0x01  # inside the first data block
    index.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match=re.escape(str(index))):
        read_tf1_checkpoint(prefix)
    index.write_bytes(good[:-10])
    with pytest.raises(CheckpointError, match=re.escape(str(index))):
        read_tf1_checkpoint(prefix)


@needs_ckpt
def test_compressed_block_is_refused(tmp_path):
    prefix = _copy_ckpt(tmp_path)
    index = Path(f"{prefix}.index")
    raw = bytearray(index.read_bytes())
    footer = bytes(raw[-48:])
    pos = 0
    for _ in range(2):  # skip the metaindex handle
        _, pos = bundle._varint(footer, pos, "footer")
    idx_off, pos = bundle._varint(footer, pos, "footer")
    idx_size, _ = bundle._varint(footer, pos, "footer")
    _, handle = bundle._block_entries(bytes(raw[idx_off : idx_off + idx_size]), index)[0]
    off, p = bundle._varint(handle, 0, "handle")
    size, _ = bundle._varint(handle, p, "handle")
    raw[off + size] = 1  # kSnappyCompression, with a valid trailer crc
    raw[off + size + 1 : off + size + 5] = struct.pack("<I", masked_crc32c(bytes(raw[off : off + size + 1])))
    index.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="snappy") as err:
        read_tf1_checkpoint(prefix)
    assert str(index) in str(err.value)


# ---------------------------------------------------------------- the TensorFlow reference fixture
def test_tf1_reference_fixture_is_consistent():
    """tests/data/tf1_reference.npz (scripts/tf1_reference.py) is self-consistent."""
    ref = np.load(FIXTURE)
    n = ref["x"].shape[0]
    assert ref["x"].shape == (n, 100, 8) and ref["x"].dtype == np.float32
    assert ref["z"].shape == (n, 3) and ref["logits"].shape == (n, 20) and ref["dist"].shape == (n, 3)
    d = ((ref["z"][:, None, :] - ref["mu"][None]) ** 2).sum(-1)
    np.testing.assert_allclose(ref["dist"], d, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(ref["cluster"], ref["dist"].argmin(1))
    m = len(ref["knn_jets"])
    assert ref["knn1"].shape == (m, 100, 10) and ref["knn2"].shape == (m, 100, 10)
    np.testing.assert_allclose(ref["agg_points"].mean(1), ref["z"][ref["knn_jets"]], rtol=1e-5, atol=1e-6)
    assert int(ref["step"]) == 118200


def test_tf1_reference_fixture_comes_from_the_shipped_checkpoint(ckpt):
    np.testing.assert_array_equal(np.load(FIXTURE)["mu"], ckpt["mu"])


# ---------------------------------------------------------------- a synthetic multi-block, multi-shard bundle
def _pb_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _pb_field(number: int, value) -> bytes:
    if isinstance(value, bytes):
        return _pb_varint(number << 3 | 2) + _pb_varint(len(value)) + value
    return _pb_varint(number << 3) + _pb_varint(value)


def _sst_block(items: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    out = bytearray()
    restarts = []
    prev = b""
    for i, (key, value) in enumerate(items):
        if i % restart_interval == 0:
            restarts.append(len(out))
            shared = 0
        else:
            shared = len(os.path.commonprefix([prev, key]))
        out += _pb_varint(shared) + _pb_varint(len(key) - shared) + _pb_varint(len(value)) + key[shared:] + value
        prev = key
    restarts = restarts or [0]
    out += b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))
    return bytes(out)


def _write_bundle(prefix: Path, tensors: dict[str, np.ndarray], num_shards: int, per_block: int) -> None:
    """A minimal TF tensor-bundle writer (verified once against tf.train.load_checkpoint)."""
    codes = {np.dtype("float32"): 1, np.dtype("float64"): 2, np.dtype("int32"): 3, np.dtype("int64"): 9,
             np.dtype("bool"): 10}
    shards = [bytearray() for _ in range(num_shards)]
    items = [(b"", _pb_field(1, num_shards) + _pb_field(3, _pb_field(1, 1)))]
    for i, name in enumerate(sorted(tensors)):
        arr = np.array(tensors[name], order="C")  # (ascontiguousarray would make scalars 1-d)
        shard = i % num_shards
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        shape = b"".join(_pb_field(2, _pb_field(1, d)) for d in arr.shape)
        entry = (_pb_field(1, codes[arr.dtype]) + _pb_field(2, shape) + (_pb_field(3, shard) if shard else b"")
                 + _pb_field(4, len(shards[shard])) + _pb_field(5, len(raw))
                 + _pb_varint(6 << 3 | 5) + struct.pack("<I", masked_crc32c(raw)))
        shards[shard] += raw
        items.append((name.encode(), entry))
    out = bytearray()
    index_items = []

    def emit(block: bytes) -> bytes:
        handle = _pb_varint(len(out)) + _pb_varint(len(block))
        out.extend(block + b"\x00" + struct.pack("<I", masked_crc32c(block + b"\x00")))
        return handle

    for start in range(0, len(items), per_block):
        chunk = items[start : start + per_block]
        index_items.append((chunk[-1][0], emit(_sst_block(chunk, restart_interval=3))))
    meta = emit(_sst_block([], 1))
    index = emit(_sst_block(index_items, 1))
    footer = (meta + index).ljust(40, b"\x00") + struct.pack("<Q", 0xDB4775248B80FB57)
    Path(f"{prefix}.index").write_bytes(bytes(out) + footer)
    for s, data in enumerate(shards):
        Path(f"{prefix}.data-{s:05d}-of-{num_shards:05d}").write_bytes(bytes(data))


def test_synthetic_bundle_dtypes_blocks_and_shards(tmp_path):
    rng = np.random.default_rng(7)
    tensors = {
        "a/float": rng.normal(size=(3, 4)).astype(np.float32),
        "a/float_big": rng.normal(size=(70, 80)).astype(np.float32),  # > 4 kB: vectorised crc
        "a/double": rng.normal(size=(5,)),
        "b/int32": np.arange(-6, 6, dtype=np.int32).reshape(2, 2, 3),
        "b/int64": np.array([2**40, -3, 0], dtype=np.int64),
        "c/bool": np.array([[True, False, True]]),
        "scalar": np.array(118200, dtype=np.int32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    prefix = tmp_path / "model.ckpt"
    _write_bundle(prefix, tensors, num_shards=3, per_block=2)
    got = read_tf1_checkpoint(prefix)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
    # damage the tensor in the last shard: the error names that shard's file
    last = Path(f"{prefix}.data-00002-of-00003")
    raw = bytearray(last.read_bytes())
    raw[-1] ^= 0xFF
    last.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=re.escape(str(last))):
        read_tf1_checkpoint(prefix)
