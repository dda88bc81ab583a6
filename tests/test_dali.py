"""lift_fast.data.dali: DaliDecoder's pixels against the PIL path, batch order, and bad input.

The reference is the PIL loader's arithmetic on the same box: convert("RGB"), resize(BICUBIC, box),
FLIP_LEFT_RIGHT, loader.to_tensor. Tolerances are in uint8 levels (1 level is 0.0146 in normalised
units at the smallest CLIP std), set from what DALI 2.4 / torch 2.13 give on these images (the
figures are in docs/data.md). Away from the edges (outside the band of output pixels whose filter
window crosses the box edge) both paths are within 1 level of PIL. In the edge band:
  resample="dali"   (DALI's cubic resize, what the GPU runs) filters across the box edge as PIL does,
                    but extends the image's own border where PIL renormalises a clipped filter: up to
                    3 levels where the box touches the image border. Its mean difference is PIL's
                    rounding to uint8, which DALI's float output does not do.
  resample="torch"  (the CPU path) resizes the decoded crop alone, so its edge band differs up to 5
                    levels for boxes at least half the output size, and more for tiny boxes blown up
                    (a 3x2 box at 48 px: 13 levels).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lift_fast.data.dali import (
    DaliDecoder,
    DecodeJob,
    ImageDecodeError,
    dali_available,
    sniff_format,
)
from lift_fast.data.loader import to_tensor

usable, why = dali_available()
if not usable:
    pytest.skip(f"DALI is not usable here: {why}", allow_module_level=True)

LEVEL = 1 / 255 / 0.26130258  # one uint8 level in normalised units, at the smallest CLIP std
SIZE = 48


def tolerance(resample: str, box) -> tuple[float, float, float]:
    """(max in the edge band, max inside it, mean) in normalised units for one sample; see the docstring."""
    if resample == "dali":
        return 3.5 * LEVEL, 1.1 * LEVEL, 0.45 * LEVEL
    large = min(box[2:]) >= SIZE / 2
    return (6 if large else 16) * LEVEL, 1.01 * LEVEL, (0.4 if large else 2) * LEVEL


def photo(seed: int, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: smooth colour fields, a fine texture and noise (not flat, so that JPEG
    and the resize filters both have detail to get wrong)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    fields = [128 + 80 * np.sin(x / rng.uniform(5, 15) + y / rng.uniform(5, 15) + p) for p in phase]
    image = np.stack(fields, axis=-1) + 20 * np.sin(x / 1.7)[..., None] * np.cos(y / 2.3)[..., None]
    image += rng.normal(0, 8, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}) | options)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def pil_reference(data: np.ndarray, box, flip: bool, size: int) -> torch.Tensor:
    """The PIL loader's result for one sample: [3, size, size] float32."""
    left, top, width, height = (int(v) for v in box)
    image = Image.open(io.BytesIO(data.tobytes())).convert("RGB")
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + width, top + height))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)


def reference_batch(job: DecodeJob) -> torch.Tensor:
    return torch.stack([pil_reference(data, box, flip, SIZE) for data, box, flip in zip(job.encoded, job.boxes, job.flips)])


def edge_band(box_side: int, size: int) -> int:
    """Output pixels next to the edge whose filter window crosses the box edge in PIL's resize."""
    scale = box_side / size
    return math.ceil(2 * max(scale, 1.0) / scale) + 1


def random_job(rng: np.random.Generator, count: int, tag: str, sizes=((61, 45), (120, 90), (97, 131))) -> DecodeJob:
    """`count` photos of the given sizes with torchvision-like crop boxes (area 0.5..1, aspect 3/4..4/3)."""
    encoded, boxes, keys = [], [], []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        encoded.append(encode(photo(int(rng.integers(1 << 30)), width, height)))
        while True:
            area = width * height * rng.uniform(0.5, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            box_w, box_h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if box_w <= width and box_h <= height:
                break
        boxes.append((int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1)), box_w, box_h))
        keys.append(f"{tag}-{index:03d}")
    return DecodeJob(encoded, np.array(boxes), rng.random(count) < 0.5, keys)


@pytest.fixture(scope="module")
def decoders() -> dict[str, DaliDecoder]:
    return {resample: DaliDecoder(SIZE, 8, device_id=None, num_threads=2, resample=resample)
            for resample in ("dali", "torch")}


def assert_close_to_pil(batch: torch.Tensor, job: DecodeJob, resample: str) -> None:
    """Check every sample of `batch` against the PIL path within tolerance(resample, box)."""
    reference = reference_batch(job)
    assert batch.shape == reference.shape and batch.dtype == torch.float32
    for index, box in enumerate(job.boxes):
        difference = (batch[index] - reference[index]).abs()  # [3, S, S]
        band = edge_band(min(box[2:]), SIZE)
        inner = difference[:, band:SIZE - band, band:SIZE - band]
        edge_max, inner_max, mean = tolerance(resample, box)
        where = (job.keys[index], tuple(box.tolist()), resample)
        assert difference.max() <= edge_max, (*where, "max", float(difference.max() / LEVEL))
        assert inner.numel() == 0 or inner.max() <= inner_max, (*where, "inner max", float(inner.max() / LEVEL))
        assert difference.mean() <= mean, (*where, "mean", float(difference.mean() / LEVEL))


@pytest.mark.parametrize("resample", ["dali", "torch"])
def test_pixels_match_pil_for_fixed_boxes(decoders, resample):
    sizes = [(61, 45), (48, 48), (200, 150), (33, 97)]
    encoded = [encode(photo(seed, w, h)) for seed, (w, h) in enumerate(sizes)]
    cases = [  # (image, box, flip): whole images, odd boxes, edge-touching boxes, up- and downscaling
        (0, (0, 0, 61, 45), False), (0, (0, 0, 61, 45), True), (0, (7, 3, 37, 29), True),
        (1, (0, 0, 48, 48), False), (1, (1, 2, 45, 41), False), (2, (0, 0, 200, 150), True),
        (2, (13, 9, 171, 133), False), (2, (29, 0, 171, 150), True), (3, (0, 0, 33, 97), False),
        (3, (5, 40, 27, 57), True), (2, (150, 100, 50, 50), False), (0, (60, 44, 1, 1), False),
        (0, (58, 40, 3, 2), True), (2, (0, 145, 5, 5), False),
    ]
    job = DecodeJob([encoded[image] for image, _, _ in cases], np.array([box for _, box, _ in cases]),
                    np.array([flip for _, _, flip in cases]), [f"case-{i}" for i in range(len(cases))])
    halves = [DecodeJob(job.encoded[s], job.boxes[s], job.flips[s], job.keys[s]) for s in (slice(0, 7), slice(7, None))]
    for batch, half in zip(decoders[resample].run(halves), halves, strict=True):
        assert_close_to_pil(batch, half, resample)


@pytest.mark.parametrize("resample", ["dali", "torch"])
def test_variable_batch_sizes_come_out_in_job_order(decoders, resample):
    rng = np.random.default_rng(1)
    jobs = [random_job(rng, count, f"job{n}") for n, count in enumerate([3, 1, 8, 5, 2])]
    batches = list(decoders[resample].run(iter(jobs)))
    assert [len(batch) for batch in batches] == [3, 1, 8, 5, 2]
    for batch, job in zip(batches, jobs):
        assert_close_to_pil(batch, job, resample)


@pytest.mark.parametrize("resample", ["dali", "torch"])
def test_formats_come_out_as_pil_convert_rgb(decoders, resample):
    """Greyscale and CMYK JPEG, RGBA / palette / LA PNG and WebP, at the output size with the whole-image
    box: no resampling, so the decoded pixels must equal PIL's convert("RGB") exactly."""
    base = photo(7, SIZE, SIZE)
    rgba = np.asarray(base.convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :]  # alpha is dropped, not blended
    files = {
        "grey.jpg": encode(base.convert("L")),
        "cmyk.jpg": encode(base.convert("CMYK")),
        "rgba.png": encode(Image.fromarray(rgba), "PNG"),
        "palette.png": encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "la.png": encode(base.convert("LA"), "PNG"),
        "lossy.webp": encode(base, "WEBP", quality=90),
        "rgba.webp": encode(Image.fromarray(rgba), "WEBP", lossless=True),
    }
    job = DecodeJob(list(files.values()), np.array([(0, 0, SIZE, SIZE)] * len(files)), np.zeros(len(files), bool),
                    list(files))
    (batch,) = decoders[resample].run([job])
    torch.testing.assert_close(batch, reference_batch(job), rtol=0, atol=1e-5)


def test_half_precision_outputs():
    rng = np.random.default_rng(2)
    job = random_job(rng, 3, "half")
    full = next(DaliDecoder(SIZE, 4, device_id=None, num_threads=1, resample="dali").run([job]))
    for dtype in (torch.float16, torch.bfloat16):
        for resample in ("dali", "torch"):
            (batch,) = DaliDecoder(SIZE, 4, device_id=None, num_threads=1, dtype=dtype, resample=resample).run([job])
            assert batch.dtype == dtype and batch.shape == (3, 3, SIZE, SIZE)
            allowed = tolerance(resample, (0, 0, SIZE, SIZE))[0] + 3 * float(torch.finfo(dtype).eps)
            assert (batch.float() - full).abs().max() <= allowed


def corrupt(kind: str) -> np.ndarray:
    if kind == "truncated jpeg":
        data = encode(photo(3, 64, 48))
        return data[: len(data) // 2]
    if kind == "empty":
        return np.zeros(0, dtype=np.uint8)
    if kind == "text file":
        return np.frombuffer(b"this is a caption, not an image\n", dtype=np.uint8)
    if kind == "gif":
        return encode(photo(3, 16, 16), "GIF")
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated jpeg", "empty", "text file", "gif"])
@pytest.mark.parametrize("resample", ["dali", "torch"])
def test_bad_image_raises_in_order_naming_the_key_and_the_decoder_goes_on(decoders, resample, kind):
    rng = np.random.default_rng(3)
    jobs = [random_job(rng, count, f"j{n}") for n, count in enumerate([4, 3, 5, 2])]
    bad_job = jobs[2]
    bad_job.encoded[3] = corrupt(kind)
    decoder = decoders[resample]
    batches = []
    with pytest.raises(ImageDecodeError) as caught:
        batches.extend(decoder.run(jobs))  # keeps what came out before the error
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.key, error.index, error.job.keys) == ("j2-003", 3, bad_job.keys)
    assert "'j2-003'" in str(error)
    assert [len(batch) for batch in batches] == [4, 3]  # the jobs before it, nothing shifted
    for batch, job in zip(batches, jobs):
        assert_close_to_pil(batch, job, resample)
    taken_ahead = [job.keys for job in error.remaining]  # taken from the iterator, not decoded
    assert taken_ahead == [job.keys for job in jobs[3:3 + len(taken_ahead)]]
    if kind == "gif":
        assert "GIF" in str(error)
    # the same decoder decodes the following jobs, and a good batch after a bad one
    after = [jobs[3], random_job(rng, 6, "after")]
    for batch, job in zip(decoder.run(after), after, strict=True):
        assert_close_to_pil(batch, job, resample)


@pytest.mark.parametrize("resample", ["dali", "torch"])
def test_box_outside_the_image_is_an_error_naming_the_key(decoders, resample):
    rng = np.random.default_rng(4)
    job = random_job(rng, 3, "box", sizes=((61, 45),))
    job.boxes[1] = (30, 10, 32, 20)  # reaches x = 62 in a 61-px-wide image
    with pytest.raises(ImageDecodeError, match=r"'box-001'.*does not fit the 61x45 image") as caught:
        list(decoders[resample].run([job]))
    assert caught.value.index == 1
    good = random_job(rng, 2, "good")
    (batch,) = decoders[resample].run([good])
    assert_close_to_pil(batch, good, resample)


def test_malformed_jobs_are_value_errors_naming_key_or_setting(decoders):
    rng = np.random.default_rng(5)
    job = random_job(rng, 3, "bad")
    cases = {
        r"3 encoded images, boxes of shape \(2, 4\)": DecodeJob(job.encoded, job.boxes[:2], job.flips, job.keys),
        r"'bad-001'.*left, top >= 0 and width, height >= 1": DecodeJob(
            job.encoded, np.array([[0, 0, 4, 4], [0, 0, 0, 5], [1, 1, 2, 2]]), job.flips, job.keys),
        r"9 samples; DaliDecoder max_batch_size is 8": random_job(rng, 9, "big"),
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            list(decoders["torch"].run([bad]))


def test_jobs_iterator_errors_come_out_in_order(decoders):
    rng = np.random.default_rng(6)
    first = random_job(rng, 2, "first")

    def jobs():
        yield first
        raise KeyError("shard 00003.tar: no such key")

    batches = []
    with pytest.raises(KeyError, match="00003.tar"):
        batches.extend(decoders["dali"].run(jobs()))
    assert len(batches) == 1


def test_closing_a_run_early_leaves_the_decoder_usable():
    rng = np.random.default_rng(7)
    jobs = [random_job(rng, 4, f"e{n}") for n in range(5)]
    decoder = DaliDecoder(SIZE, 4, device_id=None, num_threads=2, prefetch=2)
    run = decoder.run(jobs)
    next(run)
    with pytest.raises(RuntimeError, match="still open"):
        decoder.run(jobs)
    run.close()
    batches = list(decoder.run(jobs[3:]))
    assert len(batches) == 2 and decoder.pipeline_builds == 2
    assert_close_to_pil(batches[1], jobs[4], decoder.resample)
    assert list(decoder.run([])) == [] and decoder.pipeline_builds == 2  # a clean run reuses the pipeline
    decoder.close()
    (batch,) = decoder.run(jobs[:1])
    assert decoder.pipeline_builds == 3
    assert_close_to_pil(batch, jobs[0], decoder.resample)


def test_decode_error_pickles():
    import pickle

    rng = np.random.default_rng(9)
    job = random_job(rng, 2, "p")
    error = pickle.loads(pickle.dumps(ImageDecodeError("image of sample 'p-001' is empty", key="p-001", index=1,
                                                       job=job, remaining=[])))
    assert (str(error), error.key, error.index, error.job.keys) == ("image of sample 'p-001' is empty", "p-001", 1,
                                                                     job.keys)


def test_settings_and_availability():
    assert dali_available() == (True, "")
    if not torch.cuda.is_available():
        ok, reason = dali_available(0)
        assert not ok and "CUDA" in reason
        with pytest.raises(RuntimeError, match="DALI is not usable"):
            DaliDecoder(SIZE, 4, device_id=0, num_threads=1)
    for kwargs, message in (({"num_threads": 0}, "num_threads"), ({"resample": "pil"}, "resample"),
                            ({"dtype": torch.int8}, "dtype")):
        with pytest.raises(ValueError, match=message):
            DaliDecoder(SIZE, 4, device_id=None, **{"num_threads": 1, **kwargs})
    assert DaliDecoder(SIZE, 4, device_id=None, num_threads=1).resample == "torch"


def test_sniff_format():
    assert sniff_format(encode(photo(0, 8, 8))) == "JPEG"
    assert sniff_format(encode(photo(0, 8, 8), "PNG")) == "PNG"
    assert sniff_format(encode(photo(0, 8, 8), "WEBP")) == "WebP"
    assert sniff_format(b"P6\n8 8\n255\n") == "PNM"
    assert sniff_format(b"<html>") is None


def test_a_sample_only_dali_rejects_is_found_by_decoding_alone(decoders, monkeypatch):
    """When PIL finds nothing wrong (here: made blind), the batch is decoded again on a fresh pipeline,
    then sample by sample, to name the sample DALI fails on; the batches before it still come out."""
    import lift_fast.data.dali as dali_module

    monkeypatch.setattr(dali_module, "pil_problem", lambda data, box: None)
    rng = np.random.default_rng(8)
    jobs = [random_job(rng, 3, f"d{n}") for n in range(3)]
    jobs[1].encoded[2] = corrupt("truncated jpeg")
    decoder = decoders["dali"]
    batches = []
    with pytest.raises(ImageDecodeError, match=r"'d1-002' cannot be decoded by DALI \(PIL can\)") as caught:
        batches.extend(decoder.run(jobs))  # keeps what came out before the error
    assert caught.value.index == 2 and len(batches) == 1
    assert_close_to_pil(batches[0], jobs[0], "dali")
    (batch,) = decoder.run(jobs[2:])
    assert_close_to_pil(batch, jobs[2], "dali")


def test_cpu_path_under_inference_mode():
    """Eval iterates under torch.inference_mode, which the resize threads do not inherit."""
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    job = DecodeJob(encoded=[np.frombuffer(buffer.getvalue(), np.uint8)] * 3, boxes=np.array([[0, 0, 50, 40]] * 3),
                    flips=np.array([False, True, False]), keys=["a", "b", "c"])
    decoder = DaliDecoder(16, 4, device_id=None, num_threads=2)
    with torch.inference_mode():
        (batch,) = list(decoder.run([job]))
    assert batch.shape == (3, 3, 16, 16) and torch.equal(batch[0], batch[2])
