"""Shard index files: where every sample's members lie inside a tar, in DALI's webdataset index format.

    lift-fast index data/train        # writes 00000.idx beside 00000.tar, for every shard

The format is the one `wds2idx` writes and `fn.readers.webdataset(index_paths=...)` reads (v1.2):
a first line `v1.2 NUM_SAMPLES`, then one line per sample listing each member as
`EXT OFFSET SIZE NAME` (OFFSET: the byte where the member's data starts in the tar).

With it the training stream reads any sample by offset (a global shuffle, an exact resume position,
batches split by rank) instead of streaming whole tars. A shard without an index is scanned in
memory instead (slower to start); a stale one (its tar changed after it was written, or it points
past the tar's end) is an error, never a silent read of the wrong bytes.
"""

from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lift_fast.atomic import write_text
from lift_fast.data.shards import (
    IMAGE_EXTENSIONS,
    ShardError,
    list_shards,
    require_end_block,
    split_member_name,
)

log = logging.getLogger(__name__)

INDEX_VERSION = "v1.2"
NO_MEMBER = -1  # offset of a member the sample does not have


def index_path(shard: str | Path) -> Path:
    """`00000.tar` -> `00000.idx`, the index file beside its shard."""
    return Path(shard).with_suffix(".idx")


@dataclass
class ShardIndex:
    """The samples of one shard in tar order: keys and the (offset, size) of image and caption.

    image_offset, image_size, caption_offset, caption_size: [n] int64 (NO_MEMBER offset: missing).
    """

    shard: Path
    keys: list[str]
    image_offset: np.ndarray
    image_size: np.ndarray
    caption_offset: np.ndarray
    caption_size: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


def scan_members(shard: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file in a tar, in order.

    Raises ShardError naming the shard when it is missing, empty, truncated or not a tar.
    """
    if not shard.is_file():
        raise ShardError(f"shard {shard} does not exist")
    size = shard.stat().st_size
    if size == 0:
        raise ShardError(f"shard {shard} is empty (0 bytes)")
    members = []
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if member.isfile():
                    members.append((member.name, member.offset_data, member.size))
            require_end_block(shard, tar.offset)
    except (tarfile.TarError, EOFError, OSError) as err:
        # where it stops: the samples after the last whole member are lost, and their keys with them
        whole = [name for name, offset, length in members if offset + length <= size]
        after = f" after member {whole[-1]!r}" if whole else ""
        raise ShardError(f"shard {shard} is truncated or corrupt{after} ({size} bytes): {err}") from None
    if members and members[-1][1] + members[-1][2] > size:
        raise ShardError(f"shard {shard} is truncated: member {members[-1][0]} ends past byte {size}")
    return members


def group_samples(shard: Path, members: list[tuple[str, int, int]]) -> list[list[tuple[str, int, int, str]]]:
    """Members grouped into samples by key (consecutive members sharing a key, as webdataset reads them):
    one list of (ext, offset, size, name) per sample. Hidden files (a name starting with a dot) are not samples."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    for name, offset, size in members:
        key, ext = split_member_name(name)
        if not key or key.endswith("/") or name.rpartition("/")[2].startswith("."):
            continue
        if any(c.isspace() for c in name):
            raise ShardError(f"{shard}: member name {name!r} contains whitespace, which the index format cannot hold")
        if key != last_key:
            samples.append([])
            last_key = key
        samples[-1].append((ext, offset, size, name))
    return samples


def write_index(shard: str | Path) -> Path:
    """Scan a shard and write its index file atomically; returns the index path. Raises ShardError."""
    shard = Path(shard)
    samples = group_samples(shard, scan_members(shard))
    if not samples:
        raise ShardError(f"shard {shard} holds no samples")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample) for sample in samples]
    path = index_path(shard)
    write_text(path, "\n".join(lines) + "\n")
    tar_mtime = shard.stat().st_mtime_ns
    if path.stat().st_mtime_ns < tar_mtime:  # a tar dated in the future (clock skew, a copy): not stale
        os.utime(path, ns=(tar_mtime, tar_mtime))
    return path


def _announced(first_line: str) -> int | None:
    """The sample count of an index's first line (`v1.2 N`), or None when it is not such a line."""
    header = first_line.split()
    return int(header[1]) if len(header) == 2 and header[0] == INDEX_VERSION and header[1].isdigit() else None


def _parse(shard: Path, path: Path, text: str) -> list[list[tuple[str, int, int, str]]]:
    lines = text.splitlines()
    announced = _announced(lines[0]) if lines else None
    if announced is None:
        raise ShardError(f"index {path} is not a {INDEX_VERSION} webdataset index (first line {lines[:1]}); "
                         f"rewrite it with `lift-fast index {shard.parent}`")
    samples = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ShardError(f"index {path} line {number} is malformed: {line[:80]!r}")
        samples.append([(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                        for i in range(0, len(fields), 4)])
    if len(samples) != announced:
        raise ShardError(f"index {path} announces {announced} samples but lists {len(samples)}; "
                         f"rewrite it with `lift-fast index {shard.parent}`")
    return samples


def stale_reason(shard: Path, path: Path) -> str | None:
    """Why the index at `path` cannot be trusted for `shard` (written before the tar's last change), or None."""
    if path.stat().st_mtime_ns < shard.stat().st_mtime_ns:
        return "the shard changed after its index was written"
    return None


def read_index(shard: str | Path) -> ShardIndex:
    """The index of one shard: from its index file when there is one, else by scanning the tar.

    Raises ShardError naming the index and the fix when it is malformed, stale, or points past the
    end of the tar, and as scan_members does for a bad shard.
    """
    shard = Path(shard)
    path = index_path(shard)
    if path.is_file():
        if not shard.is_file():
            raise ShardError(f"shard {shard} does not exist (its index {path} does)")
        reason = stale_reason(shard, path)
        if reason:
            raise ShardError(f"index {path} is stale: {reason}; rewrite it with `lift-fast index {shard.parent}`")
        samples = _parse(shard, path, path.read_text(encoding="utf-8"))
        end = max((offset + size for sample in samples for _, offset, size, _ in sample), default=0)
        if end > shard.stat().st_size:
            raise ShardError(f"index {path} points past the end of {shard} (byte {end} of {shard.stat().st_size}): "
                             f"the index is stale or the shard truncated; rewrite it with `lift-fast index {shard.parent}`")
    else:
        samples = group_samples(shard, scan_members(shard))
    if not samples:
        raise ShardError(f"shard {shard} holds no samples")
    count = len(samples)
    index = ShardIndex(shard, [], np.full(count, NO_MEMBER, np.int64), np.zeros(count, np.int64),
                       np.full(count, NO_MEMBER, np.int64), np.zeros(count, np.int64))
    for row, sample in enumerate(samples):
        index.keys.append(split_member_name(sample[0][3])[0])
        for ext, offset, size, _ in sample:
            ext = ext.lower()
            if ext in IMAGE_EXTENSIONS and index.image_offset[row] == NO_MEMBER:
                index.image_offset[row], index.image_size[row] = offset, size
            elif ext == "txt":
                index.caption_offset[row], index.caption_size[row] = offset, size
    return index


def sample_count(shard: str | Path) -> int:
    """Samples in a shard: the index file's first line when it has an up-to-date one, else a scan."""
    shard = Path(shard)
    path = index_path(shard)
    if path.is_file() and shard.is_file() and stale_reason(shard, path) is None:
        with open(path, encoding="utf-8") as f:
            announced = _announced(f.readline())
        if announced is not None:
            return announced
    return len(read_index(shard))


def index_shards(data_dir: str | Path, *, force: bool = False, progress: bool = True) -> dict:
    """Write the index of every shard in `data_dir` that has none or a stale one (all with force).

    Returns {"shards", "written", "up_to_date", "samples"}. Raises ShardError for a bad folder or shard.
    """
    shards = list_shards(data_dir)
    summary = {"shards": len(shards), "written": 0, "up_to_date": 0, "samples": 0}
    for shard in tqdm(shards, desc="index", unit="shard", disable=not progress, dynamic_ncols=True):
        path = index_path(shard)
        if not force and path.is_file() and stale_reason(shard, path) is None:
            try:
                summary["samples"] += len(read_index(shard))
                summary["up_to_date"] += 1
                continue
            except ShardError as err:  # malformed or pointing past the end: rewritten below
                log.info("rewriting %s: %s", path, err)
        write_index(shard)
        summary["written"] += 1
        summary["samples"] += sample_count(shard)
    return summary
