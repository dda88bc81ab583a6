"""The DALI backend of build_loader: the same samples, crops and flips as the PIL backend, decoded by DALI.

The main process reads each batch's samples by offset, opens each image's header (for the crop
window, which needs the image size) and looks up its embedding row; DALI decodes, crops, resizes
and normalises (on the GPU with `mixed` decoding when there is one) while the next batches are
read. The embedding rows and keys travel beside the jobs in a queue, so they pair with the images
of exactly their batch: the decoder yields its batches in job order.

A sample DALI cannot decode is an error naming shard and key, or with on_error="skip" a counted
skip: in training its stand-in (the same one the PIL backend would use) takes its place and the
batch is decoded again; in eval the batch is one shorter.
"""

from __future__ import annotations

import itertools
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
    stand-in rule are shared). decoder: a DaliDecoder for these image settings.
    """

    def __init__(self, batches, decoder: DaliDecoder):
        self.batches, self.decoder = batches, decoder

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
        if images is None:
            images = torch.empty(0, 3, size, size)
        rows = [s[3].embedding for s in pending.samples]
        batch = {"images": images,
                 "text_embeddings": torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, self.batches.dim),
                 "keys": [s[3].key for s in pending.samples], "skipped": pending.skipped}
        if pending.step is not None:
            batch["step"] = pending.step
        return batch
