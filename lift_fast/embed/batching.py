"""Batches for the encoder: captions sorted by token count, cut by a token budget, lengths bucketed.

    plan = plan_batches(lengths, batch_size=128, max_tokens=8192, length_step=16, max_length=77)
    for batch in plan:            # longest captions first, so an out-of-memory shows at once
        batch.rows                # indices into `lengths`
        batch.length              # the padded length of the batch: a bucket (multiple of 16, or max_length)

Sorting puts captions of similar length together, so a batch carries little padding. The token
budget lets a batch of short captions hold more of them than a batch of long ones (the same memory,
fewer forward passes). Rounding the padded length up to a bucket keeps the number of distinct input
shapes small, so a compiled model is not recompiled for every length (at max_length=77 and a step
of 16: five shapes, 16, 32, 48, 64 and 77). Without compilation the step is 1: exact lengths, least
padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Smallest bucket step when the model is compiled, and the most buckets wanted: the step grows with
# max_length so that long-caption settings (323 tokens) still give few shapes (7 with a step of 48).
COMPILED_MIN_STEP = 16
COMPILED_MAX_BUCKETS = 8


@dataclass(frozen=True)
class Batch:
    """Rows (indices into the lengths planned over) that go through the encoder together, padded to `length`."""

    rows: list[int]
    length: int


def auto_length_step(max_length: int, compiled: bool) -> int:
    """The bucket step `embed.length_step=0` stands for: exact lengths (1) unless compiled; then a
    multiple of 16 giving at most COMPILED_MAX_BUCKETS buckets up to max_length."""
    if not compiled:
        return 1
    step = math.ceil(max_length / COMPILED_MAX_BUCKETS)
    return max(COMPILED_MIN_STEP, math.ceil(step / COMPILED_MIN_STEP) * COMPILED_MIN_STEP)


def bucket_length(length: int, step: int, max_length: int) -> int:
    """`length` rounded up to a multiple of `step`, but never past max(length, max_length)."""
    if step <= 1:
        return length
    return max(length, min(max_length, math.ceil(length / step) * step))


def plan_batches(lengths: Sequence[int], *, batch_size: int, max_tokens: int, length_step: int,
                 max_length: int) -> list[Batch]:
    """Group captions of token counts `lengths` (N) into batches.

    Captions go longest first (ties in input order, so the plan is deterministic). A batch holds at
    most `batch_size` captions and at most `max_tokens` padded tokens (rows x bucketed length; 0:
    no token limit), and at least one caption. Returns the batches; every index 0..N-1 is in exactly one.
    Raises ValueError for a batch_size below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[Batch] = []
    start = 0
    while start < len(order):
        padded = bucket_length(lengths[order[start]], length_step, max_length)
        rows = batch_size if max_tokens <= 0 else max(1, min(batch_size, max_tokens // max(padded, 1)))
        batches.append(Batch(order[start:start + rows], padded))
        start += rows
    return batches


# Padded tokens per real token an exact-length batch may carry (embed.packing=exact, or a model that
# cannot run packed sequences): captions sorted by length share a batch while its padding stays under 5 %.
MAX_PADDING = 1.05


def plan_exact(lengths: Sequence[int], *, batch_size: int, max_tokens: int,
               max_padding: float = MAX_PADDING) -> list[Batch]:
    """Batches padded to their own longest caption (no buckets), each holding at most
    `max_padding` x its real tokens as padded tokens, `batch_size` captions and `max_tokens` padded
    tokens (0: no token limit), and at least one caption.

    Captions go longest first (ties in input order). Returns the batches; every index 0..N-1 is in
    exactly one. Raises ValueError for a batch_size below 1 or max_padding below 1.
    """
    if batch_size < 1 or max_padding < 1:
        raise ValueError(f"batch_size must be at least 1 and max_padding at least 1, got {batch_size}, {max_padding}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[Batch] = []
    start = 0
    while start < len(order):
        length = max(lengths[order[start]], 1)
        limit = batch_size if max_tokens <= 0 else max(1, min(batch_size, max_tokens // length))
        real = lengths[order[start]]
        end = start + 1
        while end < len(order) and end - start < limit and (end - start + 1) * length <= max_padding * (real + lengths[order[end]]):
            real += lengths[order[end]]
            end += 1
        batches.append(Batch(order[start:end], length))
        start = end
    return batches


def plan_packs(lengths: Sequence[int], *, max_tokens: int) -> list[Batch]:
    """Packs of whole captions laid end to end without padding (Batch.length: the pack's tokens), each
    at most `max_tokens` tokens (a caption longer than that is a pack of its own).

    Captions go longest first (ties in input order), so that packs of long and of short captions
    each run at the full token budget. Raises ValueError for max_tokens below 1.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[Batch] = []
    rows: list[int] = []
    tokens = 0
    for i in order:
        if rows and tokens + lengths[i] > max_tokens:
            batches.append(Batch(rows, tokens))
            rows, tokens = [], 0
        rows.append(i)
        tokens += lengths[i]
    if rows:
        batches.append(Batch(rows, tokens))
    return batches
