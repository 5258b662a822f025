"""Parquet schema, shard writer and streaming reader: real files in tmp_path."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ucluster_jax.data.reader import ParquetDataset
from ucluster_jax.data.schema import DatasetMeta, ShardWriter, write_shards
from ucluster_jax.errors import DataError, UserError

META = DatasetMeta(num_points=4, num_features=2, feature_names=("a", "b"))


def arrays(ids: np.ndarray, meta: DatasetMeta = META) -> dict[str, np.ndarray]:
    """Jets whose mass is their id, so every row can be traced through the reader."""
    ids = np.asarray(ids)
    x = np.broadcast_to(ids[:, None, None], (len(ids), meta.num_points, meta.num_features)).astype(np.float32)
    return {"x": x, "target": (ids % 20).astype(np.int32), "label": (ids % 3).astype(np.int32),
            "mass": ids.astype(np.float32)}


def write_raw(path: Path, groups: list[int], start: int = 0, meta: DatasetMeta = META, schema=None, mutate=None):
    """One parquet file with the given row-group sizes, written directly with pyarrow (not our writer)."""
    schema = schema or meta.arrow_schema()
    with pq.ParquetWriter(path, schema) as w:
        for size in groups:
            a = arrays(np.arange(start, start + size), meta)
            if mutate:
                mutate(a)
            cols = [pa.FixedSizeListArray.from_arrays(pa.array(a["x"].reshape(-1)), meta.particle_size),
                    pa.array(a["target"]), pa.array(a["label"]), pa.array(a["mass"])]
            w.write_table(pa.Table.from_arrays(cols, schema=schema), row_group_size=max(size, 1))
            start += size
    return start


def make_ds(tmp_path: Path, shards: list[list[int]]) -> Path:
    d = tmp_path / "ds"
    d.mkdir()
    start = 0
    for i, groups in enumerate(shards):
        start = write_raw(d / f"part-{i:05d}.parquet", groups, start)
    return d


def ids_of(batches) -> np.ndarray:
    return np.concatenate([b["mass"] for b in batches]).astype(np.int64) if batches else np.zeros(0, np.int64)


# -- writer ------------------------------------------------------------------------------------------
def test_write_shards_layout_and_metadata(tmp_path):
    files = write_shards(tmp_path / "out", arrays(np.arange(1000)), META, shard_size=300, row_group_size=128)
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    md = [pq.read_metadata(f) for f in files]
    sizes = [m.row_group(i).num_rows for m in md for i in range(m.num_row_groups)]
    assert sizes == [128] * 7 + [104]  # shard size rounded up to 3 whole groups; only the last is short
    schema = pq.read_schema(files[0])
    assert schema.field("particles").type == pa.list_(pa.float32(), 8)
    assert DatasetMeta.from_metadata(schema.metadata) == META
    assert schema.metadata[b"ucluster.class_names"] == b'["W", "Z", "top"]'
    assert not list((tmp_path / "out").glob(".*"))  # no temporaries left
    ds = ParquetDataset(tmp_path / "out")
    assert ds.num_jets == 1000 and ds.meta == META
    np.testing.assert_array_equal(ds.read_all()["mass"], np.arange(1000))


def test_writer_is_atomic_and_refuses_existing(tmp_path):
    out = tmp_path / "out"
    w = ShardWriter(out, META, shard_size=64, row_group_size=32)
    w.add(arrays(np.arange(200)))  # several shards already on disk under temporary names
    bad = arrays(np.arange(10))
    bad["x"][3, 0, 0] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        with w:
            w.add(bad)
    assert list(out.iterdir()) == []
    write_shards(out, arrays(np.arange(100)), META, row_group_size=16)
    with pytest.raises(UserError, match="already holds"):
        write_shards(out, arrays(np.arange(10)), META)
    write_shards(out, arrays(np.arange(5)), META, overwrite=True)  # fewer shards: old extras removed
    assert [p.name for p in out.iterdir()] == ["part-00000.parquet"]
    assert ParquetDataset(out).num_jets == 5


# -- batches and evaluation order (world-size independence: tests/test_data_global.py) ------------------
@pytest.mark.parametrize("world", [1, 2, 3])
def test_iter_all_blocks_in_file_order(tmp_path, world):
    d = make_ds(tmp_path, [[50, 50, 20], [50, 7], [50, 50]])
    ranks = [ParquetDataset(d, rank=r, world=world) for r in range(world)]
    parts = [list(ds.iter_all(32)) for ds in ranks]
    # the file-order stream in batches of 32 (the last short), contiguous blocks per rank
    assert [len(p) for p in parts] == [(r + 1) * 9 // world - r * 9 // world for r in range(world)]
    flat = [b for p in parts for b in p]
    assert [len(b["mass"]) for b in flat] == [32] * 8 + [277 - 256]
    np.testing.assert_array_equal(ids_of(flat), np.arange(277))
    np.testing.assert_array_equal(np.concatenate([ds.read_all()["mass"] for ds in ranks]), np.arange(277))


def test_iter_all_more_ranks_than_batches(tmp_path):
    d = make_ds(tmp_path, [[10]])
    got = [ParquetDataset(d, rank=r, world=4).read_all() for r in range(4)]
    assert [len(g["mass"]) for g in got] == [0, 0, 0, 10]  # one batch of 10 rows: the last rank's block
    assert got[0]["x"].shape == (0, 4, 2) and got[0]["label"].dtype == np.int32


@pytest.mark.parametrize("world", [1, 2, 3])
def test_local_batches_shapes_and_distinct_rows(tmp_path, world):
    d = make_ds(tmp_path, [[64, 64, 64], [64, 64, 10]])
    ranks = [ParquetDataset(d, rank=r, world=world) for r in range(world)]
    steps = ranks[0].steps_per_epoch(24)
    assert steps == 330 // 24
    seen = []
    for ds in ranks:
        bs = list(ds.batches(24, lanes=6, seed=1, epoch=0, shuffle=True, buffer_row_groups=2))
        assert len(bs) == steps
        b = bs[0]
        assert b["x"].shape == (24 // world, 4, 2) and b["x"].dtype == np.float32
        assert b["target"].dtype == np.int32 and b["label"].dtype == np.int32 and b["mass"].dtype == np.float32
        np.testing.assert_array_equal(b["x"][:, 0, 0], b["mass"])  # columns stay aligned after shuffling
        np.testing.assert_array_equal(b["label"], b["mass"].astype(int) % 3)
        seen.append(ids_of(bs))
    flat = np.concatenate(seen)
    assert len(set(flat.tolist())) == len(flat) == steps * 24  # no row twice, across ranks too


def test_lane_layout_checked(tmp_path):
    d = make_ds(tmp_path, [[64]])
    for lanes, batch, world in ((5, 16, 1), (4, 16, 3), (0, 16, 1)):
        with pytest.raises(UserError, match="lanes must divide"):
            next(ParquetDataset(d, world=world).batches(batch, lanes=lanes, seed=0, epoch=0, shuffle=False))
    with pytest.raises(UserError, match="start step 9"):
        next(ParquetDataset(d).batches(16, lanes=4, seed=0, epoch=0, shuffle=False, start_step=9))


def test_determinism_shuffle_and_resume(tmp_path):
    d = make_ds(tmp_path, [[40] * 5, [40] * 5])
    ds = ParquetDataset(d, rank=1, world=2)
    kw = dict(lanes=4, seed=5, epoch=2, shuffle=True)
    a = list(ds.batches(16, **kw))
    b = list(ParquetDataset(d, rank=1, world=2).batches(16, **kw))
    assert all(np.array_equal(x["x"], y["x"]) and np.array_equal(x["label"], y["label"]) for x, y in zip(a, b))
    assert not np.array_equal(ids_of(a), ids_of(list(ds.batches(16, **{**kw, "epoch": 3}))))
    assert not np.array_equal(ids_of(a), ids_of(list(ds.batches(16, **{**kw, "seed": 6}))))
    plain = list(ds.batches(16, **{**kw, "shuffle": False}))
    # unshuffled: rank 1 owns lanes 2 and 3 = rows 200..399; each batch takes 4 rows of each lane in order
    np.testing.assert_array_equal(plain[0]["mass"], [200, 201, 202, 203, 300, 301, 302, 303])
    np.testing.assert_array_equal(np.sort(ids_of(plain)), np.arange(200, 400))
    resumed = list(ds.batches(16, **kw, start_step=7))
    assert len(resumed) == len(a) - 7
    np.testing.assert_array_equal(ids_of(resumed), ids_of(a[7:]))


def test_streaming_reads_lazily_and_bounds_memory(tmp_path, monkeypatch):
    meta = DatasetMeta(num_points=100, num_features=8)
    d = tmp_path / "big"
    write_shards(d, arrays(np.arange(64 * 128), meta), meta, shard_size=16 * 128, row_group_size=128)
    ds = ParquetDataset(d)
    assert len(ds.groups) == 64
    events: list[str] = []
    orig = ParquetDataset._read_group

    def spy(self, handles, g):
        events.append("read")
        return orig(self, handles, g)

    monkeypatch.setattr(ParquetDataset, "_read_group", spy)
    it = ds.batches(64, lanes=8, seed=0, epoch=0, shuffle=True, buffer_row_groups=2)
    for k in range(1, 20):
        next(it)
        events.append("batch")
        reads, batches = events.count("read"), events.count("batch")
        # per lane: the groups its 8-jet chunks and one 32-jet window reach, each decoded once
        assert reads <= 8 * ((batches * 8 + 32) // 128 + 2)
    monkeypatch.setattr(ParquetDataset, "_read_group", orig)
    group_bytes = 128 * 100 * 8 * 4  # 400 KiB; the whole dataset is 25 MiB
    tracemalloc.start()
    for _ in ParquetDataset(d).batches(64, lanes=8, seed=0, epoch=0, shuffle=True, buffer_row_groups=2):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < (8 + 2 + 4) * group_bytes, peak  # a decoded group per lane, the windows, copies: not 64 groups


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shards=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=4), min_size=1, max_size=4),
    world=st.sampled_from([1, 2, 4]),
    batch=st.sampled_from([4, 8, 12]),
    buffer=st.integers(1, 3),
    shuffle=st.booleans(),
)
def test_property_every_row_once(tmp_path_factory, shards, world, batch, buffer, shuffle):
    """Any row-group sizes: every row at most once per epoch, floor(N/B) batches, fewer than B rows left
    out, all of them when B divides N; a rank reads only the row groups that hold its rows."""
    d = make_ds(tmp_path_factory.mktemp("p"), shards)
    total = sum(map(sum, shards))
    got = []
    for r in range(world):
        ds = ParquetDataset(d, rank=r, world=world)
        bs = list(ds.batches(batch, lanes=4, seed=9, epoch=1, shuffle=shuffle, buffer_row_groups=buffer))
        assert len(bs) == total // batch
        assert all(len(b["mass"]) == batch // world for b in bs)
        got.append(ids_of(bs))
    flat = np.concatenate(got)
    assert len(np.unique(flat)) == len(flat) == total // batch * batch
    if total % batch == 0:
        assert sorted(flat.tolist()) == list(range(total))


# -- bad inputs ------------------------------------------------------------------------------------
def test_bad_inputs_name_the_file(tmp_path):
    d = make_ds(tmp_path, [[10, 10], [10]])
    bad = d / "part-00001.parquet"

    def expect(match: str, **kw):
        with pytest.raises(DataError, match=match) as e:
            ParquetDataset(d, **kw)
        assert str(bad) in str(e.value) or str(d) in str(e.value)
        return str(e.value)

    schema = META.arrow_schema().remove(META.arrow_schema().get_field_index("label"))
    with pq.ParquetWriter(bad, schema) as w:
        a = arrays(np.arange(3))
        w.write_table(pa.Table.from_arrays(
            [pa.FixedSizeListArray.from_arrays(pa.array(a["x"].reshape(-1)), 8), pa.array(a["target"]),
             pa.array(a["mass"])], schema=schema))
    assert str(bad) in expect("missing column 'label'")

    wrong = DatasetMeta(num_points=5, num_features=2, feature_names=("a", "b"))
    write_raw(bad, [4], meta=wrong, schema=wrong.arrow_schema().with_metadata(META.to_metadata()))
    assert "list size 10" in expect("particles")

    write_raw(bad, [4], meta=DatasetMeta(num_points=4, num_features=2, feature_names=("c", "d")))
    expect("differs")

    bad.write_bytes(b"not parquet at all")
    assert str(bad) in expect("not a readable parquet")

    write_raw(bad, [10])
    bad.write_bytes(bad.read_bytes()[:-100])
    assert str(bad) in expect("not a readable parquet")

    bad.unlink()
    assert ParquetDataset(d, rank=2, world=3).num_jets == 20  # fewer row groups than ranks is fine


def test_nonfinite_and_out_of_range_values_found_while_reading(tmp_path):
    d = make_ds(tmp_path, [[10, 10]])
    f = d / "part-00001.parquet"

    def nan_row(a):
        if a["mass"][0] == 30:
            a["x"][2, 1, 1] = np.inf

    write_raw(f, [10, 10], start=20, mutate=nan_row)
    ds = ParquetDataset(d)  # opening reads footers only
    with pytest.raises(DataError, match=r"part-00001.parquet: row group 1: non-finite .*first bad row 2"):
        list(ds.batches(5, lanes=1, seed=0, epoch=0, shuffle=False))
    with pytest.raises(DataError, match="part-00001.parquet: row group 1"):
        ds.read_all()

    def bad_target(a):
        a["target"][4] = 20

    write_raw(f, [10], start=20, mutate=bad_target)
    with pytest.raises(DataError, match=r"part-00001.parquet: row group 0: 'target' outside 0..19"):
        ParquetDataset(d).read_all()


def test_empty_datasets(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty dataset"):
        ParquetDataset(tmp_path / "empty")
    d = tmp_path / "zero"
    d.mkdir()
    write_raw(d / "part-00000.parquet", [0])
    with pytest.raises(DataError, match="empty dataset"):
        ParquetDataset(d)
    with pytest.raises(DataError, match="no such"):
        ParquetDataset(tmp_path / "missing")
    with pytest.raises(UserError):
        ParquetDataset(d, rank=2, world=2)


def test_per_point_targets_and_global_features_roundtrip(tmp_path):
    """The anomaly layout: a class per particle and 4 event features stay aligned with their event."""
    meta = DatasetMeta(num_points=4, num_features=2, feature_names=("a", "b"), num_targets=21, num_global=4,
                       class_names=("background", "signal"), target_per_point=True)
    ids = np.arange(150)
    a = arrays(ids, meta)
    a["target"] = (ids[:, None] + np.arange(4)) % 21
    a["label"] = ids % 2
    a["global"] = ids[:, None] + np.arange(4, dtype=np.float32) / 10
    write_shards(tmp_path / "d", a, meta, row_group_size=40)
    assert pq.read_schema(next((tmp_path / "d").glob("*.parquet"))).field("target").type == pa.list_(pa.int32(), 4)
    ds = ParquetDataset(tmp_path / "d", world=2, rank=1)
    assert ds.meta == meta
    for b in ds.batches(32, lanes=2, seed=3, epoch=0, shuffle=True):
        i = b["mass"].astype(int)
        np.testing.assert_array_equal(b["target"], (i[:, None] + np.arange(4)) % 21)
        np.testing.assert_allclose(b["global"][:, 0], i)
    every = ParquetDataset(tmp_path / "d").read_all()
    np.testing.assert_array_equal(every["target"], a["target"])
    with pytest.raises(ValueError, match=r"target has shape \(150,\), expected \(150, 4\)"):
        write_shards(tmp_path / "e", {**a, "target": ids}, meta)
    bad = {**a, "target": np.where(ids[:, None] == 77, 21, a["target"])}
    write_shards(tmp_path / "f", bad, meta, row_group_size=40)
    with pytest.raises(DataError, match=r"row group 1: 'target' outside 0..20 \(first bad row 37\)"):
        ParquetDataset(tmp_path / "f").read_all()


def test_metadata_written_before_per_point_targets_and_mass_kinds_reads_as_per_jet_jet_mass():
    md = {k.encode(): v.encode() for k, v in META.to_metadata().items()
          if not k.endswith(("target_per_point", ".mass"))}
    assert DatasetMeta.from_metadata(md) == META and not META.target_per_point and META.mass == "jet"
    md[b"ucluster.mass"] = b'"trimmed"'
    with pytest.raises(ValueError, match="mass='trimmed' must be one of jet, massless, softdrop"):
        DatasetMeta.from_metadata(md)
