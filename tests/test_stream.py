"""The sample stream and shard indexes: batches as a pure function of (seed, step), exact resume,
ranks that split the single-process batch, and index files that are DALI's own format."""

from __future__ import annotations

import io
import itertools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from shard_tools import read_members, write_members

from lift_fast.data import build_loader
from lift_fast.data.augment import (
    CLIP_STD,
    DRAWS,
    image_size,
    random_resized_crop_box,
    sample_uniforms,
)
from lift_fast.data.dali import dali_available
from lift_fast.data.index import index_path, index_shards, read_index, write_index
from lift_fast.data.shards import ShardError, iter_samples, list_shards
from lift_fast.data.stream import SampleStream


@pytest.mark.parametrize("counts, batch_size, window", [([16, 16, 16, 16], 8, 2), ([5, 1, 13, 7], 6, 3),
                                                         ([30], 7, 32), ([3, 9, 4, 11, 2], 5, 1)])
def test_each_epoch_is_a_permutation(counts, batch_size, window):
    stream = SampleStream(counts, batch_size=batch_size, seed=5, window=window)
    total = sum(counts)
    assert stream.steps_per_epoch == total // batch_size
    for epoch in range(3):
        refs = [stream.sample(epoch, p) for p in range(total)]
        assert sorted((r.shard, r.row) for r in refs) == sorted((s, r) for s, c in enumerate(counts) for r in range(c))
    one = [(r.shard, r.row) for r in (stream.sample(0, p) for p in range(total))]
    two = [(r.shard, r.row) for r in (stream.sample(1, p) for p in range(total))]
    assert one != two  # every epoch has its own order


def test_windows_mix_only_their_shards():
    stream = SampleStream([10] * 8, batch_size=10, seed=1, window=2)
    for step in range(8):
        shards = {ref.shard for ref in stream.batch(step)}
        assert len(shards) <= 2  # each window of 20 samples spans two shards and two steps


def test_batches_are_a_function_of_the_step():
    a = SampleStream([7, 9, 4], batch_size=4, seed=3, window=2)
    b = SampleStream([7, 9, 4], batch_size=4, seed=3, window=2)
    forward = [a.batch(step) for step in range(12)]
    backward = [b.batch(step) for step in reversed(range(12))][::-1]
    assert forward == backward
    assert SampleStream([7, 9, 4], batch_size=4, seed=4, window=2).batch(0) != forward[0]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_the_global_batch(world_size):
    stream = SampleStream([13, 8, 11], batch_size=8, seed=2, window=2)
    for step in range(10):
        parts = [stream.batch(step, rank, world_size) for rank in range(world_size)]
        assert [ref for part in parts for ref in part] == stream.batch(step)


def test_in_order_covers_everything_once():
    stream = SampleStream([3, 5, 2], batch_size=4, shuffle=False)
    batches = stream.in_order()
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [(r.shard, r.row) for b in batches for r in b] == [(0, 0), (0, 1), (0, 2)] + [(1, i) for i in range(5)] + \
        [(2, 0), (2, 1)]
    assert stream.in_order(1, 2) == [batches[1]]


@pytest.mark.parametrize("counts, world_size", [([3, 5, 2], 1), ([1, 7, 4, 1, 6], 2), ([11], 3)])
def test_in_order_positions_are_the_unshuffled_streams(counts, world_size):
    """Each sample's position is its place in the pass (0, 1, 2, ...), where stream.sample finds it
    again; positions once read a list as it grew (0, 2, 4, ... and past the end of the epoch)."""
    stream = SampleStream(counts, batch_size=3, shuffle=False)
    refs = [ref for rank in range(world_size) for batch in stream.in_order(rank, world_size) for ref in batch]
    assert sorted(ref.position for ref in refs) == list(range(sum(counts)))
    for ref in refs:
        assert stream.sample(0, ref.position) == ref


def test_replacements_come_from_other_steps():
    stream = SampleStream([40], batch_size=8, seed=0)
    ref = stream.batch(2)[3]
    batch_positions = {r.position for r in stream.batch(2)}
    stand_ins = [stream.replacement(ref, attempt) for attempt in range(1, 4)]
    assert all(s.position not in batch_positions and s.epoch == ref.epoch for s in stand_ins)
    assert stand_ins == [stream.replacement(ref, attempt) for attempt in range(1, 4)]


# ------------------------------------------------------------------------------------------ index files


def test_index_is_the_wds2idx_format(synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data / "train", data)
    summary = index_shards(data, progress=False)
    assert summary == {"shards": 4, "written": 4, "up_to_date": 0, "samples": 64}
    wds2idx = shutil.which("wds2idx", path=os.path.dirname(sys.executable))
    if wds2idx is None:
        pytest.skip("wds2idx (shipped with DALI) is not installed")
    theirs = tmp_path / "theirs.idx"
    subprocess.run([wds2idx, str(data / "00000.tar"), str(theirs)], check=True, capture_output=True)
    assert index_path(data / "00000.tar").read_bytes() == theirs.read_bytes()
    assert index_shards(data, progress=False)["up_to_date"] == 4


def test_index_offsets_point_at_the_members(synth_data):
    shard = list_shards(synth_data / "eval")[1]
    index = read_index(shard)  # no index file: scanned
    samples = list(iter_samples(shard))
    assert index.keys == [s.key for s in samples]
    data = shard.read_bytes()
    for row, sample in enumerate(samples):
        start, size = index.image_offset[row], index.image_size[row]
        assert data[start:start + size] == sample.image_bytes()
        start, size = index.caption_offset[row], index.caption_size[row]
        assert data[start:start + size] == sample.files["txt"]


def test_stale_and_malformed_indexes_are_errors(synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data / "eval", data)
    shard = data / "00000.tar"
    write_index(shard)
    members = read_members(shard)
    write_members(shard, members[3:])  # the shard changes after it was indexed
    os.utime(shard, ns=(index_path(shard).stat().st_mtime_ns + 10**9,) * 2)
    with pytest.raises(ShardError, match="stale.*lift-fast index"):
        read_index(shard)
    assert index_shards(data, progress=False)["written"] == 2  # rewritten (and the other shard indexed)
    assert read_index(shard).keys == [s.key for s in iter_samples(shard)]

    def put(text: str) -> None:  # dated like the shard, so that only the content is wrong
        index_path(shard).write_text(text)
        os.utime(index_path(shard), ns=(shard.stat().st_mtime_ns,) * 2)

    put("v1.1 3\n")
    with pytest.raises(ShardError, match="not a v1.2"):
        read_index(shard)
    put("v1.2 2\njpg 512 10 a.jpg\n")
    with pytest.raises(ShardError, match="announces 2 samples but lists 1"):
        read_index(shard)
    put(f"v1.2 1\njpg {shard.stat().st_size} 10 a.jpg\n")
    with pytest.raises(ShardError, match="past the end"):
        read_index(shard)


def test_truncated_shard_cannot_be_indexed(synth_data, tmp_path):
    data = (synth_data / "eval" / "00000.tar").read_bytes()
    shard = tmp_path / "00000.tar"
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="truncated"):
        write_index(shard)


def test_index_command(synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data / "eval", data)
    result = subprocess.run([sys.executable, "-m", "lift_fast", "index", str(data), "-q"],
                            capture_output=True, text=True, check=True)
    assert '"written": 2' in result.stdout
    assert sorted(p.name for p in data.glob("*.idx")) == ["00000.idx", "00001.idx"]


# ------------------------------------------------------------------------------------------ the loader


def batches(synth_data, stores, *, steps=6, start_step=0, batch_size=8, num_workers=0, rank=0, world_size=1,
            backend="pil", image_size=32, **kw):
    loader = build_loader(synth_data / "train", stores / "train", split="train", batch_size=batch_size,
                          image_size=image_size, backend=backend,
                          seed=11, num_workers=num_workers, start_step=start_step, rank=rank, world_size=world_size,
                          shuffle_window=2, **kw)
    return list(itertools.islice(iter(loader), steps))


def test_loader_resumes_the_exact_stream(synth_data, stores):
    full = batches(synth_data, stores, steps=12)
    resumed = batches(synth_data, stores, steps=7, start_step=5)
    assert [b["step"] for b in full] == list(range(12))
    for a, b in zip(full[5:], resumed):
        assert a["keys"] == b["keys"] and a["step"] == b["step"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["text_embeddings"], b["text_embeddings"])
    epoch = [k for b in full[:8] for k in b["keys"]]  # 8 steps of 8: one epoch of the 64 samples, each once
    assert len(epoch) == len(set(epoch)) == 64


def test_workers_give_the_same_batches(synth_data, stores):
    plain = batches(synth_data, stores, steps=5, start_step=3)
    workers = batches(synth_data, stores, steps=5, start_step=3, num_workers=2)
    for a, b in zip(plain, workers):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])


def test_ranks_take_slices_of_the_single_process_batch(synth_data, stores):
    single = batches(synth_data, stores, steps=4, batch_size=8, hflip=True)
    parts = [batches(synth_data, stores, steps=4, batch_size=4, rank=r, world_size=2, hflip=True) for r in range(2)]
    for step, whole in enumerate(single):
        assert parts[0][step]["keys"] + parts[1][step]["keys"] == whole["keys"]
        assert torch.equal(torch.cat([parts[0][step]["images"], parts[1][step]["images"]]), whole["images"])


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_skipped_training_samples_are_replaced(synth_data, stores, tmp_path, backend):
    data = tmp_path / "data" / "train"
    bad = {"train-00000003.jpg", "train-00000040.jpg"}
    for shard in list_shards(synth_data / "train"):
        write_members(data / shard.name, [(n, b"not a jpeg" if n in bad else b) for n, b in read_members(shard)])
    if backend == "dali" and not dali_available()[0]:
        pytest.skip("DALI is not usable here")
    loader_args = dict(split="train", batch_size=16, image_size=32, num_workers=0, backend=backend)
    with pytest.raises(ShardError, match="cannot be decoded|unknown image format") as err:
        list(itertools.islice(iter(build_loader(data, stores / "train", **loader_args)), 4))
    assert "00000.tar" in str(err.value) or "00002.tar" in str(err.value)
    got = list(itertools.islice(iter(build_loader(data, stores / "train", on_error="skip", **loader_args)), 4))
    assert all(len(b["keys"]) == 16 for b in got)
    assert sum(b["skipped"] for b in got) == 2
    keys = [k for b in got for k in b["keys"]]
    assert not {"train-00000003", "train-00000040"} & set(keys)
    rows = dict(zip(*_store_rows(stores / "train")))
    for b in got:
        np.testing.assert_array_equal(b["text_embeddings"].numpy(), np.stack([rows[k] for k in b["keys"]]))


def _store_rows(store_dir):
    from lift_fast.embed import load_store

    keys, embeddings, _ = load_store(store_dir)
    return keys, np.asarray(embeddings, dtype=np.float32)


def test_dali_and_pil_backends_give_the_same_batches(synth_data, stores):
    """Same keys, rows, crops and flips; pixels within resize tolerance (the DALI CPU path resizes only
    the crop, PIL filters across its edge: the outermost pixels of upscaled sharp edges differ most)."""
    if not dali_available()[0]:
        pytest.skip("DALI is not usable here")
    runs = {backend: batches(synth_data, stores, steps=4, batch_size=16, backend=backend, hflip=True,
                             crop_scale=(0.3, 1.0), image_size=24) for backend in ("pil", "dali")}
    level = 1 / 255 / min(CLIP_STD)  # one uint8 step, normalised
    for pil, dali in zip(runs["pil"], runs["dali"]):
        assert pil["keys"] == dali["keys"] and pil["step"] == dali["step"]
        assert torch.equal(pil["text_embeddings"], dali["text_embeddings"])
        difference = (pil["images"] - dali["images"]).abs()
        assert difference.mean() < 0.15 * level  # another crop would differ by many levels on average
        assert difference.flatten().quantile(0.99) < 3 * level
        assert difference.max() < 25 * level


# ------------------------------------------------------------------------------------------ augmentation draws


def test_draws_belong_to_the_sample_not_the_batch():
    positions = np.array([5, 17, 3, 1000003])
    together = sample_uniforms(7, 2, positions)
    alone = np.stack([sample_uniforms(7, 2, np.array([p]))[0] for p in positions])
    assert np.array_equal(together, alone)
    assert together.shape == (4, DRAWS) and together.min() >= 0 and together.max() < 1
    assert not np.array_equal(sample_uniforms(7, 3, positions), together)  # another epoch
    assert not np.array_equal(sample_uniforms(8, 2, positions), together)  # another seed


def test_draws_are_uniform_and_uncorrelated():
    draws = sample_uniforms(0, 0, np.arange(20000))
    assert abs(draws.mean() - 0.5) < 0.005 and abs(draws.var() - 1 / 12) < 0.002
    assert np.histogram(draws, bins=10, range=(0, 1))[0].min() > 0.97 * draws.size / 10
    correlation = np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]
    neighbours = np.corrcoef(draws[:-1, 0], draws[1:, 0])[0, 1]
    assert abs(correlation) < 0.03 and abs(neighbours) < 0.03


def test_crop_boxes_follow_randomresizedcrop():
    draws = sample_uniforms(1, 0, np.arange(3000))
    boxes = np.array([random_resized_crop_box(500, 375, (0.3, 1.0), row) for row in draws])
    area = boxes[:, 2] * boxes[:, 3] / (500 * 375)
    aspect = boxes[:, 2] / boxes[:, 3]
    assert area.min() > 0.29 and area.max() <= 1.0
    assert aspect.min() > 0.74 and aspect.max() < 1.34
    assert (boxes[:, 0] + boxes[:, 2] <= 500).all() and (boxes[:, 1] + boxes[:, 3] <= 375).all()
    assert boxes[:, 0].max() > 100 and boxes[:, 1].max() > 50  # the window moves


@pytest.mark.parametrize("mode, kind", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "progressive"),
                                        ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "WEBP")])
def test_header_size_matches_pil(mode, kind):
    image = Image.new(mode, (37, 23))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if kind == "progressive" else kind, progressive=kind == "progressive")
    data = buffer.getvalue()
    expected = None if kind == "WEBP" else (37, 23)  # not parsed here: PIL opens it instead
    assert image_size(data) == expected
    assert image_size(data[:40] if kind != "PNG" else data[:10]) is None
    assert image_size(b"not an image at all") is None
