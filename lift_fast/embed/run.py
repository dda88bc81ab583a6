"""The embed stage: read every caption of the data shards, run the frozen encoder once, write the store.

    summary = embed_shards("data/", "store/", cfg.embed, device="cuda", rank=rank, world_size=world_size)

Rank r of a job takes the shards i with i % world_size == r. A shard whose store files are complete
is not embedded again, so an interrupted run continues where it stopped (and, as every shard is
embedded the same way whenever it is embedded, ends with the same bytes as an uninterrupted run).
Within a shard each distinct caption goes through the encoder once and its row is copied to every
sample that has it. A reader thread reads, deduplicates and tokenizes the next shard while the
encoder works on the current one, and a writer thread writes each finished shard's files while the
encoder runs the next (at most one shard waits to be written).

Before the first shard, a quantized encoder (embed.quantize) is checked against the unquantized
model on the first captions of the data's first shard (the same sample on every rank and every
rerun); then the model is compiled where embed.compile asks for it.
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

from lift_fast import store
from lift_fast.atomic import write_json
from lift_fast.config import ConfigError, EmbedConfig
from lift_fast.data.captions import JSON_PREFIX, TXT, caption_from, members_of, parse_sources
from lift_fast.data.shards import ShardError, iter_samples, list_shards
from lift_fast.device import resolve_compile
from lift_fast.embed.encoder import (
    TextEncoder,
    Tokenized,
    load_encoder,
    resolve_precision,
    weights_sha256,
)
from lift_fast.embed.quantize import (
    check_mixed_precision,
    check_supported,
    quantize_encoder,
)

log = logging.getLogger(__name__)


@dataclass
class ShardCaptions:
    """The good captions of one shard, in shard order, and the samples skipped with their reasons.

    keys and captions are per store row: a sample's key once per caption source, its captions in the
    order of the sources.
    """

    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"key": ..., "reason": ...}
    sha256: str = ""  # over every sample's key and raw caption bytes: tells a copied shard from a changed one


def read_captions(shard: Path, on_error: str, sources: tuple[str, ...] = (TXT,)) -> ShardCaptions:
    """Read the captions of one shard from each of the caption `sources` (see lift_fast.data.captions).

    A sample whose caption of any source is missing, not UTF-8 or empty (or, for json:FIELD, whose
    KEY.json is not JSON or lacks the field), or whose key repeats an earlier one, is bad:
    on_error="error" raises ShardError naming shard, key and source, "skip" records it (none of its
    rows is written) in `skipped`. A shard that cannot be read at all always raises ShardError.
    """
    out = ShardCaptions()
    seen: set[str] = set()
    digest = hashlib.sha256()
    members = members_of(sources)
    for sample in iter_samples(shard):
        digest.update(sample.key.encode() + b"\0" + b"\0".join(sample.files.get(m, b"\0missing") for m in members)
                      + b"\n")
        try:
            if sample.key in seen:
                raise ShardError(f"{shard}: key {sample.key!r} occurs twice; its rows could not be told apart")
            captions = [caption_from(sample.files, source, shard, sample.key) for source in sources]
        except ShardError as err:
            if on_error == "error":
                raise ShardError(f"{err} (set embed.on_error=skip to skip such samples)") from None
            out.skipped.append({"key": sample.key, "reason": str(err)})
            continue
        seen.add(sample.key)
        out.keys += [sample.key] * len(sources)
        out.captions += captions
    out.sha256 = digest.hexdigest()
    return out


@dataclass
class PreparedShard:
    """One shard read, its captions deduplicated and tokenized: what the encoder needs, made in the reader thread."""

    shard: Path
    captions: ShardCaptions
    tokenized: Tokenized  # the distinct captions, in order of first appearance
    inverse: torch.Tensor  # [rows] index of each good sample's caption in tokenized


def prepare_shard(shard: Path, encoder: TextEncoder, on_error: str, on_long: str = "truncate",
                  sources: tuple[str, ...] = (TXT,)) -> PreparedShard:
    """Read a shard's captions (of every source), keep each distinct caption once and tokenize those.

    on_long: a caption longer than the encoder's max_length is cut and counted ("truncate"), skipped
    and counted with its reason ("skip"), or an error ("error"). Raises ShardError naming shard and
    key (see read_captions for the other bad captions).
    """
    shard_captions = read_captions(shard, on_error, sources)
    distinct: dict[str, int] = {}
    for caption in shard_captions.captions:
        distinct.setdefault(caption, len(distinct))
    tokenized = encoder.tokenize(list(distinct))
    if on_long != "truncate" and bool(tokenized.truncated.any()):
        shard_captions, distinct, tokenized = _drop_long(shard, shard_captions, tokenized, encoder.cfg.max_length,
                                                         on_long, sources)
    inverse = torch.tensor([distinct[c] for c in shard_captions.captions], dtype=torch.long)
    return PreparedShard(shard, shard_captions, tokenized, inverse)


def _drop_long(shard: Path, shard_captions: ShardCaptions, tokenized: Tokenized, max_length: int,
               on_long: str, sources: tuple[str, ...] = (TXT,)) -> tuple[ShardCaptions, dict[str, int], Tokenized]:
    """The shard without its samples whose caption (of any source) is longer than max_length
    (on_long="skip": none of the sample's rows is kept), or a ShardError naming the first (on_long="error")."""
    long = {text for text, cut in zip(tokenized.texts, tokenized.truncated.tolist()) if cut}
    reasons: dict[str, str] = {}
    for row, (key, caption) in enumerate(zip(shard_captions.keys, shard_captions.captions)):
        source = sources[row % len(sources)]  # a key's rows follow each other, one per source
        if caption in long and key not in reasons:
            what = (f"{key}.txt" if source == TXT
                    else f"{key}.json field {source[len(JSON_PREFIX):]!r} (caption source {source!r})")
            reasons[key] = f"{shard}: caption {what} is longer than embed.max_length={max_length} tokens"
    if on_long == "error":
        first = next(iter(reasons.values()))
        raise ShardError(f"{first} (set embed.on_long=truncate to cut such captions, or skip to leave them out)")
    kept = [(key, caption) for key, caption in zip(shard_captions.keys, shard_captions.captions) if key not in reasons]
    out = ShardCaptions(keys=[key for key, _ in kept], captions=[caption for _, caption in kept],
                        skipped=shard_captions.skipped + [{"key": k, "reason": r} for k, r in reasons.items()],
                        sha256=shard_captions.sha256)
    rows = [i for i, cut in enumerate(tokenized.truncated.tolist()) if not cut]
    short = Tokenized([tokenized.texts[i] for i in rows], [tokenized.ids[i] for i in rows],
                      tokenized.truncated[rows])
    return out, {text: i for i, text in enumerate(short.texts)}, short


def fidelity_sample(shards: list[Path], size: int, sources: tuple[str, ...] = (TXT,)) -> tuple[list[str], str]:
    """The first `size` distinct good captions (of the caption `sources`) of the data, from its first
    shard on, and where they came from."""
    sample: dict[str, None] = {}
    used = []
    for shard in shards:
        for caption in read_captions(shard, "skip", sources).captions:
            sample.setdefault(caption, None)
            if len(sample) == size:
                break
        used.append(shard.name)
        if len(sample) == size:
            break
    return list(sample), ", ".join(used)


def prepare_encoder(encoder: TextEncoder, cfg: EmbedConfig, shards: list[Path]) -> dict:
    """Check a bf16-mixed encoder against fp32, quantize (after its fidelity check) and compile the
    encoder as cfg asks; the fidelity reports go into the manifest (`precision_fidelity`, `fidelity`).

    Returns {"fidelity": the quantized encoder's report or None, "precision_fidelity": the bf16-mixed
    encoder's or None}. Raises ConfigError (FidelityError) when either is refused.
    """
    report = mixed = None
    checked = cfg.quantize != "none" or encoder.autocast_dtype is not None
    sample, where = fidelity_sample(shards, cfg.fidelity_sample, parse_sources(cfg.captions)) if checked else ([], "")
    if encoder.autocast_dtype is not None and sample:
        mixed = check_mixed_precision(encoder, sample, min_fidelity=cfg.min_fidelity, where=where)
    if cfg.quantize != "none" and getattr(encoder, "quantize", "none") != cfg.quantize:
        report = quantize_encoder(encoder, cfg.quantize, sample, min_fidelity=cfg.min_fidelity, where=where)
        encoder.quantize = cfg.quantize
        log.info("embed: %s encoder, cosine to the unquantized model mean %.5f min %.5f on %d captions",
                 cfg.quantize, report["cosine_mean"], report["cosine_min"], report["captions"])
    if resolve_compile(cfg.compile, encoder.device, "embed.compile") and not encoder.compiled:
        encoder.compile()
    return {"fidelity": report, "precision_fidelity": mixed}


def _resume(out_dir: Path, shard: Path, info: dict, manifest: dict, summary: dict) -> None:
    """Keep a finished shard; bring its counts file and manifest entry up to date where they lag."""
    summary["shards_resumed"] += 1
    counts = store.shard_files(out_dir, shard.stem)[2]
    if json.loads(counts.read_text(encoding="utf-8")) != info:
        write_json(counts, info)
    if manifest["shards"].get(shard.stem) != info:  # also when the run stopped before recording it
        store.record_shard(out_dir, shard.stem, info)


def _todo(mine: list[Path], out_dir: Path) -> tuple[list[tuple[Path, dict | None, bool]], list[tuple[Path, dict]]]:
    """Which shards to read: (shard, its finished store entry or None, whether that entry may be kept
    when the captions are unchanged) each; and the finished, unchanged shards, (shard, entry) each."""
    todo, finished = [], []
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
            finished.append((shard, info))
    return todo, finished


def write_rows(out_dir: Path, name: str, keys: list[str], captions: list[str], rows: torch.Tensor, info: dict,
               dtype: str) -> None:
    """Store one shard's rows [N, D] float32 (in the storage dtype, with its keys and caption hashes) and
    record it in the manifest: what the writer thread does while the encoder runs the next shard."""
    stored, scales = store.store_rows(rows.numpy(), dtype)
    entry = store.write_shard(out_dir, name, keys, stored, info, captions, scales)
    store.record_shard(out_dir, name, entry)  # with the files' fingerprints, which readers check


class Progress:
    """A tqdm bar of captions with captions/s (tqdm's rate) and tokens/s in its postfix."""

    def __init__(self, enabled: bool, description: str):
        self.bar = tqdm(unit="caption", unit_scale=True, disable=not enabled, dynamic_ncols=True, desc=description)
        self.started = time.perf_counter()
        self.tokens = 0
        self.label = ""

    def batch(self, captions: int, tokens: int) -> None:
        self.tokens += tokens
        seconds = time.perf_counter() - self.started
        self.bar.set_postfix_str(f"{self.label}{self.tokens / max(seconds, 1e-9):,.0f} tok/s", refresh=False)
        self.bar.update(captions)


def embed_shards(data_dir: str | Path, out_dir: str | Path, cfg: EmbedConfig, *, device: str = "cpu",
                 rank: int = 0, world_size: int = 1, progress: bool = True,
                 encoder: TextEncoder | None = None) -> dict:
    """Embed the captions of this rank's shards of `data_dir` into the store at `out_dir`: one row per
    sample and caption source of cfg.captions (the rows of a sample together, in that order).

    cfg: the encoder and its settings (see EmbedConfig). encoder: an already loaded encoder for cfg
    (else one is loaded on `device`); it is quantized and compiled here as cfg asks.
    Returns a summary: shards (this rank's), shards_embedded, shards_resumed (finished earlier),
    shards_redone (finished earlier, embedded again because their tar changed; also counted in
    shards_embedded), captions (samples read), rows (written), embedded (distinct captions run
    through the encoder), duplicates, skipped (samples), truncated, tokens (of the embedded captions),
    padded_tokens (run through the model), seconds, captions_per_second, tokens_per_second,
    load_seconds, warmup_seconds (first passes of each input shape: compilation), precision,
    quantize, compiled, packing (packed, exact or padded: see TextEncoder.packing_mode; None when
    nothing ran) and packing_note (why packed fell back), fidelity (the quantized encoder's report, or None) and precision_fidelity
    (the bf16-mixed encoder's against fp32, or None).
    Raises ShardError for unreadable shards or (on_error="error") bad captions, or (on_long="error")
    a caption longer than max_length, naming shard and key;
    StoreMismatchError, before touching anything, when `out_dir` holds a store made differently or
    from another data folder (the manifest records the folder); ConfigError for a quantization this
    device cannot run or whose fidelity is below cfg.min_fidelity.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
    sources = parse_sources(cfg.captions)
    shards = list_shards(data_dir)
    mine = shards[rank::world_size]
    out_dir = Path(out_dir)
    start = time.perf_counter()
    check_supported(cfg.quantize, device if encoder is None else encoder.device)  # before loading GBs of weights
    if encoder is None:
        encoder = load_encoder(cfg, device=device)
    else:
        differ = [f for f in (*store.EMBED_SETTINGS, "append_eos") if getattr(encoder.cfg, f) != getattr(cfg, f)]
        if cfg.precision != "auto" and resolve_precision(cfg.precision, encoder.device) != encoder.precision:
            differ.append("precision")
        if differ:
            raise ConfigError(f"the encoder passed was loaded with other settings than cfg: {', '.join(differ)}")
    load_seconds = time.perf_counter() - start
    # A store of another encoder, setting or data folder is refused before anything is created in it,
    # and a refused quantization (fidelity) leaves no store behind.
    if (out_dir / store.MANIFEST).is_file():  # a rerun, or another rank: the recorded hash, while the weights are unchanged
        weights_sha256(encoder.path, store.read_manifest(out_dir)["encoder"])
    identity = {**encoder.identity, "quantize": cfg.quantize, "on_long": cfg.on_long}
    store.check_for_writing(out_dir, identity, cfg.dtype, data_dir, sources)
    todo, finished = _todo(mine, out_dir)
    reports = prepare_encoder(encoder, cfg, shards) if todo else {"fidelity": None, "precision_fidelity": None}
    manifest = store.open_for_writing(out_dir, identity, cfg.dtype, [s.stem for s in shards], data_dir, sources)
    if any(reports.values()):
        store.record_fields(out_dir, **{name: report for name, report in reports.items() if report})

    summary = {"shards": len(mine), "shards_embedded": 0, "shards_resumed": 0, "shards_redone": 0, "captions": 0,
               "rows": 0, "embedded": 0, "duplicates": 0, "skipped": 0, "truncated": 0, "tokens": 0}
    for shard, info in finished:
        _resume(out_dir, shard, info, manifest, summary)
    if finished:
        log.info("embed: %d of %d shards already finished in %s", len(finished), len(mine), out_dir)
    padded_before, warmup_before = encoder.padded_tokens, encoder.warmup_seconds

    start = time.perf_counter()
    bar = Progress(progress, "embed" if world_size == 1 else f"embed rank {rank}")
    # Read and tokenize the next shard in a thread while the encoder works on the current one.
    with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writer, bar.bar:
        written = None  # the shard being written
        pending = reader.submit(prepare_shard, todo[0][0], encoder, cfg.on_error, cfg.on_long, sources) if todo else None
        for i, (shard, previous, keep_if_same) in enumerate(todo):
            prepared = pending.result()
            pending = (reader.submit(prepare_shard, todo[i + 1][0], encoder, cfg.on_error, cfg.on_long,
                                     sources)
                       if i + 1 < len(todo) else None)
            shard_captions = prepared.captions
            stat = shard.stat()
            if keep_if_same and previous.get("captions_sha256") == shard_captions.sha256:
                _resume(out_dir, shard, {**previous, "source_mtime_ns": stat.st_mtime_ns}, manifest, summary)
                continue
            if previous is not None:
                log.info("embed: %s changed since it was embedded; embedding it again", shard)
                summary["shards_redone"] += 1
            bar.label = f"shard {shard.name} ({i + 1}/{len(todo)}) "
            distinct_rows = encoder.encode_tokenized(prepared.tokenized, cfg.batch_size,
                                                     max_tokens=cfg.max_tokens or encoder.max_tokens, on_batch=bar.batch)
            rows = distinct_rows[prepared.inverse] if len(prepared.inverse) else distinct_rows[:0]
            duplicates = len(prepared.inverse) - len(prepared.tokenized.ids)
            truncated = int(prepared.tokenized.truncated[prepared.inverse].sum()) if len(prepared.inverse) else 0
            bar.bar.update(duplicates)
            info = {"source": shard.name, "source_bytes": stat.st_size, "source_mtime_ns": stat.st_mtime_ns,
                    "captions_sha256": shard_captions.sha256, "skipped": len(shard_captions.skipped),
                    "truncated": truncated, "duplicates": duplicates, "skipped_samples": shard_captions.skipped}
            if written is not None:
                written.result()  # the previous shard is on disk (or its error is raised here)
            written = writer.submit(write_rows, out_dir, shard.stem, shard_captions.keys, shard_captions.captions,
                                    rows, info, cfg.dtype)
            summary["shards_embedded"] += 1
            summary["captions"] += len(shard_captions.keys) // len(sources) + len(shard_captions.skipped)
            summary["rows"] += len(shard_captions.keys)
            summary["embedded"] += len(shard_captions.keys) - duplicates
            summary["duplicates"] += duplicates
            summary["skipped"] += len(shard_captions.skipped)
            summary["truncated"] += truncated
            summary["tokens"] += prepared.tokenized.tokens
        if written is not None:
            written.result()
    seconds = time.perf_counter() - start
    summary.update(padded_tokens=encoder.padded_tokens - padded_before, seconds=seconds,
                   captions_per_second=summary["captions"] / seconds if seconds > 0 else 0.0,
                   tokens_per_second=summary["tokens"] / seconds if seconds > 0 else 0.0,
                   load_seconds=load_seconds, warmup_seconds=encoder.warmup_seconds - warmup_before,
                   precision=encoder.precision, quantize=getattr(encoder, "quantize", "none"), compiled=encoder.compiled,
                   packing=getattr(encoder, "_packing", None), packing_note=getattr(encoder, "packing_note", ""),
                   **reports)
    return summary
