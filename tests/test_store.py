"""The embedding store: roundtrip, resume, refusing a mismatched store, clear errors for missing files."""

from __future__ import annotations

import hashlib
import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from lift_fast.config import EmbedConfig
from lift_fast.data.shards import ShardWriter
from lift_fast.embed import (
    StoreMismatchError,
    check_manifest,
    embed_shards,
    load_encoder,
    load_store,
    open_store,
)
from lift_fast.embed.store import StoreError, caption_hash

JPEG = b"\xff\xd8\xff\xe0 not a real image \xff\xd9"
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black"]
SHAPES = ["square", "circle", "triangle", "star", "cross"]


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(EmbedConfig(max_length=77))


def make_data(data_dir, n: int, per_shard: int, seed: int | None = None) -> dict[str, str]:
    """Shards of n samples with distinct captions and gaps in the keys; returns key -> caption."""
    rng = np.random.default_rng(seed)
    captions = {}
    with ShardWriter(data_dir, samples_per_shard=per_shard) as writer:
        for i in range(n):
            key = f"{3 * i + int(rng.integers(0, 3)):06d}"
            a, b = rng.choice(COLOURS, 2), rng.choice(SHAPES, 2)
            captions[key] = f"sample {i}: a {a[0]} {b[0]} left of a {a[1]} {b[1]}"
            writer.write(key, {"jpg": JPEG, "txt": captions[key], "json": {"i": i}})
    return captions


def snapshot(folder) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_roundtrip_rows_follow_keys(tmp_path, minilm, dtype):
    captions = make_data(tmp_path / "data", n=23, per_shard=8)  # shards of 8, 8, 7
    cfg = EmbedConfig(dtype=dtype, batch_size=5)

    summary = embed_shards(tmp_path / "data", tmp_path / "store", cfg, encoder=minilm, progress=False)
    keys, embeddings, manifest = load_store(tmp_path / "store")

    assert keys == list(captions)
    assert embeddings.shape == (23, 384) and embeddings.dtype == np.dtype(dtype)
    expected = minilm.encode(list(captions.values()), batch_size=23).numpy()  # one order, one batch: independent of the run's
    np.testing.assert_allclose(embeddings.astype(np.float32), expected, atol=2e-3 if dtype == "float16" else 1e-5)
    assert summary["shards"] == 3 and summary["rows"] == 23 and summary["skipped"] == 0
    assert manifest["version"] == 5 and manifest["captions"] == ["txt"]
    assert manifest["dtype"] == dtype and manifest["dim"] == 384 and manifest["normalized"]
    assert manifest["data_dir"] == str((tmp_path / "data").resolve())
    assert manifest["encoder"]["weights_sha256"] == minilm.identity["weights_sha256"]
    assert {k: v["count"] for k, v in manifest["shards"].items()} == {"00000": 8, "00001": 8, "00002": 7}
    assert (tmp_path / "store" / "00001.keys.txt").read_text().splitlines() == list(captions)[8:16]
    assert json.loads((tmp_path / "store" / "00002.json").read_text())["count"] == 7

    store = open_store(tmp_path / "store")
    rows = store.embeddings("00001")
    assert isinstance(rows, np.memmap) and not rows.flags.writeable
    key = list(captions)[10]
    np.testing.assert_array_equal(rows[store.row_index("00001")[key]], embeddings[10])
    # each row's caption hash is blake2b-8 of its caption text, computed here independently
    hashes = store.caption_hashes("00001")
    assert hashes.dtype == np.dtype("<u8") and hashes.shape == (8,)
    for row, caption in enumerate(list(captions.values())[8:16]):
        digest = hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest()
        assert int(hashes[row]) == int.from_bytes(digest, "little") == caption_hash(caption)
    assert len(store) == 23 and not list((tmp_path / "store").glob("*.tmp"))


def test_resume_skips_finished_shards_and_redoes_a_partial_one(tmp_path, minilm):
    make_data(tmp_path / "data", n=15, per_shard=5)
    store_dir = tmp_path / "store"
    embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    first = snapshot(store_dir)
    (store_dir / "00001.npy").unlink()  # an interrupted shard: keys and counts written, rows not
    manifest = json.loads((store_dir / "manifest.json").read_text())
    del manifest["shards"]["00002"]  # finished, but the run stopped before recording it
    (store_dir / "manifest.json").write_text(json.dumps(manifest))

    summary = embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    second = snapshot(store_dir)

    assert (summary["shards_resumed"], summary["shards_embedded"], summary["captions"]) == (2, 1, 5)
    for name in ("00000.npy", "00000.keys.txt", "00002.npy", "00002.json"):
        assert second[name] == first[name], f"{name} was rewritten"
    assert second["00001.npy"][0] != first["00001.npy"][0]  # redone
    np.testing.assert_array_equal(np.load(store_dir / "00001.npy"), np.load(io.BytesIO(first["00001.npy"][1])))
    assert list(json.loads((store_dir / "manifest.json").read_text())["shards"]) == ["00000", "00001", "00002"]
    assert len(load_store(store_dir)[0]) == 15


def test_changed_data_shard_is_redone_a_copied_one_kept(tmp_path, minilm):
    def write(colour):
        with ShardWriter(tmp_path / "data", samples_per_shard=3) as writer:
            for i in range(6):
                writer.write(f"{i:03d}", {"jpg": JPEG, "txt": f"shape {i} is {colour}"})

    write("red")
    store_dir = tmp_path / "store"
    embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    rows_before = snapshot(store_dir)["00000.npy"]
    os.utime(tmp_path / "data" / "00000.tar", ns=(1, 10**18))  # copied: same bytes, new mtime

    copied = embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)

    assert (copied["shards_resumed"], copied["shards_embedded"], copied["shards_redone"]) == (2, 0, 0)
    assert snapshot(store_dir)["00000.npy"] == rows_before
    assert json.loads((store_dir / "00000.json").read_text())["source_mtime_ns"] == 10**18
    assert load_store(store_dir)[2]["shards"]["00000"]["source_mtime_ns"] == 10**18

    write("tan")  # the same tar sizes, other captions
    changed = embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    _keys, embeddings, _ = load_store(store_dir)

    assert (changed["shards_resumed"], changed["shards_embedded"], changed["shards_redone"]) == (0, 2, 2)
    expected = minilm.encode([f"shape {i} is tan" for i in range(6)]).numpy()
    np.testing.assert_allclose(embeddings.astype(np.float32), expected, atol=2e-3)


def test_other_setting_is_refused_naming_manifest_and_field(tmp_path, minilm):
    make_data(tmp_path / "data", n=6, per_shard=3)
    store_dir = tmp_path / "store"
    embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    before = snapshot(store_dir)

    with pytest.raises(StoreMismatchError) as err:
        embed_shards(tmp_path / "data", store_dir, EmbedConfig(max_length=32), progress=False)
    message = str(err.value)
    assert str(store_dir / "manifest.json") in message
    assert "max_length: asked 32, found 77" in message
    assert "pooling" not in message
    with pytest.raises(StoreMismatchError, match="dtype: asked 'float32', found 'float16'"):
        embed_shards(tmp_path / "data", store_dir, EmbedConfig(dtype="float32"), encoder=minilm, progress=False)
    assert snapshot(store_dir) == before


def test_check_manifest_lists_every_difference(tmp_path, minilm):
    make_data(tmp_path / "data", n=3, per_shard=3)
    embed_shards(tmp_path / "data", tmp_path / "store", EmbedConfig(), encoder=minilm, progress=False)
    manifest = load_store(tmp_path / "store")[2]
    identity = {**minilm.identity, "dtype": "float16"}

    check_manifest(manifest, identity, tmp_path / "store")  # the same: no error
    check_manifest(manifest, {**identity, "model": "/elsewhere/same-weights", "path": "/elsewhere"}, tmp_path / "store")
    asked = {**identity, "weights_sha256": "0" * 64, "pooling": "last", "prompt": "Query: ", "normalize": False}
    with pytest.raises(StoreMismatchError) as err:
        check_manifest(manifest, asked, tmp_path / "store")
    message = str(err.value)
    for line in ("weights_sha256: asked '000", "pooling: asked 'last', found 'mean'",
                 "prompt: asked 'Query: ', found ''", "normalize: asked False, found True"):
        assert line in message
    assert "4 fields differ" in message and "max_length" not in message
    # Without a weights hash (a trainer that never loads the encoder) the model name is compared.
    with pytest.raises(StoreMismatchError, match="model: asked 'Qwen/Qwen3-Embedding-0.6B', found 'all-minilm-l6-v2'"):
        check_manifest(manifest, {"model": "Qwen/Qwen3-Embedding-0.6B", "dim": 384}, tmp_path / "store")


def test_missing_store_manifest_or_shard_file_is_named(tmp_path, minilm):
    with pytest.raises(StoreError, match=f"{tmp_path / 'nowhere'} does not exist"):
        load_store(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="manifest.json"):
        load_store(tmp_path / "empty")

    make_data(tmp_path / "data", n=6, per_shard=3)
    store_dir = tmp_path / "store"
    embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    (store_dir / "00001.npy").unlink()
    with pytest.raises(StoreError, match=f"{store_dir / '00001.npy'} does not exist"):
        load_store(store_dir)
    (store_dir / "00000.keys.txt").write_text("only-one-key\n")
    with pytest.raises(StoreError, match="00000.keys.txt: 1 keys, the manifest says 3"):
        load_store(store_dir)

    (store_dir / "manifest.json").unlink()  # shard files without a manifest: unknown encoder, never added to
    with pytest.raises(StoreError, match="no manifest.json"):
        embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)


def test_other_data_folder_is_refused_naming_both(tmp_path, minilm):
    """Two folders with the same shard names: embedding the second into the first's store is refused."""
    make_data(tmp_path / "a", n=6, per_shard=3, seed=1)
    make_data(tmp_path / "b", n=6, per_shard=3, seed=2)
    store_dir = tmp_path / "store"
    embed_shards(tmp_path / "a", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    before = snapshot(store_dir)
    with pytest.raises(StoreMismatchError) as err:
        embed_shards(tmp_path / "b", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    assert str((tmp_path / "a").resolve()) in str(err.value) and str((tmp_path / "b").resolve()) in str(err.value)
    assert snapshot(store_dir) == before
    # the same folder by another spelling is the same folder
    again = embed_shards(tmp_path / "b" / ".." / "a", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    assert again["shards_resumed"] == 2


def test_older_store_format_asks_to_embed_again(tmp_path, minilm):
    make_data(tmp_path / "data", n=3, per_shard=3)
    store_dir = tmp_path / "store"
    embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    manifest = json.loads((store_dir / "manifest.json").read_text())
    manifest["version"] = 1
    del manifest["data_dir"]
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    (store_dir / "00000.caption_hash.npy").unlink()
    for action in (lambda: load_store(store_dir),
                   lambda: embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)):
        with pytest.raises(StoreError, match="version 1 is older") as err:
            action()
        assert str(store_dir / "manifest.json") in str(err.value) and "embed the data again" in str(err.value)


def test_missing_caption_hashes_are_named_and_redone(tmp_path, minilm):
    make_data(tmp_path / "data", n=6, per_shard=3)
    store_dir = tmp_path / "store"
    embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    hashes = store_dir / "00001.caption_hash.npy"
    kept = hashes.read_bytes()
    hashes.unlink()
    with pytest.raises(StoreError, match=f"{hashes} do not exist"):
        open_store(store_dir).caption_hashes("00001")
    summary = embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    assert (summary["shards_resumed"], summary["shards_embedded"]) == (1, 1)
    assert hashes.read_bytes() == kept


@pytest.mark.parametrize("field, value, named", [
    ("dim", None, "dim"), ("dtype", None, "dtype"), ("encoder", None, "encoder"), ("shards", None, "shards"),
    ("data_dir", None, "data_dir"), ("dim", "384", "dim"), ("shards", {"00000": {}}, "shards.00000.count"),
    ("shards", {"00000": {"count": 3, "files": []}}, "shards.00000.files"),
    ("shards", {"00000": {"count": 3, "files": {"00000.npy": {"bytes": "9"}}}}, "shards.00000.files"),
])
def test_manifest_fields_are_checked_and_named(tmp_path, minilm, field, value, named):
    """None: the field is removed; otherwise it is set to a value of the wrong kind."""
    make_data(tmp_path / "data", n=3, per_shard=3)
    embed_shards(tmp_path / "data", tmp_path / "store", EmbedConfig(), encoder=minilm, progress=False)
    path = tmp_path / "store" / "manifest.json"
    manifest = json.loads(path.read_text())
    if value is None:
        del manifest[field]
    else:
        manifest[field] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError) as err:
        load_store(tmp_path / "store")
    assert str(path) in str(err.value) and repr(named) in str(err.value)


def test_replaced_shard_file_is_refused_then_redone_by_embed(tmp_path, minilm):
    make_data(tmp_path / "data", n=6, per_shard=3)
    store_dir = tmp_path / "store"
    embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    kept = (store_dir / "00001.npy").read_bytes()
    (store_dir / "00001.npy").write_bytes((store_dir / "00000.npy").read_bytes())  # same size, the other shard's rows
    with pytest.raises(StoreError, match="00001.npy was replaced or changed after it was embedded"):
        load_store(store_dir)
    summary = embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    assert (summary["shards_resumed"], summary["shards_embedded"]) == (1, 1)
    assert (store_dir / "00001.npy").read_bytes() == kept and len(load_store(store_dir)[0]) == 6
