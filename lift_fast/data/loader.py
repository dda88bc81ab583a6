"""Batches of images joined with their caption embeddings by key: `build_loader`.

Every batch is a dict:
    images           [B, 3, H, W] float32, normalised with OpenAI CLIP's mean/std (augment.normalize_images);
                     with raw=True uint8 pixels, for the consumer to normalise where it runs (training: on the GPU)
    text_embeddings  [B, D] float32, the store rows of exactly these samples; with raw=True in the store's
                     dtype (float16 by default)
    keys             list[str], the samples' keys in batch order
    tokens           [B, context] int64, the captions' token ids (only with a tokenizer: the CLIP baseline)
    skipped          int, samples that could not be used (on_error="skip") since the previous batch
    step             int, the training step the batch is for (train split)

Which samples form a batch is decided by the SampleStream (lift_fast/data/stream.py): a pure
function of seed and step, shared by every backend, so the loader position in a checkpoint is the
step and a resumed run continues the exact stream. The PIL backend decodes in worker processes,
each producing whole batches for every num_workers-th step; the DALI backend
(lift_fast/data/dali_batches.py) decodes the same samples with the same crop windows.

A bad sample (corrupt image, no image, no store row, a caption other than the one its row was made
from) is a ShardError naming shard and key, or with on_error="skip" a counted skip: in training a
stand-in sample from a later step of the same epoch takes its place (the batch stays full and the
stream deterministic); in eval the batch is one shorter.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lift_fast.config import ConfigError
from lift_fast.data.augment import (  # noqa: F401 (re-exported: the preparation the loaders share)
    CLIP_MEAN,
    CLIP_STD,
    Box,
    center_box,
    crop_resize,
    image_size,
    normalize_images,
    open_image,
    sample_uniforms,
    to_tensor,
    to_uint8,
    train_view,
)
from lift_fast.data.captions import caption_choice
from lift_fast.data.index import sample_count
from lift_fast.data.reader import RawSample, SampleReader
from lift_fast.data.shards import ShardError, list_shards
from lift_fast.data.stream import SampleRef, SampleStream
from lift_fast.store import open_store

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 16  # stand-ins tried for one bad training sample before giving up
# Signals a cluster sends every process of a job (SLURM: SIGTERM at preemption or the time limit, SIGUSR1
# ahead of it): a PIL loader's fork server must survive them (start_fork_server).
JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
T = TypeVar("T")


class ImageTextBatches(IterableDataset):
    """The PIL backend: whole batches, each worker taking every num_workers-th of this rank's batches."""

    def __init__(self, reader: SampleReader, stream: SampleStream, *, split: str, image_size: int, dim: int,
                 crop_scale: tuple[float, float], hflip: bool, rank: int, world_size: int, start_step: int,
                 on_error: str, tokenizer: Callable[[list[str]], torch.Tensor] | None = None, raw: bool = False):
        super().__init__()
        self.tokenizer = tokenizer  # CLIP mode: captions -> token ids, in the worker that reads them
        self.raw = raw  # uint8 images and store-dtype rows (build_loader's raw)
        self.reader, self.stream, self.split = reader, stream, split
        self.image_size, self.dim, self.crop_scale, self.hflip = image_size, dim, crop_scale, hflip
        self.rank, self.world_size, self.start_step, self.on_error = rank, world_size, start_step, on_error

    def __getstate__(self) -> dict:
        # Workers started by forkserver or spawn get a pickled copy: the stream's per-instance lru_caches
        # do not pickle, so it travels as its settings and is rebuilt (its caches empty) in the worker.
        return {**self.__dict__, "stream": (self.stream.counts, self.stream.settings())}

    def __setstate__(self, state: dict) -> None:
        counts, settings = state.pop("stream")
        self.__dict__.update(state, stream=SampleStream(counts, **settings))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.split == "eval":
            for refs in self.stream.in_order(self.rank, self.world_size)[worker::workers]:
                yield self.eval_batch(refs)
            return
        step = self.start_step + worker
        while True:
            yield self.train_batch(step)
            step += workers

    def prepare(self, ref: SampleRef, train: bool, draws: np.ndarray | None = None,
                header_only: bool = False) -> tuple[RawSample, Image.Image | None, Box, bool]:
        """Read one sample and find its view: (raw sample, the image opened lazily by PIL or None
        with header_only, crop box, flip). draws: its row of sample_uniforms, when the caller has
        them for the whole batch. Raises ShardError for a bad sample."""
        raw = self.reader.read(ref)
        where = f"{raw.where}: its image"
        image, size = None, image_size(raw.image) if header_only else None
        if size is None:
            image = open_image(raw.image, where)
            size = image.size
        if not train:
            return raw, image, center_box(*size), False
        if draws is None:
            draws = sample_uniforms(self.stream.seed, ref.epoch, np.array([ref.position]))[0]
        return (raw, image, *train_view(*size, self.crop_scale, self.hflip, draws))

    def example(self, ref: SampleRef, train: bool, draws: np.ndarray | None = None
                ) -> tuple[torch.Tensor, np.ndarray, str, str]:
        """(image [3, S, S] uint8, embedding [D] in the store's dtype, key, caption) of one sample; raises
        ShardError for a bad one."""
        raw, image, box, flip = self.prepare(ref, train, draws)
        image = to_uint8(crop_resize(image, box, self.image_size, flip, f"{raw.where}: its image"))
        return image, raw.embedding, raw.key, raw.caption

    def batch_draws(self, refs: list[SampleRef]) -> np.ndarray:
        """[len(refs), DRAWS]: the augmentation draws of a training batch's samples (one epoch)."""
        epoch = refs[0].epoch if refs else 0
        return sample_uniforms(self.stream.seed, epoch, np.array([ref.position for ref in refs]))

    def skippable(self, make: Callable[[SampleRef], T], ref: SampleRef) -> T | None:
        """make(ref); None when it raises ShardError and on_error="skip" (the skip is logged)."""
        try:
            return make(ref)
        except ShardError as err:
            if self.on_error != "skip":
                raise
            log.warning("skipping: %s", err)
            return None

    def with_stand_ins(self, ref: SampleRef, make: Callable[[SampleRef], T], step: int,
                       first_attempt: int = 0) -> tuple[T, int, int]:
        """make(ref), or with on_error="skip" make() of its stand-ins (stream.replacement) until one
        works: (result, the attempt that worked, samples skipped). Raises ShardError."""
        skipped = 0
        for attempt in range(first_attempt, MAX_REPLACEMENTS + 1):
            result = self.skippable(make, ref if not attempt else self.stream.replacement(ref, attempt))
            if result is not None:
                return result, attempt, skipped
            skipped += 1
        raise ShardError(f"step {step}: sample {self.reader.key(ref)!r} of {self.reader.shards[ref.shard]} and "
                         f"{MAX_REPLACEMENTS} stand-ins for it could not be used; is most of the data bad?")

    def train_batch(self, step: int) -> dict:
        examples, skipped = [], 0
        refs = self.stream.batch(step, self.rank, self.world_size)
        for ref, draws in zip(refs, self.batch_draws(refs)):
            example, _, bad = self.with_stand_ins(
                ref, lambda r, ref=ref, draws=draws: self.example(r, True, draws if r is ref else None), step)
            examples.append(example)
            skipped += bad
        return {**self.collate(examples), "skipped": skipped, "step": step}

    def eval_batch(self, refs: list[SampleRef]) -> dict:
        examples = [self.skippable(lambda r: self.example(r, False), ref) for ref in refs]
        kept = [example for example in examples if example is not None]
        return {**self.collate(kept), "skipped": len(examples) - len(kept)}

    def collate(self, examples: list[tuple[torch.Tensor, np.ndarray, str, str]]) -> dict:
        images = torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        if examples:
            images = torch.stack([e[0] for e in examples])
        batch = {"images": images, "text_embeddings": self.rows([e[1] for e in examples]),
                 "keys": [e[2] for e in examples]}
        return self.with_tokens(self.finish(batch), [e[3] for e in examples])

    def rows(self, rows: list[np.ndarray]) -> torch.Tensor:
        """The batch's store rows [b, D]: in the store's dtype with raw, else float32."""
        # an int8 store's rows are float32 when read (scaled back)
        dtype = self.reader.store.dtype if self.raw and self.reader.store.dtype != np.int8 else np.float32
        stacked = np.stack(rows) if rows else np.empty((0, self.dim), dtype=dtype)
        return torch.from_numpy(stacked.astype(dtype, copy=False))

    def finish(self, batch: dict, dtype: torch.dtype = torch.float32) -> dict:
        """batch with its uint8 images normalised (in `dtype`, on their device) unless raw."""
        if not self.raw:
            batch["images"] = normalize_images(batch["images"], dtype)
        return batch

    def with_tokens(self, batch: dict, captions: list[str]) -> dict:
        """batch with "tokens" [B, context] (int64) of `captions` added when the loader has a tokenizer."""
        if self.tokenizer is not None:
            batch["tokens"] = self.tokenizer(captions)
        return batch


class Loader:
    """What build_loader returns: iterate it for batches; `shards`, `stream` and `state(step)` describe it.

    len(): this rank's batches in one eval pass, or the steps of one training epoch.
    """

    def __init__(self, batches: ImageTextBatches, data: Iterable[dict], *, split: str, shards: list[Path],
                 stream: SampleStream, rank: int, world_size: int):
        self.dataset, self.data, self.split = batches, data, split
        self.shards, self.stream, self.rank, self.world_size = shards, stream, rank, world_size

    def __len__(self) -> int:
        if self.split == "eval":
            return len(self.stream.in_order(self.rank, self.world_size))
        return self.stream.steps_per_epoch

    def state(self, step: int) -> dict:
        """The loader position after `step` training steps, to save in a checkpoint."""
        return self.stream.state(step)

    def __iter__(self) -> Iterator[dict]:
        if self.split == "train":
            yield from self.data
            return
        # A batch emptied by skips is not yielded: its count goes into the batch after it, or the last one.
        held, pending = None, 0
        for batch in self.data:
            if not batch["keys"]:
                pending += batch["skipped"]
                continue
            if held is not None:
                yield held
            held = {**batch, "skipped": batch["skipped"] + pending}
            pending = 0
        if held is None:
            if pending:
                raise ShardError(f"no usable samples: all {pending} samples of the {len(self.shards)} shard(s) in "
                                 f"{self.shards[0].parent} were skipped")
            return
        held["skipped"] += pending
        yield held


def build_loader(data_dir: str | Path, embeddings_dir: str | Path, *, split: str, batch_size: int, image_size: int,
                 backend: str = "auto", seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int | str = 1,
                 crop_scale: tuple[float, float] = (0.9, 1.0), hflip: bool = False, shuffle_window: int = 32,
                 start_step: int = 0, on_error: str = "error", pin_memory: bool = False,
                 worker_init_fn: Callable[[int], None] | None = None, dtype: torch.dtype = torch.float32,
                 prefetch: int = 2, tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
                 caption_weights: str = "", caption_source: str = "", raw: bool = False) -> Loader:
    """Batches of images joined with their caption embeddings (see the module docstring).

    data_dir: folder of `*.tar` shards (with `lift-fast index` files, or scanned at start);
    embeddings_dir: the store `lift-fast embed` made for them. split: "train" (shuffled, augmented,
    endless, batches from step `start_step` on) or "eval" (in order, centre crop, one pass).
    batch_size: samples per batch on this rank (the global batch is batch_size * world_size).
    shuffle_window: shards mixed together in the training stream. backend: "pil" (PIL decode in
    num_workers processes), "dali" (DALI decode with num_workers threads, `mixed` on the current
    CUDA device when there is one; images come out there, in `dtype`), or "auto" (DALI when it is
    usable, else PIL). num_workers: a count, or "auto" (worker_count: this process's share of the
    node's cores). raw: images as uint8 pixels and text_embeddings in the store's dtype, for a
    consumer that moves them to its device and normalises there (augment.normalize_images; the
    training loop's DeviceFeed); dtype is then unused. Both backends give the same samples, crops and flips. prefetch: DALI backend:
    batches prepared ahead on a feed thread, overlapped with the caller's step (0: prepared on the
    calling thread when asked for); the PIL backend's workers always run ahead. tokenizer: for the
    CLIP baseline, captions -> token ids, applied where the batch is made (batch["tokens"]).
    caption_weights (train): the probability of each of the store's caption sources, drawn per sample
    per step ("SOURCE=WEIGHT,...", "" for each equally; lift_fast.data.captions.parse_weights);
    caption_source (eval): the one source every row is taken from ("": the store's first).
    Raises ShardError / StoreError naming the folder, shard or key that is missing or bad (when
    iterating also for a bad sample, unless on_error="skip"), and ConfigError for a backend that
    is not available.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    use_dali = _resolve_backend(backend)
    num_workers = worker_count(num_workers, dali=use_dali)
    shards = list_shards(data_dir)
    store = open_store(embeddings_dir)
    reader = SampleReader(shards, store)
    probabilities, eval_source = caption_choice(store.sources, caption_weights, caption_source)
    stream = SampleStream([sample_count(s) for s in shards], batch_size=batch_size * world_size, seed=seed,
                          shuffle=split == "train", window=shuffle_window,
                          caption_probabilities=tuple(probabilities), eval_source=eval_source)
    batches = ImageTextBatches(reader, stream, split=split, image_size=image_size, dim=store.dim,
                               crop_scale=crop_scale, hflip=hflip, rank=rank, world_size=world_size,
                               start_step=start_step, on_error=on_error, tokenizer=tokenizer, raw=raw)
    if use_dali:
        from lift_fast.data.dali import DaliDecoder
        from lift_fast.data.dali_batches import DaliImageTextBatches

        decoder = DaliDecoder(image_size, batch_size, device_id=_cuda_device(), num_threads=max(1, num_workers),
                              dtype=torch.uint8 if raw else dtype, seed=seed)
        data = DaliImageTextBatches(batches, decoder, prefetch=prefetch)
    else:
        # Its own generator: DataLoader draws a worker base seed on every iter(), which would otherwise
        # move the global torch RNG that the training step (patch dropout) draws from after a resume.
        start_method = worker_start_method() if num_workers else None
        if start_method == "forkserver":
            worker_init_fn = _WorkerInit(worker_init_fn)
        data = DataLoader(batches, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                          prefetch_factor=2 if num_workers else None, worker_init_fn=worker_init_fn,
                          generator=torch.Generator().manual_seed(seed), multiprocessing_context=start_method)
    return Loader(batches, data, split=split, shards=shards, stream=stream, rank=rank, world_size=world_size)


def worker_start_method() -> str | None:
    """How the PIL loader starts its worker processes: None (the platform's default, fork on Linux) unless a
    DALI pipeline is alive in this process, then "forkserver" (the fork server started by start_fork_server).

    A forked child inherits a copy of every DALI pipeline but none of the threads behind it; if the
    child's garbage collector ever finalises one, Pipeline.__del__ waits for those threads forever (the
    hang of issue 14). Workers forked by the fork server come from a process that never ran DALI.
    The price is the worker start (measured in docs/data.md), and that a script must guard its entry
    point with `if __name__ == "__main__":`, as it must for any non-fork start method.
    """
    if not _dali_pipeline_alive():
        return None
    # The server imports this module (torch, numpy, PIL, the store) once; each worker is then a fork of
    # it (0.3 s, as with fork) instead of a fresh interpreter importing torch (4-8 s on 2 busy cores).
    # The preload only takes effect when the server starts, and keeps what the program asked for.
    preload = getattr(multiprocessing.forkserver._forkserver, "_preload_modules", ["__main__"])
    if __name__ not in preload:
        multiprocessing.set_forkserver_preload([*preload, __name__])
    start_fork_server()
    return "forkserver"


def _dali_pipeline_alive() -> bool:
    dali = sys.modules.get("nvidia.dali.pipeline")
    if dali is None:
        return False
    pipes = getattr(dali.Pipeline, "_pipes", None)  # DALI's weak references to its pipelines, for atexit
    return pipes is None or any(ref() is not None for ref in list(pipes))


def start_fork_server() -> None:
    """Start multiprocessing's fork server (unless it runs) with JOB_SIGNALS blocked, so that it never dies of them.

    SLURM signals every process of a job step, and the fork server is one of them. Had it died of the
    SIGTERM, the workers it forked would exit too (their parent is gone: DataLoader's watchdog) and
    the training process, which learns of its workers' exits through the server, would raise
    "DataLoader worker exited unexpectedly" instead of saving its last step. The mask is inherited
    through fork and exec; a signal that arrives here while it is blocked is delivered when this
    thread unblocks it. Workers unblock the signals after their worker_init_fn (_WorkerInit).
    """
    # The resource tracker first: starting it unblocks SIGTERM in this thread (CPython's own guard of its
    # start, bpo-33613), which would undo the mask below if it started inside the server's start.
    multiprocessing.resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class _WorkerInit:
    """A forkserver worker's worker_init_fn: the caller's (which may ignore JOB_SIGNALS, as training's
    does), then JOB_SIGNALS unblocked, so the worker acts on them as a forked one would."""

    def __init__(self, init: Callable[[int], None] | None):
        self.init = init

    def __call__(self, worker_id: int) -> None:
        if self.init is not None:
            self.init(worker_id)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)


def worker_count(setting: int | str, *, dali: bool) -> int:
    """data.num_workers as a count: an int as it is; "auto": this process's share of the node's cores,
    the CPUs it may run on (os.sched_getaffinity) divided among the node's ranks (LOCAL_WORLD_SIZE, set
    by torchrun), as DALI threads (dali), or as PIL worker processes less one core for the training
    process (at least 1). Raises ConfigError for anything else."""
    if isinstance(setting, int) and not isinstance(setting, bool) and setting >= 0:
        return setting
    if setting != "auto":
        raise ConfigError(f"data.num_workers={setting!r}: expected a count (0 or more) or auto")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    share = max(1, cores // ranks)
    count = share if dali else max(1, share - 1)
    log.info("data.num_workers=auto: %d %s (%d cores for %d rank(s) on this node)", count,
             "DALI threads" if dali else "PIL worker processes", cores, ranks)
    return count


def _cuda_device() -> int | None:
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def _resolve_backend(backend: str) -> bool:
    """Whether to use DALI for data.backend=`backend`; ConfigError when it is asked for and cannot run."""
    if backend not in ("auto", "dali", "pil"):
        raise ConfigError(f"data.backend={backend!r} is not one of auto, dali, pil")
    if backend == "pil":
        return False
    from lift_fast.data.dali import dali_available

    usable, why = dali_available(_cuda_device())
    if backend == "dali" and not usable:
        raise ConfigError(f"data.backend=dali: DALI cannot run here ({why}); {dali_install_hint()}, or use "
                          "data.backend=pil or auto")
    if not usable and torch.cuda.is_available():
        # On a GPU node the PIL loader is the slow path (docs/data.md): say why DALI is out and how to get it.
        log.warning("data.backend=auto: DALI cannot run here (%s), so the PIL loader feeds the GPU, which is "
                    "several times slower; %s", why, dali_install_hint())
    else:
        log.info("data.backend=%s: using the %s loader%s", backend, "DALI" if usable else "PIL",
                 "" if usable else f" ({why})")
    return usable


def dali_install_hint() -> str:
    """What to pip install for DALI on this machine: the wheel built for the CUDA driver's major version."""
    major = _cuda_driver_major()
    if major is None:
        return "install nvidia-dali-cuda130 (the gpu extra; nvidia-dali-cuda120 for a CUDA 12 driver)"
    wheel = "nvidia-dali-cuda120" if major < 13 else "nvidia-dali-cuda130"
    return f"pip install {wheel} (the DALI wheel for this machine's CUDA {major} driver)"


def _cuda_driver_major() -> int | None:
    """The CUDA driver's major version (12 for a 12.x driver; torch's own CUDA where the driver does not
    say), None without a usable GPU."""
    if not torch.cuda.is_available():
        return None
    try:  # the driver API's own answer: torch reports only the CUDA it was built with
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return version.value // 1000
    except OSError:
        pass
    return int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None
