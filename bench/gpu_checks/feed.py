"""The training loop's feed (lift_fast/train/feed.py) on the GPU: does moving a batch wait for the step?

feed_host_wait (a proof: it runs before any timing): a ViT-B/16 batch as the loaders give it, 256
uint8 images at 224 px and float16 rows of 4,096, moved while the GPU still runs a queued kernel of
~200 ms (torch.cuda._sleep, a stand-in for the previous step). Host milliseconds of the call:
  - DeviceFeed, rows from pageable memory (the DALI feed's) through its pinned buffers;
  - DeviceFeed, everything pinned already (the PIL loader's pin-memory thread);
  - the old way, `.to(device, non_blocking=True)` of pageable float32 rows, which waits for the
    queued kernel (the defect of issue 17).
Goal: the feed's calls return in well under the queued kernel's time (< 20 ms), and the batch it
gives equals the host batch (images normalised by normalize_images, rows bit for bit) once the GPU
has caught up.

`--device cpu --quick` runs the staging path on plain memory (no stream) and checks the batch only.
"""

from __future__ import annotations

import time

import torch

from . import Context, Row, gpu_check
from .data import sleep_cycles

BATCH, IMAGE_SIZE, TEXT_DIM = 256, 224, 4096
QUEUED_S = 0.2  # the stand-in previous step on the GPU
GOAL_MS = 20.0


def _host_batch(ctx: Context) -> dict:
    generator = torch.Generator().manual_seed(0)
    batch, size, dim = ctx.size(BATCH, 4), ctx.size(IMAGE_SIZE, 16), ctx.size(TEXT_DIM, 32)
    return {"images": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator),
            "text_embeddings": torch.randn(batch, dim, generator=generator).half(), "keys": [str(i) for i in range(batch)]}


def _check_batch(out: dict, host: dict, image_dtype: torch.dtype) -> float:
    """The largest difference between the fed batch and the host batch (0 when right)."""
    from lift_fast.data.augment import normalize_images

    images = (out["images"].cpu().float() - normalize_images(host["images"], image_dtype).float()).abs().max()
    rows = (out["text_embeddings"].cpu().float() - host["text_embeddings"].float()).abs().max()
    if out["text_embeddings"].dtype != host["text_embeddings"].dtype:
        return float("inf")
    return float(max(images, rows))


@gpu_check("feed_host_wait", est_seconds=20, proof=True)
def feed_host_wait(ctx: Context) -> list[Row]:
    from lift_fast.train.feed import DeviceFeed

    host = _host_batch(ctx)
    label = f"B={len(host['keys'])} {host['images'].shape[-1]}px uint8 + fp16 rows"
    if ctx.device.type != "cuda":
        feed = DeviceFeed(ctx.device, image_dtype=torch.bfloat16, staged=True, pin=False)
        outs = [feed(host) for _ in range(3)]
        worst = max(_check_batch(out, host, torch.bfloat16) for out in outs)
        return [Row(f"DeviceFeed staging path on the CPU (smoke) {label}", worst, "max difference",
                    "3 batches through the two buffers; no stream on the CPU")]
    pinned = {**host, "images": host["images"].pin_memory(), "text_embeddings": host["text_embeddings"].pin_memory()}
    rows, worst = [], 0.0
    for what, batch in (("rows from pageable memory (DALI feed)", host), ("batch pinned (PIL pin thread)", pinned)):
        feed = DeviceFeed(ctx.device, image_dtype=torch.bfloat16)
        feed(batch)  # first call: allocates the pinned buffers (cudaHostAlloc), not what a step pays
        ctx.synchronize()
        torch.cuda._sleep(sleep_cycles(QUEUED_S))
        began = time.perf_counter()
        out = feed(batch)
        host_ms = (time.perf_counter() - began) * 1e3
        ctx.synchronize()
        worst = max(worst, _check_batch(out, host, torch.bfloat16))
        met = "met" if host_ms < GOAL_MS else "NOT MET"
        rows.append(Row(f"DeviceFeed {label}, {what}: host time with {QUEUED_S * 1e3:.0f} ms queued", host_ms, "ms",
                        f"goal < {GOAL_MS:.0f} ms {met}"))
    ctx.synchronize()
    torch.cuda._sleep(sleep_cycles(QUEUED_S))
    began = time.perf_counter()
    host["text_embeddings"].float().to(ctx.device, non_blocking=True)
    old_ms = (time.perf_counter() - began) * 1e3
    ctx.synchronize()
    rows.append(Row(f"old: pageable float32 rows .to(non_blocking=True) with {QUEUED_S * 1e3:.0f} ms queued", old_ms,
                    "ms", "the host sync the feed removes (about the queued time where the copy waits)"))
    rows.append(Row(f"DeviceFeed {label}: batch vs host", worst, "max difference", "goal 0"))
    return rows
