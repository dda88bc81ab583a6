"""The DALI backend of build_loader: the same samples, crops and flips as the PIL backend, decoded by DALI.

A feed thread reads each batch's samples by offset, opens each image's header (for the crop
window, which needs the image size) and looks up its embedding row; DALI decodes, crops and resizes
(normalising unless the loader is raw; on the GPU with `mixed` decoding when there is one) while the next batches are
read. The embedding rows and keys travel beside the jobs in a queue, so they pair with the images
of exactly their batch: the decoder yields its batches in job order.

The feed runs ahead of the training step (BatchesAhead): the thread drives the whole of the above
and hands finished batches over through a queue of `prefetch` batches, so the step's wait for data
is a queue read while the next batches are prepared. The GIL is shared, but the thread's heavy parts
(pread, numpy, DALI's own threads, torch's resize) release it, and so does a step waiting for the
GPU. prefetch=0 runs the same generator on the calling thread, in step with it (the feed as it was
before the thread, and the benchmark's baseline). Either way the batches, their order and their
errors are the same: an error comes out of next() after every batch before it.

A sample DALI cannot decode is an error naming shard and key, or with on_error="skip" a counted
skip: in training its stand-in (the same one the PIL backend would use) takes its place and the
batch is decoded again; in eval the batch is one shorter.
"""

from __future__ import annotations

import atexit
import itertools
import queue
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lift_fast.data.dali import DaliDecoder, DecodeJob, ImageDecodeError
from lift_fast.data.shards import ShardError
from lift_fast.data.stream import SampleRef


@dataclass
class Pending:
    """One batch in the making: per sample its ref, the stand-in attempt in use, the prepared sample
    (encoded bytes, box, flip, RawSample); and the samples skipped for it, and its step (None: eval)."""

    refs: list[SampleRef]
    attempts: list[int]
    samples: list[tuple]
    skipped: int
    step: int | None

    def job(self) -> DecodeJob:
        return DecodeJob(encoded=[s[0] for s in self.samples],
                         boxes=np.array([s[1] for s in self.samples], dtype=np.int64).reshape(-1, 4),
                         flips=np.array([s[2] for s in self.samples], dtype=bool),
                         keys=[s[3].key for s in self.samples])


class DaliImageTextBatches:
    """Iterate for batch dicts like ImageTextBatches' (see lift_fast/data/loader.py), decoded by DALI.

    batches: the PIL backend's ImageTextBatches for the same loader (its reader, stream, settings and
    stand-in rule are shared). decoder: a DaliDecoder for these image settings. prefetch: batches
    prepared ahead on a feed thread (0: prepared on the iterating thread when asked for).
    Each iter() is one run of the decoder: one iterator at a time.
    """

    def __init__(self, batches, decoder: DaliDecoder, prefetch: int = 2):
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"DaliImageTextBatches: prefetch must be an int >= 0 (0: no feed thread), got {prefetch!r}")
        self.batches, self.decoder, self.prefetch = batches, decoder, prefetch

    def _sample(self, ref: SampleRef, train: bool, draws: np.ndarray | None = None) -> tuple:
        raw, _, box, flip = self.batches.prepare(ref, train, draws, header_only=True)
        return np.frombuffer(raw.image, dtype=np.uint8), box, flip, raw

    def _pending(self, refs: list[SampleRef], step: int | None) -> Pending:
        pending = Pending([], [], [], 0, step)
        draws = self.batches.batch_draws(refs) if step is not None else [None] * len(refs)
        for ref, row in zip(refs, draws):
            if step is not None:
                sample, attempt, skipped = self.batches.with_stand_ins(
                    ref, lambda r, ref=ref, row=row: self._sample(r, True, row if r is ref else None), step)
            else:
                sample = self.batches.skippable(lambda r: self._sample(r, False), ref)
                attempt, skipped = 0, int(sample is None)
            pending.skipped += skipped
            if sample is not None:
                pending.refs.append(ref)
                pending.attempts.append(attempt)
                pending.samples.append(sample)
            if self.prefetch:
                # On the feed thread: hand the GIL to a step waiting for it after each sample (~66 us of
                # Python) instead of at the end of a 5 ms switch interval (docs/data.md, the GIL).
                time.sleep(0)
        return pending

    def _replace(self, pending: Pending, index: int, error: ImageDecodeError) -> None:
        """Replace sample `index` by its next stand-in (train) or drop it (eval); ShardError without skip."""
        if self.batches.on_error != "skip":
            raise ShardError(f"{pending.samples[index][3].where}: its image cannot be decoded ({error})") from None
        pending.skipped += 1
        if pending.step is None:
            for parts in (pending.refs, pending.attempts, pending.samples):
                del parts[index]
            return
        sample, attempt, skipped = self.batches.with_stand_ins(
            pending.refs[index], lambda r: self._sample(r, True), pending.step, pending.attempts[index] + 1)
        pending.skipped += skipped
        pending.samples[index], pending.attempts[index] = sample, attempt

    def __iter__(self) -> Iterator[dict]:
        if not self.prefetch:
            return self._batches()
        return BatchesAhead(self._batches(), self.prefetch, device=self.decoder.device)

    def _batches(self) -> Iterator[dict]:
        """The batch dicts in stream order, prepared and decoded on the thread that iterates this."""
        queue: deque[Pending] = deque()  # the Pending of every job handed to the decoder and not yet yielded
        b = self.batches
        if b.split == "eval":
            groups = ((refs, None) for refs in b.stream.in_order(b.rank, b.world_size))
        else:
            groups = ((b.stream.batch(step, b.rank, b.world_size), step) for step in itertools.count(b.start_step))
        empty = []  # eval batches that every sample was skipped from: never sent to DALI

        def jobs(pendings) -> Iterator[DecodeJob]:
            for pending in pendings:
                if not pending.samples:
                    empty.append(pending)
                    continue
                queue.append(pending)
                yield pending.job()

        source = jobs(self._pending(refs, step) for refs, step in groups)
        while True:
            try:
                for images in self.decoder.run(source):
                    yield from (self._batch(None, e) for e in empty)
                    empty.clear()
                    yield self._batch(images, queue.popleft())
                yield from (self._batch(None, e) for e in empty)
                return
            except ImageDecodeError as err:
                # queue: the failed job's Pending first, then those of the jobs DALI took after it
                failed = queue.popleft()
                self._replace(failed, err.index, err)
                taken = list(queue)
                queue.clear()
                source = itertools.chain(jobs([failed, *taken]), source)

    def _batch(self, images: torch.Tensor | None, pending: Pending) -> dict:
        size = self.batches.image_size
        if images is None:  # every sample skipped: empty, in the dtype and on the device of a decoded batch
            images = torch.empty(0, 3, size, size, dtype=self.decoder.dtype, device=self.decoder.device)
        batch = {"images": images, "text_embeddings": self.batches.rows([s[3].embedding for s in pending.samples]),
                 "keys": [s[3].key for s in pending.samples], "skipped": pending.skipped}
        if pending.step is not None:
            batch["step"] = pending.step
        return self.batches.with_tokens(batch, [s[3].caption for s in pending.samples])  # CLIP mode's token ids


_END = object()  # the feed thread's last queue entry after the source's last batch
_RUNNING: weakref.WeakSet = weakref.WeakSet()  # feeds whose thread may still run, stopped at exit


class BatchesAhead:
    """Iterate `source`'s items, produced up to `depth` ahead by a daemon thread ("lift-fast-feed").

    The same items in the same order as iterating `source` itself; an exception raised by `source` is
    raised by next() after every item before it, and the iterator then ends. Memory: at most `depth`
    items wait in the queue, plus the one the thread holds while the queue is full.
    close(), exhausting the iterator, an error, or dropping the last reference to it stops the thread
    and waits for it (at most the item being produced); `source` is closed on the thread that ran it.
    The thread holds `source` but not this object, so it never keeps the iterator (or the loader
    behind it) alive; at interpreter exit every feed still running is stopped before DALI shuts its
    pipelines down.

    device: a CUDA device the thread makes current (CUDA's current device is per thread), or None.
    """

    def __init__(self, source: Iterator, depth: int, *, device: torch.device | None = None):
        if depth < 1:
            raise ValueError(f"BatchesAhead: depth must be at least 1, got {depth}")
        self._items: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=_produce, args=(source, self._items, self._stop, device),
                                        name="lift-fast-feed", daemon=True)
        self._thread.start()
        _RUNNING.add(self)

    def __iter__(self) -> BatchesAhead:
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        item, error = self._items.get()
        if item is _END or error is not None:
            self.close()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the feed thread and wait for it; the items it prepared ahead are dropped."""
        self._finished = True
        self._stop.set()
        # At interpreter shutdown daemon threads are frozen, and joining one would wait forever.
        while self._thread.is_alive() and self._thread is not threading.current_thread() and not sys.is_finalizing():
            self._drop_queued()  # room for a put() the thread is blocked in, so it sees the stop
            self._thread.join(timeout=0.05)
        self._drop_queued()

    def _drop_queued(self) -> None:
        while True:
            try:
                self._items.get_nowait()
            except queue.Empty:
                return

    def __del__(self):
        thread = getattr(self, "_thread", None)  # None: __init__ raised before it made one
        if thread is not None and thread.is_alive():  # a stopped feed needs nothing, even late at exit
            self.close()


def _produce(source: Iterator, items: queue.Queue, stop: threading.Event, device: torch.device | None) -> None:
    """The feed thread: put (item, None) for each of `source`'s items, then (_END, None) or (None, error)."""
    try:
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
        for item in source:
            items.put((item, None))
            if stop.is_set():
                return
        items.put((_END, None))
    except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there in order
        items.put((None, error))
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()  # a generator: its finally blocks (the decoder's run) run here, on its own thread


@atexit.register  # registered after nvidia.dali's (imported above), so it runs before DALI's shutdown
def _stop_running_feeds() -> None:
    for feed in list(_RUNNING):
        feed.close()
