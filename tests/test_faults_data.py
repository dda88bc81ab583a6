"""Fault injection for the data (issue 14, docs/reliability.md): a shard truncated in the middle of an
epoch, while training reads it. With data.on_error=skip its lost samples are counted skips and
training goes on; without, the run stops with an error naming the shard and the key. And the reader
that opens a shard only after it was cut or replaced (a new worker, an evicted shard)."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading

import pytest
from shard_tools import read_members, write_members

from lift_fast.config import load_config
from lift_fast.data import build_loader
from lift_fast.data.dali import dali_available
from lift_fast.data.index import index_path, read_index, write_index
from lift_fast.data.reader import SampleReader
from lift_fast.data.shards import ShardError
from lift_fast.data.stream import SampleRef
from lift_fast.embed import open_store
from lift_fast.train.loop import train

STEPS, CUT_STEP = 8, 2  # the shard is cut when step CUT_STEP (0-based) starts reading
SETTINGS = ["data.image_size=32", "model.depth=1", f"train.steps={STEPS}", "train.batch_size=16", "train.lr=3e-3",
            "train.warmup_steps=2", "train.log_every=1", "data.num_workers=0", "data.shuffle_window=4",
            "train.checkpoint_every=0", "train.tensorboard=false"]
BACKENDS = ["pil", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="DALI not installed"))]


class TruncateMidEpoch:
    """Wraps SampleReader.read: the first read of a sample of step `step` or later (stand-ins included)
    first cuts `shard` at half its size, as a copy or a disk that fails under a running job would; the
    reader has opened that shard by then (steps before it read from it). Records the failed reads."""

    def __init__(self, shard, step: int, batch_size: int):
        self.shard, self.first_position = shard, step * batch_size
        self.cut_at, self.failures = None, []
        self.lock = threading.Lock()
        self.real_read = SampleReader.read

    def __call__(self, reader: SampleReader, ref):
        with self.lock:
            later = ref.epoch > 0 or ref.position >= self.first_position
            if self.cut_at is None and later:
                assert self.shard in [reader.shards[number] for number in reader._open], "not opened before the cut"
                self.cut_at = self.shard.stat().st_size // 2
                os.truncate(self.shard, self.cut_at)
        try:
            return self.real_read(reader, ref)
        except ShardError as err:
            self.failures.append(str(err))
            raise


def expected_skips(data, stores, lost: set[str], cut_step: int) -> int:
    """The skips the loader's stream gives: each sample of steps cut_step..STEPS-1 whose key is lost
    is one, and so is each lost stand-in tried in its place (stream.replacement, attempt 1, 2, ...)."""
    stream = build_loader(data, stores / "train", split="train", batch_size=16, image_size=32, backend="pil",
                          num_workers=0, shuffle_window=4).stream
    shards = sorted(data.glob("*.tar"))
    keys = {number: read_index(shard).keys for number, shard in enumerate(shards)}
    skips = 0
    for step in range(cut_step, STEPS):
        for ref in stream.batch(step):
            attempt, sample = 0, ref
            while keys[sample.shard][sample.row] in lost:
                skips, attempt = skips + 1, attempt + 1
                sample = stream.replacement(ref, attempt)
    return skips


def lost_keys(shard, cut_at: int) -> set[str]:
    """Keys of the samples whose caption or image lay past byte `cut_at` (from an index made before the cut)."""
    index = read_index(shard)
    ends = [max(index.image_offset[i] + index.image_size[i], index.caption_offset[i] + index.caption_size[i])
            for i in range(len(index))]
    return {key for key, end in zip(index.keys, ends, strict=True) if end > cut_at}


@pytest.fixture
def data_copy(synth_data, tmp_path):
    """A copy of the training shards (the session's own must stay whole) and the shard to truncate."""
    data = tmp_path / "train"
    shutil.copytree(synth_data / "train", data)
    victim = sorted(data.glob("*.tar"))[1]
    return data, victim, lost_keys(victim, victim.stat().st_size // 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_truncated_mid_epoch_is_a_counted_skip(data_copy, stores, tmp_path, monkeypatch, backend):
    data, victim, lost = data_copy
    expected = expected_skips(data, stores, lost, CUT_STEP)
    fault = TruncateMidEpoch(victim, CUT_STEP, 16)
    monkeypatch.setattr(SampleReader, "read", lambda reader, ref: fault(reader, ref))
    cfg = load_config(overrides=SETTINGS + [f"data.backend={backend}", "data.on_error=skip"])
    result = train(cfg, data, stores / "train", tmp_path / "run", progress=False)
    assert fault.cut_at is not None, "the shard was never cut: the test did not test anything"
    assert result["step"] == STEPS
    # every lost sample read in the run's batches is one counted skip, a stand-in taking its place (DALI
    # reads batches ahead: some failures are of batches past the last step, never trained on)
    assert result["skipped"] == expected > 0
    assert len(fault.failures) >= expected if backend == "dali" else len(fault.failures) == expected
    assert all(str(victim) in failure and "truncated" in failure for failure in fault.failures)
    assert {failure.split("sample ")[1].split(":")[0].strip("'") for failure in fault.failures} <= lost
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["skipped"] == result["skipped"] and records[CUT_STEP - 1]["skipped"] == 0  # none before


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_truncated_mid_epoch_without_skip_names_shard_and_key(data_copy, stores, tmp_path, monkeypatch,
                                                                    backend):
    data, victim, lost = data_copy
    fault = TruncateMidEpoch(victim, CUT_STEP, 16)
    monkeypatch.setattr(SampleReader, "read", lambda reader, ref: fault(reader, ref))
    cfg = load_config(overrides=SETTINGS + [f"data.backend={backend}"])
    with pytest.raises(ShardError) as caught:
        train(cfg, data, stores / "train", tmp_path / "run", progress=False)
    message = str(caught.value)
    assert str(victim) in message and "truncated" in message
    assert any(f"sample {key!r}" in message for key in lost), message
    # the run folder keeps the steps done before the cut
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) >= CUT_STEP


# ------------------------------------------------- the reader meets a shard that changed after it was counted


def fresh_reader(data, stores) -> SampleReader:
    """A reader that has opened nothing yet, as a loader worker that starts (or reopens an evicted
    shard) after the change would."""
    return SampleReader(sorted(data.glob("*.tar")), open_store(stores / "train"))


def ref_of(row: int) -> SampleRef:
    return SampleRef(shard=1, row=row, epoch=0, position=16 + row)


def test_reader_opening_a_cut_shard_names_it_and_the_last_whole_member(data_copy, stores):
    data, victim, lost = data_copy
    os.truncate(victim, victim.stat().st_size // 2)
    with pytest.raises(ShardError) as caught:
        fresh_reader(data, stores).read(ref_of(0))
    message = str(caught.value)
    assert str(victim) in message and "truncated or corrupt after member" in message
    last_whole = message.split("after member ")[1].split("'")[1]
    assert last_whole.split(".")[0] not in lost  # the samples up to it are whole, the lost ones follow


def test_reader_opening_a_cut_shard_with_its_old_index_names_the_index(data_copy, stores):
    data, victim, _ = data_copy
    write_index(victim)
    os.truncate(victim, victim.stat().st_size // 2)
    os.utime(victim, ns=(index_path(victim).stat().st_mtime_ns + 10**9,) * 2)  # cut after it was indexed
    with pytest.raises(ShardError, match="stale") as caught:
        fresh_reader(data, stores).read(ref_of(0))
    assert str(index_path(victim)) in str(caught.value)


def test_reader_opening_a_shorter_replacement_names_the_shard(data_copy, stores):
    data, victim, _ = data_copy
    write_members(victim, read_members(victim)[: 3 * 8])  # 8 of its 16 samples (jpg, txt, json each)
    reader = fresh_reader(data, stores)
    assert reader.read(ref_of(7)).key == read_index(victim).keys[7]
    with pytest.raises(ShardError, match="holds 8 samples now") as caught:
        reader.read(ref_of(12))
    assert str(victim) in str(caught.value)
