"""The input pipeline on the GPU: DaliDecoder with `mixed` decoding, images/s at 224 px, batch 256.

The images are the benchmark's photo-like 500x375 JPEGs (quality 90, ~47 KB; bench/photos.py), 256
distinct ones cycled through, with RandomResizedCrop boxes (scale 0.9..1) and flips drawn from a
seed, as the training loader does. The decoder runs resample="dali": decoders.image on the GPU
(nvJPEG, the hardware JPEG engines where the GPU has them), fn.resize (cubic, antialiased) with the
box as its region of interest, uint8 to CHW, then normalize_images to float32. Timed: BATCHES batches after
WARMUP, from the first job in to the last batch synchronised; the main thread only feeds jobs
(bytes already in memory: no tar reading). Goal: at least 5,000 images/s.

A second row compares the first batch with the PIL path (convert, resize(BICUBIC, box), flip,
to_tensor) on the same boxes: the GPU's JPEG decoder rounds its IDCT and chroma upsampling
differently from libjpeg-turbo, so this is a sanity bound (mean under 3 uint8 levels), not the
CPU tests' 1-level match.

data_feed_thread: the DALI training loader on the device with its feed thread (prefetch=2) against
the synchronous feed (prefetch=0): the same keys and images, on the current device (the thread makes
it current: CUDA's current device is per thread), and the loop's data wait as a fraction of the time
beside a stand-in step that keeps the GPU busy for 1.5x the feed's batch time (torch.cuda._sleep)
and waits for it. Goal: under 5 % with the feed thread.

`--device cpu --quick` runs the same graph with CPU operators (device_id=None) on a few small images.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from . import Context, Row, gpu_check

IMAGE_SIZE, BATCH, DISTINCT = 224, 256, 256
WARMUP, BATCHES = 3, 20
QUICK = {"image_size": 32, "batch": 4, "distinct": 8, "width": 64, "height": 48}
GOAL_IMAGES_PER_S = 5000
LEVEL = 1 / 255 / 0.26130258  # one uint8 level in normalised units (smallest CLIP std)
MEAN_LEVELS_BOUND = 3.0


def views(step: int, batch: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop windows [batch, 4] and flips [batch] for a step's samples, drawn as the training loader
    draws them (RandomResizedCrop, scale 0.9..1, flip on)."""
    from lift_fast.data.augment import sample_uniforms, train_view

    drawn = [train_view(width, height, (0.9, 1.0), True, draws)
             for draws in sample_uniforms(0, 0, np.arange(step * batch, (step + 1) * batch))]
    return np.array([box for box, _ in drawn]), np.array([flip for _, flip in drawn])


def pil_batch(encoded: list[np.ndarray], boxes: np.ndarray, flips: np.ndarray, size: int) -> torch.Tensor:
    """The PIL loader's result for these samples: [b, 3, size, size] float32 on the CPU."""
    from lift_fast.data.augment import crop_resize, open_image, to_tensor

    out = []
    for i, (data, box, flip) in enumerate(zip(encoded, boxes.tolist(), flips)):
        where = f"image {i}"
        out.append(to_tensor(crop_resize(open_image(data.tobytes(), where), tuple(box), size, bool(flip), where)))
    return torch.stack(out)


@gpu_check("data_dali_mixed_224", est_seconds=40)
def data_dali_mixed_224(ctx: Context) -> list[Row]:
    """Images/s of DaliDecoder(mixed) at 224 px, batch 256, and its agreement with the PIL path."""
    from photos import photo_jpeg

    from lift_fast.data.dali import DaliDecoder, DecodeJob, dali_available

    device_id = (ctx.device.index or 0) if ctx.device.type == "cuda" else None
    usable, why = dali_available(device_id)
    name = "DaliDecoder mixed" if device_id is not None else "DaliDecoder cpu operators (smoke)"
    if not usable:
        return [Row(name, math.nan, "images/s", f"not run: {why}")]
    size = QUICK["image_size"] if ctx.quick else IMAGE_SIZE
    batch = QUICK["batch"] if ctx.quick else BATCH
    distinct = QUICK["distinct"] if ctx.quick else DISTINCT
    width, height = (QUICK["width"], QUICK["height"]) if ctx.quick else (500, 375)
    batches, warmup = (3, 1) if ctx.quick else (BATCHES, WARMUP)

    encoded = [np.frombuffer(photo_jpeg(seed, width, height), dtype=np.uint8) for seed in range(distinct)]

    def jobs(count: int):
        for step in range(count):
            picks = [(step * batch + i) % distinct for i in range(batch)]
            yield DecodeJob([encoded[i] for i in picks], *views(step, batch, width, height),
                            [f"{i:05d}" for i in picks])

    decoder = DaliDecoder(size, batch, device_id=device_id, num_threads=8 if device_id is not None else 2,
                          prefetch=2, resample="dali")
    first_job = next(jobs(1))
    (first,) = decoder.run([first_job])
    difference = (first.float().cpu() - pil_batch(first_job.encoded, first_job.boxes, first_job.flips, size)).abs()
    max_levels, mean_levels = float(difference.max() / LEVEL), float(difference.mean() / LEVEL)
    if not mean_levels <= MEAN_LEVELS_BOUND:
        raise AssertionError(f"DaliDecoder differs from the PIL path by {mean_levels:.2f} uint8 levels on average "
                             f"(max {max_levels:.1f}); bound {MEAN_LEVELS_BOUND}: wrong channels, boxes or flips?")

    run = decoder.run(jobs(warmup + batches))
    for _ in range(warmup):
        next(run)
    ctx.synchronize()
    began = time.perf_counter()
    count = sum(len(images) for images in run)
    ctx.synchronize()
    seconds = time.perf_counter() - began
    rate = count / seconds
    met = "met" if rate >= GOAL_IMAGES_PER_S else "NOT MET"
    where = f"{width}x{height} q90 JPEG -> {size}px, batch {batch}"
    return [
        Row(f"{name} {where}", rate, "images/s",
            f"{batches} batches after {warmup} warm-up, {decoder.num_threads} DALI threads, prefetch 2"
            + (f"; goal >= {GOAL_IMAGES_PER_S:,}: {met}" if not ctx.quick else "")),
        Row(f"{name} vs PIL path, first batch", mean_levels, "uint8 levels (mean)",
            f"max {max_levels:.2f} levels; bound on the mean {MEAN_LEVELS_BOUND}"),
    ]


@gpu_check("data_feed_thread", est_seconds=45)
def data_feed_thread(ctx: Context) -> list[Row]:
    """The DALI loader's feed thread on the device: the same batches as the synchronous feed, on the
    current device, and the loop's data wait beside an asynchronous step of fixed GPU time."""
    import tempfile

    from image_shards import write_image_shards

    from lift_fast.data import build_loader
    from lift_fast.data.dali import dali_available

    device_id = (ctx.device.index or 0) if ctx.device.type == "cuda" else None
    usable, why = dali_available(device_id)
    name = "DALI loader feed thread" + ("" if device_id is not None else " cpu operators (smoke)")
    if not usable:
        return [Row(name, math.nan, "fraction", f"not run: {why}")]
    size, batch, steps = ctx.size(IMAGE_SIZE, 32), ctx.size(BATCH, 8), ctx.size(16, 4)
    width, height = (500, 375) if not ctx.quick else (64, 48)
    with tempfile.TemporaryDirectory() as tmp:
        data, store = write_image_shards(tmp, count=ctx.size(2048, 64), width=width, height=height, dim=ctx.size(384, 16))

        def loader(prefetch: int):
            return build_loader(data, store, split="train", batch_size=batch, image_size=size, backend="dali",
                                num_workers=ctx.size(8, 2), prefetch=prefetch)

        sync, ahead = (list(zip(range(3), loader(p))) for p in (0, 2))
        for (_, a), (_, s) in zip(ahead, sync):
            if a["keys"] != s["keys"] or a["images"].device != s["images"].device:
                raise AssertionError("the feed thread's batches differ from the synchronous feed's in keys or device")
            if a["images"].device.type != ctx.device.type:
                raise AssertionError(f"batches on {a['images'].device}, expected {ctx.device}")
        difference = max(float((a["images"].float() - s["images"].float()).abs().max()) for (_, a), (_, s) in zip(ahead, sync))

        def feed_time() -> float:
            stream = iter(loader(0))
            next(stream)
            ctx.synchronize()
            began = time.perf_counter()
            for _ in range(steps):
                next(stream)
            ctx.synchronize()
            stream.close()
            return (time.perf_counter() - began) / steps

        step_s = max(0.02, 1.5 * feed_time())
        spin = _gpu_spin(ctx, step_s)
        shares = {}
        for prefetch in (0, 2):
            stream = iter(loader(prefetch))
            next(stream)
            wait = 0.0
            ctx.synchronize()
            began = time.perf_counter()
            for _ in range(steps):
                asked = time.perf_counter()
                images = next(stream)["images"]
                wait += time.perf_counter() - asked
                spin(images)  # the step: queued on the device, then waited for, as a step's read-back does
            shares[prefetch] = wait / (time.perf_counter() - began)
            stream.close()  # before the shards' folder goes
    return [Row(f"{name} data wait, step {step_s * 1e3:.0f} ms, batch {batch} {size}px", shares[2], "fraction",
                f"synchronous feed (prefetch=0): {shares[0]:.3f}; goal < 0.05 with the feed thread; batches equal to "
                f"the synchronous feed's within {difference:.2g}")]


def _gpu_spin(ctx: Context, seconds: float):
    """A stand-in step that keeps the device busy for about `seconds` and waits for it (on the CPU: a sleep)."""
    if ctx.device.type != "cuda":
        return lambda images: time.sleep(seconds)
    cycles = sleep_cycles(seconds)

    def step(images):
        images.sum()  # reads the batch on the device
        torch.cuda._sleep(cycles)
        torch.cuda.synchronize(ctx.device)

    return step


def sleep_cycles(seconds: float) -> int:
    """The torch.cuda._sleep cycles that keep the current CUDA device busy for about `seconds` (measured)."""
    torch.cuda._sleep(1000)
    probe = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    return int(probe * seconds * 1e3 / start.elapsed_time(end))
