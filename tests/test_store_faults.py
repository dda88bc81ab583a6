"""Store faults: NaN/inf rows refused when a shard is opened (naming shard, row and key), shard files
replaced after embedding refused (naming the file), an old store without fingerprints still read,
every store write fsynced before its rename and the folder after it."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from test_atomic import events  # noqa: F401  (the fixture: every fsync and rename, in order)

from lift_fast.atomic import write_json
from lift_fast.store import (
    StoreError,
    finished_shard,
    load_store,
    open_store,
    record_files,
    shard_files,
    store_rows,
    write_shard,
)
from lift_fast.store import reader as store_module
from lift_fast.store.manifest import new_manifest, record_shard

IDENTITY = {"model": "tiny", "pooling": "mean", "prompt": "", "max_length": 77, "normalize": False, "dim": 6}


def make_store(folder, shards: dict[str, np.ndarray], dtype: str = "float16"):
    """A store written by the real writer (write_shard, record_shard): shard name -> float32 rows [n, 6]."""
    folder.mkdir()
    manifest = new_manifest(IDENTITY, dtype, folder)
    manifest["data_shards"] = list(shards)
    write_json(folder / "manifest.json", manifest)
    for name, rows in shards.items():
        keys = [f"{name}-{i:03d}" for i in range(len(rows))]
        stored, scales = store_rows(rows, dtype)
        entry = write_shard(folder, name, keys, stored, {"source": f"{name}.tar"}, [f"caption {k}" for k in keys], scales)
        record_shard(folder, name, entry)
    return folder


def poison(folder, name: str, rows: np.ndarray) -> None:
    """Put rows holding NaN/inf into a written shard, as bit rot or a foreign tool would (write_shard
    refuses them), and record the files so that the fingerprint check lets them through to the row check."""
    np.save(folder / f"{name}.npy", rows.astype(np.load(folder / f"{name}.npy", mmap_mode="r").dtype))
    record_files(folder, name)


def rows_of(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 6)).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("bad_row", [0, 4, 6])  # first, in the second block of 3 rows (CHECK_ROWS=3 below), last
def test_nonfinite_row_is_refused_naming_shard_row_and_key(tmp_path, monkeypatch, dtype, bad_value, bad_row):
    monkeypatch.setattr(store_module, "CHECK_ROWS", 3)  # 7 rows in blocks of 3, 3, 1
    rows = rows_of(7, 1)
    rows[bad_row, 5] = bad_value
    folder = make_store(tmp_path / "store", {"00000": rows_of(5, 0), "00001": rows_of(7, 1)}, dtype)
    poison(folder, "00001", rows)
    store = open_store(folder)
    np.testing.assert_allclose(np.asarray(store.embeddings("00000"), dtype=np.float32), rows_of(5, 0), atol=2e-3)
    with pytest.raises(StoreError) as err:
        store.embeddings("00001")
    message = str(err.value)
    assert str(folder / "00001.npy") in message and f"row {bad_row} (key '00001-{bad_row:03d}')" in message
    assert "1 row(s) hold NaN or inf" in message
    with pytest.raises(StoreError, match="NaN or inf"):
        load_store(folder)


def test_every_nonfinite_row_is_counted_and_extreme_finite_rows_pass(tmp_path):
    rows = np.full((9, 6), 65504.0, dtype=np.float32)  # float16's largest: a float16 sum would overflow
    rows[1::2] *= -1
    folder = make_store(tmp_path / "ok", {"00000": rows})
    assert np.isfinite(np.asarray(open_store(folder).embeddings("00000"), dtype=np.float32)).all()

    rows = rows_of(9, 2)
    rows[[2, 3, 8], 0] = [np.nan, np.inf, -np.inf]
    folder = make_store(tmp_path / "bad", {"00000": rows_of(9, 2)}, "float32")
    poison(folder, "00000", rows)
    with pytest.raises(StoreError, match=r"3 row\(s\) hold NaN or inf: row 2 .*, row 3 .*, row 8 "):
        open_store(folder).embeddings("00000")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nonfinite_rows_agree_with_numpy_on_extreme_values(tmp_path, monkeypatch, dtype):
    """The exponent-bit test against np.isfinite, over rows of subnormals, +-0, +-max, NaNs with payloads."""
    monkeypatch.setattr(store_module, "CHECK_ROWS", 7)
    info = np.finfo(dtype)
    bits = np.dtype(f"<u{np.dtype(dtype).itemsize}")
    specials = np.array([0.0, -0.0, info.max, -info.max, info.tiny, info.smallest_subnormal, np.inf, -np.inf, np.nan],
                        dtype=dtype)
    payload_nan = (np.array([np.nan], dtype=dtype).view(bits) | bits.type(1)).view(dtype)  # a NaN other than numpy's
    rng = np.random.default_rng(int(np.dtype(dtype).itemsize))
    rows = rng.standard_normal((61, 13)).astype(dtype)
    for row in rng.choice(61, 20, replace=False):
        rows[row, rng.integers(13)] = rng.choice(np.concatenate([specials, payload_nan]))
    np.save(tmp_path / "rows.npy", rows)
    found = store_module.nonfinite_rows(tmp_path / "rows.npy", np.load(tmp_path / "rows.npy", mmap_mode="r"))
    expected = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    assert 0 < len(expected) < 20 and found.tolist() == expected.tolist()


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_writer_refuses_nonfinite_rows_naming_the_keys(tmp_path, dtype):
    """What the encoder gives is checked before a shard is written: nothing of it reaches the store."""
    rows = rows_of(6, 4)
    rows[[1, 4], 2] = [np.nan, np.inf]
    folder = make_store(tmp_path / "store", {"00000": rows_of(3, 0)}, dtype)
    before = sorted(p.name for p in folder.iterdir())
    stored, scales = store_rows(rows, dtype)
    keys = [f"k{i}" for i in range(6)]
    with pytest.raises(StoreError, match=r"shard 00001: the encoder gave NaN or inf rows for 2 caption\(s\) \(keys 'k1', 'k4'\)"):
        write_shard(folder, "00001", keys, stored, {}, keys, scales)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_int8_store_with_a_nonfinite_scale_is_refused(tmp_path):
    folder = make_store(tmp_path / "store", {"00000": rows_of(4, 3)}, "int8")
    scales_path = folder / "00000.scales.npy"
    scales = np.load(scales_path)
    scales[2] = np.inf
    np.save(scales_path, scales)
    record_files(folder, "00000")  # a deliberate rewrite, so the fingerprint check passes
    with pytest.raises(StoreError, match=r"00000.npy: 1 row\(s\) hold NaN or inf \(its scale in 00000.scales.npy\): row 2"):
        open_store(folder).embeddings("00000")


@pytest.mark.parametrize("replaced", ["00001.npy", "00001.keys.txt", "00001.caption_hash.npy"])
def test_shard_file_replaced_after_embedding_is_refused_naming_it(tmp_path, replaced):
    """Another shard's file of the same size put in place of this one's: refused where it is read."""
    folder = make_store(tmp_path / "store", {"00000": rows_of(5, 0), "00001": rows_of(5, 1)})
    other = folder / replaced.replace("00001", "00000")
    if replaced.endswith(".keys.txt"):  # the same size, other keys
        other.write_text((folder / replaced).read_text().replace("-0", "-9"))
    assert other.stat().st_size == (folder / replaced).stat().st_size
    shutil.copyfile(other, folder / replaced)
    store = open_store(folder)
    read = {"00001.npy": store.embeddings, "00001.keys.txt": store.keys,
            "00001.caption_hash.npy": store.caption_hashes}[replaced]
    with pytest.raises(StoreError) as err:
        read("00001")
    assert str(folder / replaced) in str(err.value) and "replaced or changed after it was embedded" in str(err.value)
    assert str(folder / "manifest.json") in str(err.value)
    assert finished_shard(folder, "00001") is None  # so `lift-fast embed` redoes the shard


def test_shard_file_of_another_size_is_refused_naming_both_sizes(tmp_path):
    """The rows' file with a byte appended: its header and rows read as before, its size gives it away."""
    folder = make_store(tmp_path / "store", {"00000": rows_of(5, 0)})
    npy = folder / "00000.npy"
    size = npy.stat().st_size
    with open(npy, "ab") as f:
        f.write(b"\0")
    assert np.load(npy, mmap_mode="r").shape == (5, 6)
    with pytest.raises(StoreError, match=f"{size + 1} bytes, the embed run wrote {size}"):
        open_store(folder).embeddings("00000")


def test_old_store_without_fingerprints_still_loads(tmp_path):
    """Version 3 (no `files` per shard): read without the file check (there is nothing to check against)."""
    folder = make_store(tmp_path / "store", {"00000": rows_of(4, 0), "00001": rows_of(3, 1)})
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = 3
    for entry in manifest["shards"].values():
        del entry["files"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    keys, rows, read = load_store(folder)
    assert len(keys) == 7 and rows.shape == (7, 6) and read["version"] == 3
    np.testing.assert_allclose(rows.astype(np.float32), np.concatenate([rows_of(4, 0), rows_of(3, 1)]), atol=2e-3)


def test_manifest_and_shard_files_record_the_same_fingerprints(tmp_path):
    folder = make_store(tmp_path / "store", {"00000": rows_of(4, 0)}, "int8")
    entry = json.loads((folder / "manifest.json").read_text())["shards"]["00000"]
    assert entry == json.loads(shard_files(folder, "00000")[2].read_text())
    assert sorted(entry["files"]) == ["00000.caption_hash.npy", "00000.keys.txt", "00000.npy", "00000.scales.npy"]
    for name, fingerprint in entry["files"].items():
        assert fingerprint["bytes"] == (folder / name).stat().st_size


def test_every_store_write_is_fsynced_then_renamed_then_the_folder_fsynced(tmp_path, events):  # noqa: F811
    folder = make_store(tmp_path / "store", {"00000": rows_of(3, 0)}, "int8")
    renames = [i for i, event in enumerate(events) if event[0] == "rename"]
    written = [os.path.basename(events[i][2]) for i in renames]
    assert written == ["manifest.json", "00000.keys.txt", "00000.caption_hash.npy", "00000.scales.npy",
                       "00000.json", "00000.npy", "manifest.json"]  # the rows last of the shard's files
    for i in renames:
        assert events[i - 1] == ("fsync", events[i][1]), f"{events[i][2]} renamed before its temporary was fsynced"
        assert events[i + 1] == ("fsync", str(folder)), f"the folder was not fsynced after {events[i][2]}"


def test_threads_reading_one_store_past_its_bound_agree(tmp_path):
    """Two threads (a loader's producer and its caller) walking shards in other orders, two kept open."""
    from concurrent.futures import ThreadPoolExecutor

    shards = {f"{i:05d}": rows_of(4, i) for i in range(6)}
    folder = make_store(tmp_path / "store", shards, "float32")
    store = open_store(folder, open_shards=2)

    def walk(order):
        for _ in range(20):
            for name in order:
                np.testing.assert_array_equal(np.asarray(store.embeddings(name)[3]), shards[name][3])
                assert store.row_index(name)[f"{name}-003"] == 3 and len(store.caption_hashes(name)) == 4
        return len(store._open)

    with ThreadPoolExecutor(2) as pool:
        assert all(n <= 2 for n in pool.map(walk, [sorted(shards), sorted(shards, reverse=True)]))
