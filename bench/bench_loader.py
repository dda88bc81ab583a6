"""Input pipeline: DaliDecoder on the CPU against the PIL loader's per-sample work, in images/s.

Both sides turn the same 384 photo-like 500x375 JPEGs (quality 90, ~47 KB each) with the same crop
boxes (RandomResizedCrop, scale 0.9..1, aspect 3/4..4/3) and flips into normalised 224-px float32
batches of 64, with two of everything:

  baseline   the PIL loader's work per sample (open, convert("RGB"), resize(BICUBIC, box), flip,
             loader.to_tensor) in a torch DataLoader with 2 worker processes (persistent, prefetch 4,
             as build_loader makes it), batches collated by the workers;
  dali_cpu   DaliDecoder(device_id=None, num_threads=2): DALI's 2 threads decode the boxes (ROI
             decoding), 2 threads resize them with torch (1 intra-op thread each, as the DataLoader
             workers have) while DALI decodes the next batches.

One round is one pass over the 384 images (6 batches); the time ratio is the speedup. Startup
(worker processes, the DALI pipeline) is in the warm-up round, not in the timed ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from photos import photo_jpeg
from torch.utils.data import DataLoader, Dataset

IMAGES, BATCH, SIZE, WORKERS = 384, 64, 224, 2
WIDTH, HEIGHT, QUALITY = 500, 375, 90
SCALE = (0.9, 1.0)  # DESIGN.md's RandomResizedCrop area range (aspect 3/4..4/3, lift_fast.data.augment)
LEVEL = 1 / 255 / 0.26130258  # one uint8 level in normalised units (smallest CLIP std)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """(encoded JPEGs, boxes [N, 4], flips [N]), the same for both sides."""
    from lift_fast.data.augment import sample_uniforms, train_view

    encoded = [photo_jpeg(seed, WIDTH, HEIGHT, QUALITY) for seed in range(IMAGES)]
    views = [train_view(WIDTH, HEIGHT, SCALE, True, draws) for draws in sample_uniforms(0, 0, np.arange(IMAGES))]
    return encoded, np.array([box for box, _ in views]), np.array([flip for _, flip in views])


class PilSamples(Dataset):
    """The PIL loader's per-sample work on the corpus: decode, box crop + bicubic resize, flip, to_tensor."""

    def __init__(self, encoded: list[bytes], boxes: np.ndarray, flips: np.ndarray):
        self.encoded, self.boxes, self.flips = encoded, boxes, flips

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> torch.Tensor:
        from lift_fast.data.augment import crop_resize, open_image, to_tensor

        where = f"image {index}"
        box = tuple(int(v) for v in self.boxes[index])
        return to_tensor(crop_resize(open_image(self.encoded[index], where), box, SIZE, bool(self.flips[index]), where))


def one_pass(batches) -> int:
    return sum(len(batch) for batch in batches)


def pil_side(corpus):
    loader = DataLoader(PilSamples(*corpus), batch_size=BATCH, num_workers=WORKERS, persistent_workers=True,
                        prefetch_factor=4)
    return lambda: one_pass(loader), lambda: next(iter(loader))


def dali_side(corpus):
    from lift_fast.data.dali import DaliDecoder, DecodeJob

    encoded, boxes, flips = corpus
    arrays = [np.frombuffer(data, dtype=np.uint8) for data in encoded]
    jobs = [DecodeJob(arrays[i:i + BATCH], boxes[i:i + BATCH], flips[i:i + BATCH], [str(k) for k in range(i, i + BATCH)])
            for i in range(0, IMAGES, BATCH)]
    decoder = DaliDecoder(SIZE, BATCH, device_id=None, num_threads=WORKERS, prefetch=2)
    return lambda: one_pass(decoder.run(jobs)), lambda: next(iter(decoder.run(jobs[:1])))


SIDES = {"baseline": pil_side, "dali_cpu": dali_side}


@pytest.mark.parametrize("side", list(SIDES))
def test_decode_crop_resize(paired_benchmark, side, corpus):
    from lift_fast.data.dali import dali_available

    usable, why = dali_available()
    if side == "dali_cpu" and not usable:
        pytest.skip(f"DALI is not usable: {why}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting; the DALI side's resize threads run with it too
    try:
        run_pass, first_batch = SIDES[side](corpus)
        # A speedup only counts if the answer is the same: the first batch against the PIL path's,
        # within the CPU path's tolerance (1 level inside, a few at the crop edges; docs/data.md).
        reference = PilSamples(*corpus)
        expected = torch.stack([reference[i] for i in range(BATCH)])
        difference = (first_batch() - expected).abs()
        assert difference.max() <= 8 * LEVEL and difference.mean() <= 0.1 * LEVEL, (
            float(difference.max() / LEVEL), float(difference.mean() / LEVEL))
        pair = f"decode+crop+resize {IMAGES} jpeg 500x375 -> {SIZE}px batch {BATCH}, {WORKERS} threads cpu"
        paired_benchmark(pair, run_pass, rounds=5, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ whole loaders

LOADER_IMAGES = 512


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    from image_shards import write_image_shards

    return write_image_shards(tmp_path_factory.mktemp("shards"), count=LOADER_IMAGES, width=WIDTH, height=HEIGHT,
                              dim=384)


@pytest.mark.parametrize("side", ["baseline", "dali_cpu", "pil_uint8"])
def test_build_loader(paired_benchmark, side, image_shards):
    """`build_loader(split="train")` end to end, images/s: the PIL backend with 2 worker processes
    against the DALI backend with 2 threads, over indexed shards of the same JPEGs (read by offset,
    joined with a 384-d store), the same samples, crops and flips; and against the PIL backend built
    as training builds it (raw=True: uint8 images and float16 rows shipped, normalised on the device
    by the step), where the baseline normalises in its workers and ships float32."""
    from lift_fast.data import build_loader
    from lift_fast.data.dali import dali_available

    usable, why = dali_available()
    if side == "dali_cpu" and not usable:
        pytest.skip(f"DALI is not usable: {why}")
    data, store = image_shards
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader = build_loader(data, store, split="train", batch_size=BATCH, image_size=SIZE,
                              backend="dali" if side == "dali_cpu" else "pil", num_workers=WORKERS,
                              raw=side == "pil_uint8")
        batches = iter(loader)
        steps = LOADER_IMAGES // BATCH

        def run_pass() -> int:
            return sum(len(next(batches)["keys"]) for _ in range(steps))

        pair = f"build_loader train {LOADER_IMAGES} jpeg 500x375 -> {SIZE}px batch {BATCH}, {WORKERS} workers cpu"
        paired_benchmark(pair, run_pass, rounds=5, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
