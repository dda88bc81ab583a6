"""The loader, PIL and DALI backends alike: images joined to store rows by key, whatever the order or
gaps on either side, and bad samples named or counted. Every test runs once per backend."""

from __future__ import annotations

import io
import itertools
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from shard_tools import read_members, write_members
from torch.utils.data import DataLoader

from lift_fast.config import ConfigError, EmbedConfig
from lift_fast.data import build_loader
from lift_fast.data.dali import dali_available
from lift_fast.data.loader import CLIP_MEAN, CLIP_STD
from lift_fast.data.shards import ShardError, iter_samples, list_shards
from lift_fast.embed import embed_shards, load_store
from lift_fast.embed.store import record_files

BACKEND = {"name": "pil"}


@pytest.fixture(autouse=True, params=["pil", "dali"])
def backend(request):
    """The backend every build_loader call of the test uses."""
    if request.param == "dali" and not dali_available()[0]:
        pytest.skip(f"DALI is not usable here: {dali_available()[1]}")
    BACKEND["name"] = request.param
    return request.param


LOW = min((0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD))
HIGH = max((1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD))


def tar_keys(data_dir) -> list[str]:
    return [sample.key for shard in list_shards(data_dir) for sample in iter_samples(shard)]


def store_rows(store_dir) -> dict[str, np.ndarray]:
    keys, embeddings, _ = load_store(store_dir)
    return {key: np.asarray(row, dtype=np.float32) for key, row in zip(keys, embeddings)}


def eval_pass(data_dir, store_dir, *, batch_size=5, num_workers=0, on_error="error"):
    loader = build_loader(data_dir, store_dir, split="eval", batch_size=batch_size, image_size=32,
                          backend=BACKEND["name"],
                          num_workers=num_workers, on_error=on_error)
    return list(loader)


def assert_paired(batches, rows: dict[str, np.ndarray]):
    for batch in batches:
        assert batch["text_embeddings"].dtype == torch.float32
        assert batch["text_embeddings"].shape == (len(batch["keys"]), 384)
        expected = np.stack([rows[key] for key in batch["keys"]])
        np.testing.assert_array_equal(batch["text_embeddings"].numpy(), expected)


def index_of(member_name: str) -> int:
    """'eval-00000007.jpg' -> 7: the running number in a synthetic key."""
    return int(member_name.split(".")[0].rpartition("-")[2])


def copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("num_workers", [0, 1])
def test_eval_split_in_shard_order_with_own_rows(synth_data, stores, num_workers):
    batches = eval_pass(synth_data / "eval", stores / "eval", num_workers=num_workers)
    keys = [key for batch in batches for key in batch["keys"]]
    assert keys == tar_keys(synth_data / "eval")  # every key once, in shard order
    assert [len(b["keys"]) for b in batches] == [5] * 6 + [2]  # the last partial batch is kept
    assert sum(b["skipped"] for b in batches) == 0
    assert_paired(batches, store_rows(stores / "eval"))


def test_eval_images_match_reference_decode(synth_data, stores):
    batches = eval_pass(synth_data / "eval", stores / "eval", batch_size=32)
    images = torch.cat([b["images"] for b in batches])
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= LOW - 1e-5 and images.max() <= HIGH + 1e-5
    assert images.min() < -1 and images.max() > 1  # normalised, not left in [0, 1]
    # the 32 px images need no resize: the tensor is the decoded JPEG, normalised with CLIP's mean/std
    samples = [s for shard in list_shards(synth_data / "eval") for s in iter_samples(shard)]
    mean, std = np.array(CLIP_MEAN), np.array(CLIP_STD)
    for image, sample in zip(images, samples):
        pixels = np.asarray(Image.open(io.BytesIO(sample.image_bytes())).convert("RGB"), dtype=np.float64) / 255
        np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), (pixels - mean) / std, atol=1e-5)


def test_eval_resizes_to_image_size(synth_data, stores):
    loader = build_loader(synth_data / "eval", stores / "eval", split="eval", batch_size=4, image_size=16,
                          num_workers=0, backend=BACKEND["name"])
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 3, 16, 16)


def test_store_rows_in_another_order(synth_data, stores, tmp_path):
    """Rows, keys and caption hashes of a store shard permuted together: the loader still pairs by key."""
    store = copy_tree(stores / "eval", tmp_path / "store")
    for name in ("00000", "00001"):
        keys = (store / f"{name}.keys.txt").read_text().splitlines()
        rows = np.load(store / f"{name}.npy")
        hashes = np.load(store / f"{name}.caption_hash.npy")
        order = np.random.default_rng(int(name) + 5).permutation(len(keys))
        assert (order != np.arange(len(keys))).any()
        (store / f"{name}.keys.txt").write_text("".join(keys[i] + "\n" for i in order))
        np.save(store / f"{name}.npy", rows[order])
        np.save(store / f"{name}.caption_hash.npy", hashes[order])
        record_files(store, name)  # rewritten on purpose: readers refuse shard files the manifest does not know
    permuted_keys, _, _ = load_store(store)
    assert permuted_keys != tar_keys(synth_data / "eval")
    batches = eval_pass(synth_data / "eval", store)
    assert [k for b in batches for k in b["keys"]] == tar_keys(synth_data / "eval")
    assert_paired(batches, store_rows(store))
    assert_paired(batches, store_rows(stores / "eval"))  # the same rows as before the shuffle


def test_tar_with_key_gaps(synth_data, stores, text_encoder, tmp_path):
    """Keys with gaps (as img2dataset leaves after failed downloads), embedded and loaded."""
    data = tmp_path / "data"
    for shard in list_shards(synth_data / "eval"):
        members = read_members(shard)
        kept = [(name, blob) for name, blob in members if index_of(name) % 3 != 1]
        write_members(data / shard.name, kept)
    keys = tar_keys(data)
    assert len(keys) == 21 and "eval-00000001" not in keys and "eval-00000004" not in keys
    embed_shards(data, tmp_path / "store", EmbedConfig(), progress=False, encoder=text_encoder)
    batches = eval_pass(data, tmp_path / "store", batch_size=4)
    assert [k for b in batches for k in b["keys"]] == keys
    rows = store_rows(tmp_path / "store")
    assert_paired(batches, rows)
    # each row is its own caption's embedding: the store of the full set has (nearly) the same row
    full = store_rows(stores / "eval")
    for batch in batches:
        expected = np.stack([full[key] for key in batch["keys"]])
        np.testing.assert_allclose(batch["text_embeddings"].numpy(), expected, atol=2e-3)


def test_store_with_more_keys_than_tar(synth_data, stores, tmp_path):
    """A tar that lost samples after embedding: the remaining ones keep their own rows."""
    data = tmp_path / "data"
    for shard in list_shards(synth_data / "eval"):
        members = read_members(shard)
        write_members(data / shard.name, [(n, b) for n, b in members if index_of(n) % 4 != 0])
    batches = eval_pass(data, stores / "eval")
    assert [k for b in batches for k in b["keys"]] == tar_keys(data)
    assert_paired(batches, store_rows(stores / "eval"))


def rename_store_key(store, shard: str, old: str, new: str) -> None:
    path = store / f"{shard}.keys.txt"
    keys = path.read_text().splitlines()
    keys[keys.index(old)] = new
    path.write_text("".join(k + "\n" for k in keys))
    record_files(store, shard)


@pytest.mark.parametrize("missing", ["eval-00000003", "eval-00000031"])  # mid-shard, and the very last sample
def test_key_without_row(synth_data, stores, tmp_path, missing):
    store = copy_tree(stores / "eval", tmp_path / "store")
    shard = "00000" if missing == "eval-00000003" else "00001"
    rename_store_key(store, shard, missing, "not_in_the_tar")
    with pytest.raises(ShardError, match="no row in the embedding store") as err:
        eval_pass(synth_data / "eval", store)
    assert f"{shard}.tar" in str(err.value) and repr(missing) in str(err.value)

    batches = eval_pass(synth_data / "eval", store, on_error="skip")
    keys = [k for b in batches for k in b["keys"]]
    assert keys == [k for k in tar_keys(synth_data / "eval") if k != missing]
    assert sum(b["skipped"] for b in batches) == 1
    assert_paired(batches, store_rows(stores / "eval"))


def test_eval_data_with_the_train_store_is_refused(synth_data, stores):
    """`eval --data data/eval --embeddings emb/train`: both have 00000.tar, but no key is shared."""
    with pytest.raises(ShardError, match="no row in the embedding store") as err:
        eval_pass(synth_data / "eval", stores / "train")
    assert "00000.tar" in str(err.value) and "'eval-00000000'" in str(err.value)


def renamed_shard(src, dst, rename: dict[str, str] | None = None, captions: dict[str, bytes] | None = None):
    """A copy of shard `src` with keys renamed and some captions (by new key) replaced."""
    rename, captions = rename or {}, captions or {}
    members = []
    for name, blob in read_members(src):
        key, _, ext = name.partition(".")
        key = rename.get(key, key)
        members.append((f"{key}.{ext}", captions.get(key, blob) if ext == "txt" else blob))
    write_members(dst, members)


def test_same_keys_other_captions_is_refused(synth_data, stores, tmp_path):
    """Another data folder whose shard names and keys match the store's: the caption hashes tell."""
    train_shard, eval_shard = list_shards(synth_data / "train")[0], list_shards(synth_data / "eval")[0]
    train_keys = [s.key for s in iter_samples(train_shard)]
    eval_samples = list(iter_samples(eval_shard))
    data = tmp_path / "data"
    renamed_shard(eval_shard, data / "00000.tar", rename=dict(zip([s.key for s in eval_samples], train_keys)))
    train_captions = {s.key: s.caption() for s in iter_samples(train_shard)}
    first_other = next(key for key, sample in zip(train_keys, eval_samples) if sample.caption() != train_captions[key])
    with pytest.raises(ShardError, match="the embedding store was made from other captions") as err:
        eval_pass(data, stores / "train")
    assert str(data / "00000.tar") in str(err.value) and repr(first_other) in str(err.value)
    assert str(stores / "train") in str(err.value)


def test_changed_captions_are_counted_skips(synth_data, stores, tmp_path):
    shard = list_shards(synth_data / "train")[0]
    keys = [s.key for s in iter_samples(shard)]
    changed = {keys[2]: b"a purple star above a green circle, said differently", keys[-1]: b"another caption"}
    renamed_shard(shard, tmp_path / "data" / "00000.tar", captions=changed)
    with pytest.raises(ShardError, match="other captions") as err:
        eval_pass(tmp_path / "data", stores / "train")
    assert repr(keys[2]) in str(err.value)
    batches = eval_pass(tmp_path / "data", stores / "train", on_error="skip")
    assert [k for b in batches for k in b["keys"]] == [k for k in keys if k not in changed]
    assert sum(b["skipped"] for b in batches) == 2
    assert_paired(batches, store_rows(stores / "train"))


def corrupt_images(src_dir, dst_dir, bad: dict[str, bytes]):
    for shard in list_shards(src_dir):
        members = [(n, bad.get(n, b)) for n, b in read_members(shard)]
        write_members(dst_dir / shard.name, members)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_jpeg(synth_data, stores, tmp_path, kind):
    original = dict(read_members(list_shards(synth_data / "eval")[0]))["eval-00000005.jpg"]
    broken = b"this is not a jpeg" if kind == "garbage" else original[: len(original) // 2]
    data = tmp_path / "data"
    # one bad image mid-set and one at the very end, so a skip right before the end is counted too
    last = dict(read_members(list_shards(synth_data / "eval")[-1]))["eval-00000031.jpg"]
    corrupt_images(synth_data / "eval", data, {"eval-00000005.jpg": broken, "eval-00000031.jpg": last[:40]})
    with pytest.raises(ShardError, match="cannot be decoded") as err:
        eval_pass(data, stores / "eval")
    assert "'eval-00000005'" in str(err.value) and "00000.tar" in str(err.value)

    batches = eval_pass(data, stores / "eval", on_error="skip")
    keys = [k for b in batches for k in b["keys"]]
    assert keys == [k for k in tar_keys(data) if k not in ("eval-00000005", "eval-00000031")]
    assert sum(b["skipped"] for b in batches) == 2
    assert_paired(batches, store_rows(stores / "eval"))


def test_sample_without_image(synth_data, stores, tmp_path):
    """A sample whose image member is missing (its caption and store row are there)."""
    data = tmp_path / "data"
    for shard in list_shards(synth_data / "eval"):
        write_members(data / shard.name, [(n, b) for n, b in read_members(shard) if n != "eval-00000009.jpg"])
    with pytest.raises(ShardError, match="has no image") as err:
        eval_pass(data, stores / "eval")
    assert "'eval-00000009'" in str(err.value) and "00000.tar" in str(err.value)
    batches = eval_pass(data, stores / "eval", on_error="skip")
    assert [k for b in batches for k in b["keys"]] == [k for k in tar_keys(synth_data / "eval") if k != "eval-00000009"]
    assert sum(b["skipped"] for b in batches) == 1
    assert_paired(batches, store_rows(stores / "eval"))


def test_every_sample_bad_is_an_error_not_an_empty_pass(synth_data, stores, tmp_path):
    data = tmp_path / "data"
    shard = list_shards(synth_data / "eval")[0]
    write_members(data / shard.name, [(n, b"bad" if n.endswith(".jpg") else b) for n, b in read_members(shard)])
    with pytest.raises(ShardError, match="no usable samples"):
        eval_pass(data, stores / "eval", on_error="skip")


def train_keys(data_dir, store_dir, *, seed, batches=10, batch_size=16):
    loader = build_loader(data_dir, store_dir, split="train", batch_size=batch_size, image_size=32, seed=seed,
                          backend=BACKEND["name"],
                          num_workers=0)
    return list(itertools.islice(iter(loader), batches))


def test_train_split_endless_shuffled_deterministic(synth_data, stores):
    first = train_keys(synth_data / "train", stores / "train", seed=0)
    again = train_keys(synth_data / "train", stores / "train", seed=0)
    other = train_keys(synth_data / "train", stores / "train", seed=1)
    keys = [k for b in first for k in b["keys"]]
    assert len(keys) == 160  # more than the 64 samples: the train split goes round again
    assert set(keys) == set(tar_keys(synth_data / "train"))
    assert keys[:64] != tar_keys(synth_data / "train")  # shuffled
    assert sorted(keys[:16]) != keys[:16]
    assert keys == [k for b in again for k in b["keys"]]  # same seed, same order and crops
    for a, b in zip(first, again):
        assert torch.equal(a["images"], b["images"])
    assert keys != [k for b in other for k in b["keys"]]
    for batch in first:
        assert batch["images"].shape == (16, 3, 32, 32)
        assert batch["images"].min() >= LOW - 1e-5 and batch["images"].max() <= HIGH + 1e-5
        assert batch["skipped"] == 0
    assert_paired(first, store_rows(stores / "train"))


def test_train_split_drops_partial_batches(synth_data, stores):
    for batch in train_keys(synth_data / "train", stores / "train", seed=0, batches=6, batch_size=24):
        assert len(batch["keys"]) == 24


def test_backend_choice(synth_data, stores, monkeypatch, backend):
    from lift_fast.data import dali

    loader = build_loader(synth_data / "eval", stores / "eval", split="eval", batch_size=4, image_size=32,
                          backend="auto")
    assert isinstance(loader.data, DataLoader) == (not dali_available()[0])  # auto prefers DALI where it runs
    monkeypatch.setattr(dali, "dali_available", lambda device_id=None: (False, "import nvidia.dali failed: test"))
    with pytest.raises(ConfigError, match="data.backend=dali: DALI cannot run here .*import nvidia.dali failed"):
        build_loader(synth_data / "eval", stores / "eval", split="eval", batch_size=4, image_size=32, backend="dali")
    loader = build_loader(synth_data / "eval", stores / "eval", split="eval", batch_size=4, image_size=32)
    assert isinstance(loader.data, DataLoader)  # auto falls back to PIL
    with pytest.raises(ConfigError, match="opencv"):
        build_loader(synth_data / "eval", stores / "eval", split="eval", batch_size=4, image_size=32,
                     backend="opencv")


def test_store_missing_a_shard(synth_data, stores, tmp_path):
    data = copy_tree(synth_data / "eval", tmp_path / "data")
    shutil.copy(data / "00001.tar", data / "00002.tar")
    with pytest.raises(ShardError, match="00002") as err:
        build_loader(data, stores / "eval", split="eval", batch_size=4, image_size=32)
    assert str(stores / "eval") in str(err.value)


def test_bad_split(synth_data, stores):
    with pytest.raises(ValueError, match="split"):
        build_loader(synth_data / "eval", stores / "eval", split="test", batch_size=4, image_size=32)
