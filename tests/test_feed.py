"""The DALI backend's feed thread (issue 10 item 4): batches prepared ahead of the step give exactly
the synchronous feed's batches, errors come out at their batch naming shard and key, and the thread
stops on close, on an error, when dropped, and at interpreter exit."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time

import pytest
import torch
from shard_tools import read_members, write_members

from lift_fast.data import build_loader
from lift_fast.data.dali import dali_available
from lift_fast.data.dali_batches import BatchesAhead
from lift_fast.data.shards import ShardError, list_shards

needs_dali = pytest.mark.skipif(not dali_available()[0], reason=f"DALI is not usable here: {dali_available()[1]}")


def feed_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lift-fast-feed"]


def wait_for_no_feed_thread(seconds: float = 5.0) -> list[threading.Thread]:
    end = time.monotonic() + seconds
    while feed_threads() and time.monotonic() < end:
        time.sleep(0.01)
    return feed_threads()


def assert_same_batches(ahead: list[dict], synchronous: list[dict]):
    assert len(ahead) == len(synchronous)
    for a, s in zip(ahead, synchronous):
        assert a.keys() == s.keys()
        assert a["keys"] == s["keys"] and a["skipped"] == s["skipped"] and a.get("step") == s.get("step")
        assert torch.equal(a["images"], s["images"]) and torch.equal(a["text_embeddings"], s["text_embeddings"])


# -- BatchesAhead on plain generators (no DALI) ---------------------------------------------------

def counting(n: int, fail_at: int | None = None, produced: list | None = None):
    for i in range(n):
        if i == fail_at:
            raise ShardError(f"shard 00003.tar: sample 'key{i}' cannot be decoded")
        if produced is not None:
            produced.append(i)
        yield i


def test_same_items_in_order_and_bounded_run_ahead():
    produced: list[int] = []
    ahead = BatchesAhead(counting(50, produced=produced), 3)
    assert next(ahead) == 0
    time.sleep(0.2)  # the thread fills the queue, then waits
    # 1 taken, 3 queued, 1 held by the thread while the queue is full: never the whole source
    assert len(produced) <= 1 + 3 + 1
    assert [0, *ahead] == list(range(50))
    assert not wait_for_no_feed_thread()


def test_an_error_comes_out_after_every_item_before_it_and_ends_the_iterator():
    ahead = BatchesAhead(counting(10, fail_at=6), 2)
    got = []
    with pytest.raises(ShardError, match=r"00003\.tar: sample 'key6'"):
        for item in ahead:
            got.append(item)
    assert got == [0, 1, 2, 3, 4, 5]
    assert list(ahead) == []
    assert not wait_for_no_feed_thread()


def test_close_and_drop_stop_the_thread_and_close_the_source():
    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(threading.current_thread().name)

    ahead = BatchesAhead(endless(), 2)
    assert [next(ahead), next(ahead)] == [0, 1]
    ahead.close()
    assert not feed_threads() and closed == ["lift-fast-feed"]  # closed on the thread that ran it
    with pytest.raises(StopIteration):
        next(ahead)

    ahead = BatchesAhead(endless(), 2)
    next(ahead)
    del ahead  # no close(): the last reference goes, and the thread must not be what keeps it
    assert not wait_for_no_feed_thread() and len(closed) == 2


# -- the DALI loader ------------------------------------------------------------------------------

def loader(data, store, split, *, prefetch, batch_size=5, **settings):
    return build_loader(data, store, split=split, batch_size=batch_size, image_size=32, backend="dali",
                        prefetch=prefetch, **settings)


@pytest.fixture(scope="module")
def corrupt_sets(synth_data, tmp_path_factory):
    """{split: folder} with one JPEG of each split cut in half (eval-00000005, train-00000037)."""
    out = {}
    for split, bad in (("eval", "eval-00000005.jpg"), ("train", "train-00000037.jpg")):
        folder = tmp_path_factory.mktemp("corrupt") / split
        for shard in list_shards(synth_data / split):
            write_members(folder / shard.name, [(name, data[: len(data) // 2] if name == bad else data)
                                                for name, data in read_members(shard)])
        out[split] = folder
    return out


@needs_dali
@pytest.mark.parametrize("on_error", ["error", "skip"])
def test_feed_thread_gives_the_synchronous_batches(synth_data, stores, corrupt_sets, on_error):
    settings = {"seed": 3, "hflip": True, "crop_scale": (0.5, 1.0)}
    data = synth_data / "train" if on_error == "error" else corrupt_sets["train"]  # skip: stand-ins too
    runs = [list(zip(range(9), loader(data, stores / "train", "train", prefetch=p, on_error=on_error, **settings)))
            for p in (0, 2)]
    synchronous, ahead = ([batch for _, batch in run] for run in runs)
    assert_same_batches(ahead, synchronous)
    assert [b["step"] for b in ahead] == list(range(9))
    if on_error == "skip":
        assert sum(b["skipped"] for b in ahead) >= 1  # the corrupt sample was met, and replaced alike
    eval_runs = [list(loader(corrupt_sets["eval"], stores / "eval", "eval", prefetch=p, on_error="skip")) for p in (0, 3)]
    assert_same_batches(eval_runs[1], eval_runs[0])
    assert not wait_for_no_feed_thread()


@needs_dali
def test_a_resumed_feed_reads_the_same_batches(synth_data, stores):
    whole = [b for _, b in zip(range(6), loader(synth_data / "train", stores / "train", "train", prefetch=2))]
    resumed = [b for _, b in zip(range(3), loader(synth_data / "train", stores / "train", "train", prefetch=2,
                                                  start_step=3))]
    assert_same_batches(resumed, whole[3:])


@needs_dali
@pytest.mark.parametrize("split", ["eval", "train"])
def test_an_error_in_the_feed_thread_names_shard_and_key_at_its_batch(synth_data, stores, corrupt_sets, split):
    bad_key, bad_shard = {"eval": ("eval-00000005", "00000.tar"), "train": ("train-00000037", "00002.tar")}[split]
    batches = loader(corrupt_sets[split], stores / split, split, prefetch=2)
    if split == "eval":
        bad_batch = 1  # batches of 5 in shard order
    else:
        reader, stream = batches.dataset.reader, batches.stream
        bad_batch = next(step for step in range(stream.steps_per_epoch)
                         if bad_key in [reader.key(ref) for ref in stream.batch(step)])
    # batches.data: the backend's own stream (the eval Loader holds one batch back to merge skip counts)
    for prefetch in (2, 0):
        got = []
        with pytest.raises(ShardError, match="cannot be decoded") as err:
            for batch in loader(corrupt_sets[split], stores / split, split, prefetch=prefetch).data:
                got.append(batch)
        assert f"'{bad_key}'" in str(err.value) and bad_shard in str(err.value)
        assert len(got) == bad_batch, prefetch  # every batch before the bad one, none after
        assert all(bad_key not in batch["keys"] for batch in got)
    assert not wait_for_no_feed_thread()


@needs_dali
def test_closing_mid_stream_leaves_no_feed_thread_and_the_loader_usable(synth_data, stores):
    train = loader(synth_data / "train", stores / "train", "train", prefetch=2)
    batches = iter(train)
    first = [next(batches), next(batches)]
    assert len(feed_threads()) == 1
    batches.close()
    assert not feed_threads()
    assert_same_batches([b for _, b in zip(range(2), train)], first)  # a new run, from the start
    batches = iter(train)
    next(batches)
    del batches  # dropped without close()
    gc.collect()
    assert not wait_for_no_feed_thread()


EXIT_WITH_A_RUNNING_FEED = """
import sys
from lift_fast.data import build_loader
batches = iter(build_loader(sys.argv[1], sys.argv[2], split="train", batch_size=5, image_size=32, backend="dali"))
next(batches)  # the feed thread is running ahead, and the module global keeps it referenced at exit
print("exiting", flush=True)
"""


@needs_dali
@pytest.mark.slow
def test_interpreter_exit_with_a_running_feed_does_not_hang(synth_data, stores):
    done = subprocess.run([sys.executable, "-c", EXIT_WITH_A_RUNNING_FEED, str(synth_data / "train"),
                           str(stores / "train")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr[-2000:]
