"""Shard reading and writing: round trip, folder checks, and damaged shards named in the error."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
from shard_tools import read_members, write_members

from lift_fast.data.shards import ShardError, ShardWriter, iter_samples, list_shards, split_member_name


def random_samples(rng: np.random.Generator, keys: list[str]) -> dict[str, dict]:
    return {key: {"jpg": rng.bytes(int(rng.integers(1, 3000))),
                  "txt": f"caption of {key} \u00e9\u4e2d",
                  "json": {"key": key, "value": float(rng.random())}} for key in keys}


def test_writer_reader_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    # keys with gaps and not in sorted order: the reader must keep tar order, not sort or renumber
    keys = ["000003", "000010", "000011", "000400", "000002", "zz_last", "a-b_c"]
    samples = random_samples(rng, keys)
    with ShardWriter(tmp_path / "data", samples_per_shard=3) as writer:
        for key in keys:
            writer.write(key, samples[key])
    shards = list_shards(tmp_path / "data")
    assert [s.name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    read = [sample for shard in shards for sample in iter_samples(shard)]
    assert [s.key for s in read] == keys
    assert [s.shard.name for s in read] == ["00000.tar"] * 3 + ["00001.tar"] * 3 + ["00002.tar"]
    for sample in read:
        original = samples[sample.key]
        assert set(sample.files) == {"jpg", "txt", "json"}
        assert sample.files["jpg"] == original["jpg"]
        assert sample.image_bytes() == original["jpg"]
        assert sample.files["txt"] == original["txt"].encode("utf-8")
        assert sample.caption() == original["txt"].strip()
        assert json.loads(sample.files["json"]) == original["json"]


def test_same_samples_give_identical_shards(tmp_path):
    samples = random_samples(np.random.default_rng(0), ["a", "b", "c"])
    for name in ("one", "two"):
        with ShardWriter(tmp_path / name, samples_per_shard=10) as writer:
            for key, files in samples.items():
                writer.write(key, files)
    assert (tmp_path / "one" / "00000.tar").read_bytes() == (tmp_path / "two" / "00000.tar").read_bytes()


def test_caption_is_stripped(tmp_path):
    write_members(tmp_path / "00000.tar", [("k.jpg", b"x"), ("k.txt", b"  a red circle \n")])
    (sample,) = iter_samples(tmp_path / "00000.tar")
    assert sample.caption() == "a red circle"


def test_split_member_name():
    assert split_member_name("000001.jpg") == ("000001", "jpg")
    assert split_member_name("dir/000001.JPG") == ("dir/000001", "jpg")
    assert split_member_name("a/b/key.seg.json") == ("a/b/key", "seg.json")


def test_list_shards_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ShardError, match="does not exist") as err:
        list_shards(missing)
    assert str(missing) in str(err.value)


def test_list_shards_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no shards here")
    with pytest.raises(ShardError, match="holds no .tar shards") as err:
        list_shards(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "subfolders" not in str(err.value)


def test_list_shards_hints_at_subfolders(tmp_path):
    write_members(tmp_path / "train" / "00000.tar", [("k.jpg", b"x"), ("k.txt", b"c")])
    write_members(tmp_path / "eval" / "00000.tar", [("k.jpg", b"x"), ("k.txt", b"c")])
    (tmp_path / "other").mkdir()
    with pytest.raises(ShardError, match="subfolders") as err:
        list_shards(tmp_path)
    message = str(err.value)
    assert "train" in message and "eval" in message and "other" not in message


def test_list_shards_sorted(tmp_path):
    for name in ("00002", "00000", "00010", "00001"):
        write_members(tmp_path / f"{name}.tar", [("k.jpg", b"x")])
    (tmp_path / "00000.idx").write_text("dali index")
    assert [p.name for p in list_shards(tmp_path)] == ["00000.tar", "00001.tar", "00002.tar", "00010.tar"]


def test_missing_shard(tmp_path):
    with pytest.raises(ShardError, match="does not exist") as err:
        list(iter_samples(tmp_path / "00000.tar"))
    assert "00000.tar" in str(err.value)


def test_empty_shard(tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"")
    with pytest.raises(ShardError, match="empty") as err:
        list(iter_samples(shard))
    assert str(shard) in str(err.value)


def test_tar_without_samples(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("just_a_dir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    with pytest.raises(ShardError, match="no samples") as err:
        list(iter_samples(shard))
    assert str(shard) in str(err.value)


def test_not_a_tar(tmp_path):
    shard = tmp_path / "00000.tar"
    shard.write_bytes(os.urandom(4096))
    with pytest.raises(ShardError) as err:
        list(iter_samples(shard))
    assert str(shard) in str(err.value)


def write_random_shard(folder, count=8, seed=1):
    keys = [f"{i:06d}" for i in range(count)]
    with ShardWriter(folder, samples_per_shard=100) as writer:
        for key, files in random_samples(np.random.default_rng(seed), keys).items():
            writer.write(key, files)
    return folder / "00000.tar"


def test_truncated_in_half(tmp_path):
    data = write_random_shard(tmp_path / "full").read_bytes()
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="truncated or corrupt") as err:
        list(iter_samples(cut))
    assert str(cut) in str(err.value)


def test_every_truncation_is_caught(tmp_path):
    """A cut anywhere, at a member boundary too (where tarfile itself stops quietly), is an error."""
    full = write_random_shard(tmp_path / "full")
    data = full.read_bytes()
    assert len(list(iter_samples(full))) == 8
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    # everything short of the first end-of-archive block: every 512-byte boundary and points between
    last_member_end = max(m.offset_data + m.size for m in tarfile.open(full).getmembers())
    for size in sorted(set(range(1, last_member_end + 512, 512)) | set(range(512, last_member_end + 512, 512))):
        cut.write_bytes(data[:size])
        with pytest.raises(ShardError, match="truncated or corrupt"):
            list(iter_samples(cut))


def test_non_utf8_caption_names_file_and_key(tmp_path):
    shard = tmp_path / "00000.tar"
    write_members(shard, [("good.jpg", b"x"), ("good.txt", b"fine"),
                          ("bad_key.jpg", b"x"), ("bad_key.txt", "caf\xe9".encode("latin-1"))])
    good, bad = iter_samples(shard)
    assert good.caption() == "fine"
    with pytest.raises(ShardError, match="not UTF-8") as err:
        bad.caption()
    assert str(shard) in str(err.value)
    assert "bad_key.txt" in str(err.value)


def test_missing_caption(tmp_path):
    shard = tmp_path / "00000.tar"
    write_members(shard, [("k1.jpg", b"x"), ("k1.json", b"{}")])
    (sample,) = iter_samples(shard)
    with pytest.raises(ShardError, match="no caption") as err:
        sample.caption()
    assert str(shard) in str(err.value) and "k1.txt" in str(err.value)


def test_sample_without_image(tmp_path):
    shard = tmp_path / "00000.tar"
    write_members(shard, [("k1.txt", b"a caption"), ("k1.json", b"{}")])
    (sample,) = iter_samples(shard)
    with pytest.raises(ShardError, match="no image") as err:
        sample.image_bytes()
    assert str(shard) in str(err.value) and "'k1'" in str(err.value)


def test_png_and_webp_count_as_images(tmp_path):
    shard = tmp_path / "00000.tar"
    write_members(shard, [("a.png", b"png"), ("a.txt", b"c"), ("b.webp", b"webp"), ("b.txt", b"c")])
    a, b = iter_samples(shard)
    assert (a.image_bytes(), b.image_bytes()) == (b"png", b"webp")


def test_read_members_matches_iter_samples(tmp_path):
    """The hand-written tar helper used by other tests groups members the way iter_samples does."""
    members = [("x1.jpg", b"1"), ("x1.txt", b"one"), ("x2.jpg", b"2"), ("x2.txt", b"two")]
    write_members(tmp_path / "00000.tar", members)
    assert read_members(tmp_path / "00000.tar") == members
    assert [(s.key, s.files) for s in iter_samples(tmp_path / "00000.tar")] == [
        ("x1", {"jpg": b"1", "txt": b"one"}), ("x2", {"jpg": b"2", "txt": b"two"})]
