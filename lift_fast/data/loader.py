"""The plain PyTorch loader: PIL decode in worker processes, joined with the embedding store by key.

Every batch is a dict:
    images           [B, 3, H, W] float32, normalised with OpenAI CLIP's mean/std
    text_embeddings  [B, D] float32, the store rows of exactly these samples
    keys             list[str], the samples' keys in batch order
    skipped          int, samples dropped (on_error="skip") since the previous batch

The pairing is by key, never by position: a key with no row in the store is an error naming shard
and key (or a counted skip), so a gap or a reordering in either side can never shift the pairing.
And the caption read for a sample must hash to the caption hash the store recorded for its row: two
data folders can share shard names and keys, and a store made from the other one is an error
naming shard and key (or a counted skip), not a silent wrong pairing.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lift_fast.config import ConfigError
from lift_fast.data.shards import Sample, ShardError, iter_samples, list_shards
from lift_fast.embed.store import EmbeddingStore, caption_hash, open_store

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float], rng: np.random.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop (area fraction in `scale`, aspect in `ratio`), bicubic."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    return center_crop(image, size)  # no fit in 10 tries: the centre crop, as torchvision does


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic), then cut the centre square."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float32 normalised with CLIP's mean/std."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (array - mean) / std


class ShardImageDataset(IterableDataset):
    """Samples of webdataset shards as (image tensor, embedding row, key), shuffled for training.

    split="train": endless; shard order reshuffled each epoch, samples mixed in a shuffle buffer,
    random resized crop. split="eval": one pass in shard order, centre crop.
    Shards are divided among ranks and workers; with fewer shards than readers, every reader
    walks all shards and keeps every n-th sample instead.
    """

    def __init__(self, shards: list[Path], store: EmbeddingStore, *, split: str, image_size: int,
                 crop_scale: tuple[float, float] = (0.9, 1.0), hflip: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 2048, on_error: str = "error"):
        super().__init__()
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        missing = [s.name for s in shards if s.stem not in store.shard_names]
        if missing:
            raise ShardError(f"embedding store {store.path} has no rows for shard(s) {', '.join(missing[:5])}; "
                             f"run `lift-fast embed` on this data folder")
        self.shards, self.store, self.split = shards, store, split
        self.image_size, self.crop_scale, self.hflip = image_size, crop_scale, hflip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.on_error = shuffle_buffer, on_error
        self._rows: dict[str, dict[str, int]] = {}  # shard -> key -> row, filled lazily in each worker

    def _reader_slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _samples(self, epoch: int) -> Iterator[tuple[Sample, int]]:
        """(sample, running index) for this reader, in shard order or this epoch's shuffled order."""
        slot, readers = self._reader_slot()
        order = list(self.shards)
        if self.split == "train":
            np.random.default_rng([self.seed, epoch]).shuffle(order)
        by_shard = len(order) >= readers
        mine = order[slot::readers] if by_shard else order
        index = 0
        for shard in mine:
            for sample in iter_samples(shard):
                if by_shard or index % readers == slot:
                    yield sample, index
                index += 1

    def _decode(self, sample: Sample, rng: np.random.Generator | None) -> torch.Tensor:
        try:
            image = Image.open(io.BytesIO(sample.image_bytes()))
            image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            if isinstance(err, ShardError):
                raise
            raise ShardError(f"{sample.shard}: image of sample {sample.key!r} cannot be decoded ({err})") from None
        if rng is None:
            image = center_crop(image, self.image_size)
        else:
            image = random_resized_crop(image, self.image_size, self.crop_scale, rng)
            if self.hflip and rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(image)

    def _examples(self, epoch: int, rng: np.random.Generator | None, pending: list[int]) -> Iterator[dict]:
        """Decoded examples of one pass; pending[0] counts skipped samples not yet reported, and is
        handed to the next example yielded (in a later pass, when the skips end this one)."""
        for sample, _ in self._samples(epoch):
            try:
                row = self._row_index(sample.shard.stem).get(sample.key)
                if row is None:
                    raise ShardError(f"{sample.shard}: sample {sample.key!r} has no row in the embedding store "
                                     f"{self.store.path} (shard {sample.shard.stem})")
                if caption_hash(sample.caption()) != int(self.store.caption_hashes(sample.shard.stem)[row]):
                    raise ShardError(f"{sample.shard}: the caption of sample {sample.key!r} is not the one its row in "
                                     f"{self.store.path} (shard {sample.shard.stem}) was embedded from: the embedding "
                                     "store was made from other captions (another data folder, or shards changed "
                                     "since); embed this data folder into its own store")
                image = self._decode(sample, rng)
            except ShardError as err:
                if self.on_error != "skip":
                    raise
                pending[0] += 1
                log.warning("skipping: %s", err)
                continue
            embedding = torch.from_numpy(np.asarray(self.store.embeddings(sample.shard.stem)[row], dtype=np.float32))
            skipped, pending[0] = pending[0], 0
            yield {"image": image, "embedding": embedding, "key": sample.key, "skipped": skipped}

    def _row_index(self, name: str) -> dict[str, int]:
        if name not in self._rows:
            self._rows[name] = self.store.row_index(name)
        return self._rows[name]

    def __iter__(self) -> Iterator[dict]:
        slot, _ = self._reader_slot()
        pending = [0]
        if self.split == "eval":
            # One example is held back, so that samples skipped after the last good one are counted in it.
            held = None
            for example in self._examples(0, None, pending):
                if held is not None:
                    yield held
                held = example
            if held is None and pending[0]:
                raise ShardError(f"no usable samples for reader {slot}: all {pending[0]} of its samples in "
                                 f"{len(self.shards)} shard(s) ({self.shards[0].parent}) were skipped")
            if held is not None:
                held["skipped"] += pending[0]
                yield held
            return
        rng = np.random.default_rng([self.seed, slot, 1])
        buffer: list[dict] = []
        epoch = 0
        while True:
            produced = False
            for example in self._examples(epoch, rng, pending):
                produced = True
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(example)
                    continue
                pick = int(rng.integers(len(buffer)))
                buffer[pick], example = example, buffer[pick]
                yield example
            if not produced:
                raise ShardError(f"no usable samples for reader {slot} in {len(self.shards)} shard(s) "
                                 f"({self.shards[0].parent})")
            epoch += 1


def collate(examples: list[dict]) -> dict:
    return {
        "images": torch.stack([e["image"] for e in examples]),
        "text_embeddings": torch.stack([e["embedding"] for e in examples]),
        "keys": [e["key"] for e in examples],
        "skipped": sum(e["skipped"] for e in examples),
    }


def build_loader(data_dir: str | Path, embeddings_dir: str | Path, *, split: str, batch_size: int, image_size: int,
                 backend: str = "auto", seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 1,
                 crop_scale: tuple[float, float] = (0.9, 1.0), hflip: bool = False, shuffle_buffer: int = 2048,
                 on_error: str = "error") -> DataLoader:
    """Batches of images joined with their caption embeddings (see the module docstring).

    data_dir: folder of `*.tar` shards; embeddings_dir: the store `lift-fast embed` made for them.
    split: "train" (shuffled, augmented, endless) or "eval" (in order, centre crop, one pass).
    batch_size: samples per batch on this rank. backend: "auto" or "pil" ("dali" is not built yet).
    Raises ShardError / StoreError naming the folder, shard or key that is missing or bad (when
    iterating: also a sample whose caption is not the one its store row was made from), and
    ConfigError for a backend that is not available.
    """
    if backend == "dali":
        raise ConfigError("data.backend=dali: the DALI loader is not part of this build yet; use data.backend=pil or auto")
    if backend not in ("auto", "pil"):
        raise ConfigError(f"data.backend={backend!r} is not one of auto, dali, pil")
    if backend == "auto":
        log.info("data.backend=auto: using the PIL loader")
    shards = list_shards(data_dir)
    store = open_store(embeddings_dir)
    dataset = ShardImageDataset(shards, store, split=split, image_size=image_size, crop_scale=crop_scale,
                                hflip=hflip, seed=seed, rank=rank, world_size=world_size,
                                shuffle_buffer=shuffle_buffer, on_error=on_error)
    # Eval keeps shard order: with several workers DataLoader interleaves their batches, so one worker.
    workers = num_workers if split == "train" else min(num_workers, 1)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                      drop_last=split == "train", persistent_workers=workers > 0 and split == "train",
                      prefetch_factor=4 if workers > 0 else None)
