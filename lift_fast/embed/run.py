"""The embed stage: read every caption of the data shards, run the frozen encoder once, write the store.

    summary = embed_shards("data/", "store/", cfg.embed, device="cuda", rank=rank, world_size=world_size)

Rank r of a job takes the shards i with i % world_size == r. A shard whose store files are complete
is not embedded again, so an interrupted run continues where it stopped. Within a shard each
distinct caption goes through the encoder once and its row is copied to every sample that has it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lift_fast.config import EmbedConfig
from lift_fast.data.shards import ShardError, iter_samples, list_shards
from lift_fast.embed import store
from lift_fast.embed.encoder import TextEncoder, load_encoder

log = logging.getLogger(__name__)


@dataclass
class ShardCaptions:
    """The good captions of one shard, in shard order, and the samples skipped with their reasons."""

    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"key": ..., "reason": ...}
    sha256: str = ""  # over every sample's key and raw caption bytes: tells a copied shard from a changed one


def read_captions(shard: Path, on_error: str) -> ShardCaptions:
    """Read the captions of one shard.

    A sample whose caption is missing, not UTF-8 or empty, or whose key repeats an earlier one, is
    bad: on_error="error" raises ShardError naming shard and key, "skip" records it in `skipped`.
    A shard that cannot be read at all always raises ShardError.
    """
    out = ShardCaptions()
    seen: set[str] = set()
    digest = hashlib.sha256()
    for sample in iter_samples(shard):
        digest.update(sample.key.encode() + b"\0" + sample.files.get("txt", b"\0missing") + b"\n")
        try:
            if sample.key in seen:
                raise ShardError(f"{shard}: key {sample.key!r} occurs twice; its rows could not be told apart")
            caption = sample.caption()
            if not caption:
                raise ShardError(f"{shard}: caption {sample.key}.txt is empty")
        except ShardError as err:
            if on_error == "error":
                raise ShardError(f"{err} (set embed.on_error=skip to skip such samples)") from None
            out.skipped.append({"key": sample.key, "reason": str(err)})
            continue
        seen.add(sample.key)
        out.keys.append(sample.key)
        out.captions.append(caption)
    out.sha256 = digest.hexdigest()
    return out


def embed_captions(encoder: TextEncoder, captions: list[str], batch_size: int, on_batch=None):
    """Embed each distinct caption once.

    Returns rows [N, D] float32 in the order of `captions`, the number of duplicates (N minus the
    distinct captions) and the number of rows whose caption was truncated.
    """
    if not captions:
        return torch.zeros((0, encoder.dim)), 0, 0
    distinct: dict[str, int] = {}
    inverse = torch.tensor([distinct.setdefault(c, len(distinct)) for c in captions], dtype=torch.long)
    unique_rows, truncated = encoder.encode(list(distinct), batch_size, return_truncated=True, on_batch=on_batch)
    return unique_rows[inverse], len(captions) - len(distinct), int(truncated[inverse].sum())


def _resume(out_dir: Path, shard: Path, info: dict, manifest: dict, summary: dict) -> None:
    """Keep a finished shard; bring its counts file and manifest entry up to date where they lag."""
    summary["shards_resumed"] += 1
    counts = store.shard_files(out_dir, shard.stem)[2]
    if json.loads(counts.read_text(encoding="utf-8")) != info:
        store.write_json(counts, info)
    if manifest["shards"].get(shard.stem) != info:  # also when the run stopped before recording it
        store.record_shard(out_dir, shard.stem, info)


def embed_shards(data_dir: str | Path, out_dir: str | Path, cfg: EmbedConfig, *, device: str = "cpu",
                 rank: int = 0, world_size: int = 1, progress: bool = True,
                 encoder: TextEncoder | None = None) -> dict:
    """Embed the captions of this rank's shards of `data_dir` into the store at `out_dir`.

    cfg: the encoder and its settings (model, pooling, prompt, max_length, normalize, dtype,
    batch_size, on_error). encoder: an already loaded encoder for cfg (else one is loaded on `device`).
    Returns a summary: shards (this rank's), shards_embedded, shards_resumed (finished earlier),
    shards_redone (finished earlier, embedded again because their tar changed; also counted in
    shards_embedded), captions (samples read), rows (written), embedded (distinct captions run
    through the encoder), duplicates, skipped, truncated, seconds, captions_per_second, load_seconds.
    Raises ShardError for unreadable shards or (on_error="error") bad captions, naming shard and key;
    StoreMismatchError, before touching anything, when `out_dir` holds a store made differently or
    from another data folder (the manifest records the folder).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
    shards = list_shards(data_dir)
    mine = shards[rank::world_size]
    out_dir = Path(out_dir)
    start = time.perf_counter()
    if encoder is None:
        encoder = load_encoder(cfg, device=device)
    else:
        differ = [f for f in store.EMBED_SETTINGS if getattr(encoder.cfg, f) != getattr(cfg, f)]
        if differ:
            raise ValueError(f"the encoder passed was loaded with other settings than cfg: {', '.join(differ)}")
    load_seconds = time.perf_counter() - start
    # Refuses a store of another encoder, setting or data folder before anything is created in it.
    manifest = store.open_for_writing(out_dir, encoder.identity, cfg.dtype, [s.stem for s in shards], data_dir)

    summary = dict(shards=len(mine), shards_embedded=0, shards_resumed=0, shards_redone=0, captions=0, rows=0,
                   embedded=0, duplicates=0, skipped=0, truncated=0)
    # (shard, its finished store entry or None, whether that entry may be kept when the captions are unchanged)
    todo: list[tuple[Path, dict | None, bool]] = []
    for shard in mine:
        info = store.finished_shard(out_dir, shard.stem)
        stat = shard.stat()
        if info is None:
            todo.append((shard, None, False))
        elif info.get("source_bytes") != stat.st_size:
            todo.append((shard, info, False))  # rewritten: redone
        elif info.get("source_mtime_ns") != stat.st_mtime_ns:
            todo.append((shard, info, True))  # copied or rewritten: its captions decide
        else:
            _resume(out_dir, shard, info, manifest, summary)
    if summary["shards_resumed"]:
        log.info("embed: %d of %d shards already finished in %s", summary["shards_resumed"], len(mine), out_dir)

    start = time.perf_counter()
    bar = tqdm(unit="caption", unit_scale=True, disable=not progress, dynamic_ncols=True,
               desc="embed" if world_size == 1 else f"embed rank {rank}")
    # Read the next shard's captions in a thread while the encoder works on the current one.
    with ThreadPoolExecutor(max_workers=1) as reader, bar:
        pending = reader.submit(read_captions, todo[0][0], cfg.on_error) if todo else None
        for i, (shard, previous, keep_if_same) in enumerate(todo):
            shard_captions = pending.result()
            pending = reader.submit(read_captions, todo[i + 1][0], cfg.on_error) if i + 1 < len(todo) else None
            stat = shard.stat()
            if keep_if_same and previous.get("captions_sha256") == shard_captions.sha256:
                _resume(out_dir, shard, {**previous, "source_mtime_ns": stat.st_mtime_ns}, manifest, summary)
                continue
            if previous is not None:
                log.info("embed: %s changed since it was embedded; embedding it again", shard)
                summary["shards_redone"] += 1
            bar.set_postfix_str(f"shard {shard.name} ({i + 1}/{len(todo)})", refresh=False)
            rows, duplicates, truncated = embed_captions(encoder, shard_captions.captions, cfg.batch_size, bar.update)
            bar.update(duplicates)
            info = {"source": shard.name, "source_bytes": stat.st_size, "source_mtime_ns": stat.st_mtime_ns,
                    "captions_sha256": shard_captions.sha256, "skipped": len(shard_captions.skipped),
                    "truncated": truncated, "duplicates": duplicates, "skipped_samples": shard_captions.skipped}
            store.write_shard(out_dir, shard.stem, shard_captions.keys, rows.numpy().astype(cfg.dtype), info,
                              shard_captions.captions)
            store.record_shard(out_dir, shard.stem, {**info, "count": len(shard_captions.keys)})
            summary["shards_embedded"] += 1
            summary["captions"] += len(shard_captions.keys) + len(shard_captions.skipped)
            summary["rows"] += len(shard_captions.keys)
            summary["embedded"] += len(shard_captions.keys) - duplicates
            summary["duplicates"] += duplicates
            summary["skipped"] += len(shard_captions.skipped)
            summary["truncated"] += truncated
    seconds = time.perf_counter() - start
    summary.update(seconds=seconds, captions_per_second=summary["captions"] / seconds if seconds > 0 else 0.0,
                   load_seconds=load_seconds)
    return summary
