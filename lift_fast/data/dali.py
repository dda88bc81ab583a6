"""The DALI decode/augment engine: encoded images + crop boxes + flips -> [b, 3, S, S] batches (uint8 pixels,
or normalised by augment.normalize_images on the output device).

The sample stream decides everything random (which samples, each crop window and flip); this module
only carries it out, so the PIL path and this one see the same crops. For one sample it computes what
the PIL path computes:

    image.convert("RGB").resize((S, S), BICUBIC, box=(left, top, left + width, top + height))
    -> FLIP_LEFT_RIGHT if flip -> as [3, S, S] uint8 -> (a float dtype) /255, - CLIP_MEAN, / CLIP_STD

Two ways to do the crop + resize (`resample`):

  "dali"   (the default with a GPU): decoders.image (`mixed` on the GPU) decodes the whole image, and
           fn.resize (cubic, antialiased) reads the box as its region of interest in source pixels, so
           the filter sees the pixels around the box exactly as PIL's does; the flip is the region of
           interest reversed; the result is rounded to uint8 (as PIL's is) and transposed to CHW. All
           on the GPU.
  "torch"  (the default on the CPU): decoders.image_slice decodes only the box (ROI decoding), then
           torch's antialiased bicubic uint8 resize (a port of Pillow-SIMD's, AVX2) resizes each crop
           in the calling thread while DALI's threads decode the next batches; the flip is a torch op. DALI's CPU resampler is ~3x slower than Pillow's (bicubic,
           antialiased, 500x375 -> 224: ~5 ms against ~1.7 ms a sample on an EPYC core), which made a
           DALI-only CPU pipeline slower than the PIL loader; torch's is ~0.5 ms. It sees only the box,
           so the outermost output pixels differ slightly from PIL's, which filters across the box edge.

Decoding matches PIL bit for bit on the CPU (libjpeg-turbo both; grayscale, CMYK, RGBA, LA, palette
PNGs and WebP come out as convert("RGB") gives them); EXIF orientation is ignored, as PIL's
Image.open does. Not like PIL: 16-bit PNGs (PIL's convert clips them, DALI scales them) and GIF
(DALI cannot decode it: rejected up front). See docs/data.md for the measured differences.

Bad input never shifts the output order: batches come out in job order, and a sample that cannot be
decoded raises ImageDecodeError at its job's place in the order (every earlier job's batch has been
yielded), naming its key. The decoder stays usable: a new `run` rebuilds the DALI pipeline when DALI
left it broken.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lift_fast.data.augment import normalize_images

try:
    from nvidia.dali import Pipeline, fn, types
    from nvidia.dali.plugin.pytorch import feed_ndarray

    _DALI_IMPORT_ERROR: str | None = None
except Exception as error:  # noqa: BLE001 - ImportError, or a broken install (missing CUDA libraries)
    _DALI_IMPORT_ERROR = f"import nvidia.dali failed: {type(error).__name__}: {error}".splitlines()[0]

RESAMPLES = ("auto", "dali", "torch")
DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)  # uint8: pixels, not normalised

# Leading bytes of the formats DALI's decoders read. GIF is known only to be refused by name.
MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"GIF8", "GIF"),
)
UNSUPPORTED = {"GIF": "GIF is not decoded by DALI (convert the image to JPEG or PNG, or use data.backend=pil)"}


class ImageDecodeError(ValueError):
    """A sample of a job cannot be decoded (or its crop box does not fit its image).

    Attributes: key (the sample's key), index (its position in the job), job (the DecodeJob), and
    remaining: jobs already taken from the iterator after this one and not decoded, in order, so a
    caller that skips the bad sample can go on with `itertools.chain(error.remaining, jobs)`.
    """

    def __init__(self, message: str, *, key: str, index: int, job: DecodeJob, remaining: list[DecodeJob]):
        super().__init__(message)
        self.key, self.index, self.job, self.remaining = key, index, job, remaining

    def __reduce__(self):  # keyword-only fields: pickle (e.g. out of a worker process) through a helper
        return _rebuild_error, (str(self), self.key, self.index, self.job, self.remaining)


def _rebuild_error(message: str, key: str, index: int, job: DecodeJob, remaining: list[DecodeJob]) -> ImageDecodeError:
    return ImageDecodeError(message, key=key, index=index, job=job, remaining=remaining)


@dataclass
class DecodeJob:
    """One batch to decode: b encoded image files, each with its crop window and flip."""

    encoded: list[np.ndarray]  # b 1-D uint8 arrays: the encoded image files
    boxes: np.ndarray  # [b, 4] int: crop window (left, top, width, height) in source pixels
    flips: np.ndarray  # [b] bool: mirror horizontally after the crop
    keys: list[str]  # the samples' keys, for error messages

    def __len__(self) -> int:
        return len(self.keys)


def dali_available(device_id: int | None = None) -> tuple[bool, str]:
    """(usable, why not): DALI imports, and for device_id not None that CUDA device exists."""
    if _DALI_IMPORT_ERROR is not None:
        return False, _DALI_IMPORT_ERROR
    if device_id is None:
        return True, ""
    if not torch.cuda.is_available():
        return False, f"DALI device_id={device_id} needs a CUDA device, and torch sees none"
    if not 0 <= device_id < torch.cuda.device_count():
        return False, f"DALI device_id={device_id}: torch sees {torch.cuda.device_count()} CUDA device(s)"
    return True, ""


def sniff_format(data: np.ndarray | bytes) -> str | None:
    """The image format named by the file's leading bytes ("JPEG", "PNG", ...), or None if unknown."""
    head = bytes(memoryview(data)[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "PNM"
    return next((name for magic, name in MAGIC if head.startswith(magic)), None)


def pil_problem(data: np.ndarray | bytes, box: tuple[int, int, int, int]) -> str | None:
    """Why PIL cannot decode this image or crop `box` (left, top, width, height) from it; None if it can.

    Decodes the whole file (truncation shows only then). Used to find the bad sample of a batch DALI
    failed on; slow (a full PIL decode), so only on that path.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(memoryview(data)))) as image:
            image.load()
            width, height = image.size
    except Exception as error:  # noqa: BLE001 - any failure to decode is the answer
        return f"cannot be decoded ({type(error).__name__}: {error})"
    left, top, box_width, box_height = box
    if left + box_width > width or top + box_height > height:
        return f"crop box (left, top, width, height) {tuple(box)} does not fit the {width}x{height} image"
    return None


def check_job(job: DecodeJob, max_batch_size: int) -> DecodeJob:
    """Validate a job's structure and the cheap per-sample facts; return it with arrays normalised.

    Raises:
        ValueError: lengths or shapes disagree, more than `max_batch_size` samples, or a box with a
            negative origin or an empty side (naming the key).
        ImageDecodeError: a sample whose bytes are empty, of an unknown or unsupported format.
    """
    count = len(job.keys)
    boxes = np.asarray(job.boxes)
    flips = np.asarray(job.flips, dtype=bool)
    if not 1 <= count <= max_batch_size:
        raise ValueError(f"DecodeJob has {count} samples; DaliDecoder max_batch_size is {max_batch_size}"
                         + (f" (first key {job.keys[0]!r})" if count else ""))
    if len(job.encoded) != count or boxes.shape != (count, 4) or flips.shape != (count,):
        raise ValueError(f"DecodeJob of {count} keys (first {job.keys[0]!r}) has {len(job.encoded)} encoded "
                         f"images, boxes of shape {boxes.shape} and flips of shape {flips.shape}; expected "
                         f"{count}, ({count}, 4) and ({count},)")
    bad_box = np.flatnonzero((boxes[:, :2] < 0).any(axis=1) | (boxes[:, 2:] < 1).any(axis=1))
    if bad_box.size:
        index = int(bad_box[0])
        raise ValueError(f"sample {job.keys[index]!r}: crop box (left, top, width, height) {tuple(boxes[index])} "
                         "needs left, top >= 0 and width, height >= 1")
    encoded = []
    for index, data in enumerate(job.encoded):
        array = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
        if array.dtype != np.uint8 or array.ndim != 1:
            raise ValueError(f"sample {job.keys[index]!r}: encoded image must be a 1-D uint8 array, got "
                             f"{array.dtype} of shape {array.shape}")
        problem = None
        if array.size == 0:
            problem = "is empty (0 bytes)"
        else:
            kind = sniff_format(array)
            if kind is None:
                problem = f"is not an image file DALI can decode (leading bytes {bytes(array[:8])!r})"
            elif kind in UNSUPPORTED:
                problem = f"is a {kind}: {UNSUPPORTED[kind]}"
        if problem:
            raise ImageDecodeError(f"image of sample {job.keys[index]!r} {problem}", key=job.keys[index],
                                   index=index, job=job, remaining=[])
        encoded.append(array)
    return DecodeJob(encoded, boxes.astype(np.int64), flips, list(job.keys))


class _FeedSlot:
    """The pipeline's external source: calls the current run's _Feed (see DaliDecoder.__init__)."""

    def __init__(self):
        self.current: _Feed | None = None

    def __call__(self) -> tuple[list[np.ndarray], ...]:
        if self.current is None:
            raise StopIteration
        return self.current()


@dataclass
class _Feed:
    """The pipeline's external source for one `run`: takes jobs from the caller's iterator, checks them,
    and remembers the ones fed to DALI and not yet returned (`pending`, in order).

    A failing check or iterator ends the feed instead of raising inside DALI; `error` is raised after
    the batches of the jobs before it, so it comes out in order.
    """

    jobs: Iterator[DecodeJob]
    max_batch_size: int
    resample: str
    pending: deque = field(default_factory=deque)
    error: BaseException | None = None

    def __call__(self) -> tuple[list[np.ndarray], ...]:
        if self.error is not None:
            raise StopIteration
        try:
            job = check_job(next(self.jobs), self.max_batch_size)
        except StopIteration:
            raise
        except Exception as error:  # noqa: BLE001 - re-raised in order by DaliDecoder.run
            self.error = error
            raise StopIteration from None
        self.pending.append(job)
        return dali_inputs(job, self.resample)


def dali_inputs(job: DecodeJob, resample: str) -> tuple[list[np.ndarray], ...]:
    """The pipeline's inputs for one job: encoded files, then the crop as the graph for `resample` reads it."""
    boxes = job.boxes
    if resample == "torch":  # image_slice: anchor (x, y) and shape (w, h), absolute, "WH" order
        anchors = [np.array(box[:2], dtype=np.int32) for box in boxes]
        shapes = [np.array(box[2:], dtype=np.int32) for box in boxes]
        return job.encoded, anchors, shapes
    # resize's region of interest in (y, x) order; a reversed x range mirrors the output.
    starts, ends = [], []
    for (left, top, width, height), flip in zip(boxes, job.flips):
        x0, x1 = (left + width, left) if flip else (left, left + width)
        starts.append(np.array([top, x0], dtype=np.float32))
        ends.append(np.array([top + height, x1], dtype=np.float32))
    return job.encoded, starts, ends


class DaliDecoder:
    """Decode, crop, resize, flip and normalise batches of encoded images (JPEG/PNG/WebP/...) with DALI.

    image_size: S, the output side. max_batch_size: the most samples a job may hold.
    device_id: a CUDA device (decoding `mixed`, output on that device) or None (CPU operators, CPU output).
    num_threads: DALI's CPU threads. prefetch: DALI's prefetch queue depth (jobs decoded ahead).
    dtype: uint8 (the pixels, for the consumer to normalise) or float32, float16 or bfloat16 (normalised
    by augment.normalize_images, on the output device). seed: the pipeline seed (no random operator reads it:
    every crop and flip comes with the job). resample: "auto" ("dali" with a device, else "torch"),
    "dali" or "torch" (CPU only); see the module docstring.

    Raises:
        RuntimeError: DALI is not usable (dali_available says why).
        ValueError: a setting out of range, or resample="torch" with a device.
    """

    def __init__(self, image_size: int, max_batch_size: int, *, device_id: int | None, num_threads: int,
                 prefetch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0, resample: str = "auto"):
        usable, why = dali_available(device_id)
        if not usable:
            raise RuntimeError(f"DaliDecoder: DALI is not usable: {why}")
        for name, value in (("image_size", image_size), ("max_batch_size", max_batch_size),
                            ("num_threads", num_threads), ("prefetch", prefetch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DaliDecoder: {name} must be a positive int, got {value!r}")
        if dtype not in DTYPES:
            raise ValueError(f"DaliDecoder: dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype}")
        if resample not in RESAMPLES:
            raise ValueError(f"DaliDecoder: resample must be one of {', '.join(RESAMPLES)}, got {resample!r}")
        if resample == "auto":
            resample = "torch" if device_id is None else "dali"
        if resample == "torch" and device_id is not None:
            raise ValueError(f"DaliDecoder: resample='torch' is the CPU path; with device_id={device_id} use 'dali'")
        self.image_size, self.max_batch_size, self.device_id = image_size, max_batch_size, device_id
        self.num_threads, self.prefetch, self.dtype, self.seed = num_threads, prefetch, dtype, seed
        self.resample = resample
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.pipeline_builds = 0  # how many DALI pipelines were built: 1 unless a run failed or stopped early
        self._pipe = None
        self._in_flight = False  # the pipeline has batches scheduled that no one has taken
        # The pipeline's external source reads the current run's feed from this slot, not from the
        # decoder: a source bound to the decoder would make decoder <-> pipeline a reference cycle,
        # left for the garbage collector to shut down whenever it runs (in a forked child: a hang).
        self._feed = _FeedSlot()
        self._running = False
        self._pool: ThreadPoolExecutor | None = None  # the resize threads of the CPU path, made on first use

    def close(self) -> None:
        """Drop the DALI pipeline and stop the resize threads; a later `run` builds them again."""
        if self._running:
            raise RuntimeError("DaliDecoder.close: a run is still open; exhaust or close() its iterator first")
        self._drop_pipeline()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- running ---------------------------------------------------------------------------------

    def run(self, jobs: Iterator[DecodeJob] | list[DecodeJob]) -> Iterator[torch.Tensor]:
        """Decode `jobs` in order: one [b, 3, S, S] tensor (uint8, or normalised with CLIP's mean/std in a
        float `dtype`) per job, on the decoder's device; b is the job's size. DALI takes up to `prefetch` + 1 jobs ahead.

        Raises (while iterating):
            ImageDecodeError: a sample cannot be decoded, or its box does not fit its image; raised at
                its job's place in the order.
            ValueError: a malformed job (see check_job); any error of the jobs iterator, also in order.
            RuntimeError: another run of this decoder is still open.
        """
        if self._running:
            raise RuntimeError("DaliDecoder.run: the previous run of this decoder is still open; exhaust or "
                               "close() its iterator first (one run at a time)")
        return self._run(iter(jobs))

    def _run(self, jobs: Iterator[DecodeJob]) -> Iterator[torch.Tensor]:
        self._running = True
        try:
            yield from self._drive(_Feed(jobs, self.max_batch_size, self.resample), recover=True)
        finally:
            self._running, self._feed.current = False, None
            if self._in_flight:  # stopped early or failed: the next run builds a fresh pipeline
                self._drop_pipeline()

    def _drive(self, feed: _Feed, recover: bool) -> Iterator[torch.Tensor]:
        """Yield the batches of `feed`'s jobs; on a DALI failure, find the bad sample (`recover`) or re-raise."""
        self._feed.current = feed
        pipe = self._pipeline()
        self._in_flight = True
        pipe.schedule_run()  # the first call fills the prefetch queue (DALI reports errors in outputs())
        while True:
            try:
                outputs = pipe.outputs()
                pipe.schedule_run()  # DALI decodes ahead while this batch is converted
            except StopIteration:
                break
            except Exception as error:  # DALI's errors have no common type
                if not recover:
                    raise
                yield from self._recover(feed, error)
                return
            yield self._to_torch(outputs, feed.pending.popleft(), feed)
        pipe.reset()  # the feed ended: ready for the next one
        self._in_flight = False
        if feed.error is not None:
            raise feed.error

    def _recover(self, feed: _Feed, error: BaseException) -> Iterator[torch.Tensor]:
        """After DALI failed on one of the pending jobs: yield the batches of the jobs before the bad one,
        then raise ImageDecodeError for it; go on with the feed if no sample is found bad."""
        self._drop_pipeline()  # DALI calls a pipeline that raised "no longer valid"
        pending = list(feed.pending)
        feed.pending.clear()
        for position, job in enumerate(pending):
            problems = [(index, pil_problem(data, tuple(box)))
                        for index, (data, box) in enumerate(zip(job.encoded, job.boxes))]
            bad = next(((index, problem) for index, problem in problems if problem), None)
            if bad is None:
                yield self._decode_alone(job, pending[position + 1:], error)
                continue
            index, problem = bad
            raise ImageDecodeError(f"image of sample {job.keys[index]!r} {problem}", key=job.keys[index],
                                   index=index, job=job, remaining=pending[position + 1:])
        yield from self._drive(feed, recover=True)  # DALI's failure did not reproduce: carry on

    def _decode_alone(self, job: DecodeJob, remaining: list[DecodeJob], error: BaseException) -> torch.Tensor:
        """Decode one job PIL found no fault in on a fresh pipeline; if DALI fails again, one sample at a
        time to name the sample DALI cannot decode."""
        try:
            (batch,) = self._drive(_Feed(iter([job]), self.max_batch_size, self.resample), recover=False)
            return batch
        except Exception:  # noqa: BLE001
            self._drop_pipeline()
        for index in range(len(job)):
            single = DecodeJob(job.encoded[index:index + 1], job.boxes[index:index + 1], job.flips[index:index + 1],
                               job.keys[index:index + 1])
            try:
                list(self._drive(_Feed(iter([single]), self.max_batch_size, self.resample), recover=False))
            except Exception as sample_error:
                self._drop_pipeline()
                reason = str(sample_error).strip().splitlines()
                raise ImageDecodeError(
                    f"image of sample {job.keys[index]!r} cannot be decoded by DALI (PIL can): "
                    f"{next((line for line in reason if 'rror' in line), reason[0] if reason else '')}",
                    key=job.keys[index], index=index, job=job, remaining=remaining) from sample_error
        raise RuntimeError(f"DALI failed on the batch of keys {job.keys[0]!r}..{job.keys[-1]!r} but on none of "
                           f"its samples alone: {str(error).strip()[:500]}") from error

    # -- the DALI graph and its outputs ----------------------------------------------------------

    def _drop_pipeline(self) -> None:
        """Shut the current pipeline down now (its threads stop here, not whenever the garbage collector
        finds it: a traceback holding a failed run's frames keeps the object alive) and forget it."""
        pipe, self._pipe, self._in_flight = self._pipe, None, False
        if pipe is not None:
            pipe._shutdown()  # DALI 2.x has no public close(); __del__ calls this, and it is idempotent

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = self._build()
            self.pipeline_builds += 1
        return self._pipe

    def _build(self):
        size = self.image_size
        pipe = Pipeline(batch_size=self.max_batch_size, num_threads=self.num_threads, device_id=self.device_id,
                        seed=self.seed, prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        with pipe:
            # The source is bound once; it reads whichever run's feed is current.
            encoded, first, second = fn.external_source(source=self._feed, num_outputs=3, batch=True,
                                                        dtype=[types.UINT8, None, None])
            if self.resample == "torch":
                crops = fn.decoders.image_slice(encoded, first, second, device="cpu", output_type=types.RGB,
                                                adjust_orientation=False)
                pipe.set_outputs(crops)
            else:
                images = fn.decoders.image(encoded, device="cpu" if self.device_id is None else "mixed",
                                           output_type=types.RGB, adjust_orientation=False)
                # uint8 out of the resize: rounded as PIL rounds, and a quarter of float32's bytes
                images = fn.resize(images, size=[size, size], roi_start=first, roi_end=second,
                                   interp_type=types.INTERP_CUBIC, antialias=True, dtype=types.UINT8)
                images = fn.transpose(images, perm=[2, 0, 1], output_layout="CHW")
                pipe.set_outputs(images, fn.peek_image_shape(encoded, adjust_orientation=False))
        pipe.build()
        return pipe

    def _to_torch(self, outputs, job: DecodeJob, feed: _Feed) -> torch.Tensor:
        if self.resample == "torch":
            return self._resize_on_cpu(outputs[0], job)
        images, shapes = outputs
        heights_widths = np.array(shapes.as_tensor())[:, :2]  # [b, 2] (H, W)
        too_big = (job.boxes[:, 0] + job.boxes[:, 2] > heights_widths[:, 1]) | (
            job.boxes[:, 1] + job.boxes[:, 3] > heights_widths[:, 0])
        if too_big.any():
            index = int(np.flatnonzero(too_big)[0])
            height, width = heights_widths[index]
            raise ImageDecodeError(f"image of sample {job.keys[index]!r}: crop box (left, top, width, height) "
                                   f"{tuple(job.boxes[index].tolist())} does not fit the {width}x{height} image",
                                   key=job.keys[index], index=index, job=job, remaining=list(feed.pending))
        dense = images.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        # On torch's current stream, where `out` was allocated and will be read (as DALIGenericIterator does).
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        return self._finish(out)

    def _finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """[b, 3, S, S] uint8 -> the output in `dtype` (normalised unless uint8)."""
        return pixels if self.dtype == torch.uint8 else normalize_images(pixels, self.dtype)

    def _resize_on_cpu(self, crops, job: DecodeJob) -> torch.Tensor:
        """Crops (HWC uint8, one per sample) -> [b, 3, S, S] `dtype`: torch's antialiased bicubic uint8
        resize (rounded to uint8, as PIL's is), the flip, then (a float dtype) CLIP's normalisation. The
        samples are split among `num_threads` threads (torch releases the GIL), which share the cores
        with DALI's."""
        out = torch.empty((len(job), 3, self.image_size, self.image_size), dtype=torch.uint8)
        chunks = np.array_split(np.arange(len(job)), min(self.num_threads, len(job)))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, "dali-resize")
        list(self._pool.map(lambda chunk: self._resize_samples(crops, job, chunk, out), chunks))
        return self._finish(out)

    def _resize_samples(self, crops, job: DecodeJob, indexes: np.ndarray, out: torch.Tensor) -> None:
        size = self.image_size
        # Inference mode is per thread: `out` made under the caller's (eval's) can only be written under it here.
        with torch.inference_mode(out.is_inference()):
            self._resize_into(crops, job, indexes, out, size)

    def _resize_into(self, crops, job: DecodeJob, indexes: np.ndarray, out: torch.Tensor, size: int) -> None:
        for index in indexes.tolist():
            crop = torch.from_dlpack(crops[index]).permute(2, 0, 1).unsqueeze(0)  # [1, 3, h, w], no copy
            image = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
            out[index] = image.flip(-1) if job.flips[index] else image  # [3, S, S] uint8
