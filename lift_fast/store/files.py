"""The files of one store shard, the caption hash stored per row, and the fingerprints that tell a
shard file from one put in its place after the embed run wrote it.

    NAME.npy, NAME.keys.txt, NAME.json, NAME.caption_hash.npy = shard_files(store_dir, NAME)
    NAME.scales.npy = scales_file(store_dir, NAME)             # int8 stores only

A fingerprint is {"bytes": size, "ends_sha256": sha256 of the first and last FINGERPRINT_ENDS bytes}
(of the whole file when it is smaller than both ends together): reading it costs two small reads
whatever the shard's size, so a reader checks every shard file when it first opens the shard.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from lift_fast.store.manifest import StoreError

HASH_DTYPE = np.dtype("<u8")
# Bytes read at each end of a file for its fingerprint. A .npy's first 64 KiB hold its header and its
# first rows (16 rows of 2048 float16 features), the last 64 KiB its last rows: a shard embedded from
# other captions, or another shard's file, differs there. A change confined to the middle of a file
# of the same size is not seen (the NaN/inf check still reads every row).
FINGERPRINT_ENDS = 64 * 1024


def caption_hash(caption: str) -> int:
    """A 64-bit digest (blake2b, 8 bytes, little-endian) of the exact caption text; stored per row."""
    return int.from_bytes(hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest(), "little")


def shard_files(store_dir: Path, name: str) -> tuple[Path, Path, Path, Path]:
    """(rows .npy, keys .keys.txt, counts .json, caption hashes .caption_hash.npy) of one shard."""
    return (store_dir / f"{name}.npy", store_dir / f"{name}.keys.txt", store_dir / f"{name}.json",
            store_dir / f"{name}.caption_hash.npy")


def scales_file(store_dir: Path, name: str) -> Path:
    """The per-row float32 scales of an int8 shard."""
    return store_dir / f"{name}.scales.npy"


def fingerprint_bytes(data: bytes) -> dict:
    """The fingerprint of a file whose content is `data` (see the module docstring)."""
    ends = data if len(data) <= 2 * FINGERPRINT_ENDS else data[:FINGERPRINT_ENDS] + data[-FINGERPRINT_ENDS:]
    return {"bytes": len(data), "ends_sha256": hashlib.sha256(ends).hexdigest()}


def fingerprint_file(path: Path) -> dict:
    """The fingerprint of the file at `path`, from at most 2 * FINGERPRINT_ENDS bytes read.

    Raises FileNotFoundError when it does not exist.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= 2 * FINGERPRINT_ENDS:
            ends = f.read()
        else:
            ends = f.read(FINGERPRINT_ENDS)
            f.seek(size - FINGERPRINT_ENDS)
            ends += f.read(FINGERPRINT_ENDS)
    return {"bytes": size, "ends_sha256": hashlib.sha256(ends).hexdigest()}


def shard_fingerprints(store_dir: Path, name: str) -> dict[str, dict]:
    """File name -> fingerprint of each file of shard `name` that exists, NAME.json aside (what the
    manifest records as `files`)."""
    npy, keys_txt, _, hashes_npy = shard_files(store_dir, name)
    paths = [keys_txt, hashes_npy, scales_file(store_dir, name), npy]
    return {p.name: fingerprint_file(p) for p in paths if p.is_file()}


def check_fingerprint(path: Path, recorded: dict | None, manifest_path: Path) -> None:
    """Refuse a shard file that is not the one the embed run wrote.

    recorded: the fingerprint the manifest holds for it (None: an older store without one, not checked).
    Raises StoreError naming the file, the manifest and what differs (size, or content at the ends).
    """
    if recorded is None:
        return
    try:
        found = fingerprint_file(path)
    except FileNotFoundError:
        raise StoreError(f"store shard file {path} does not exist (listed in {manifest_path})") from None
    if found == recorded:
        return
    what = (f"{found['bytes']} bytes, the embed run wrote {recorded.get('bytes')}" if found["bytes"] != recorded.get("bytes")
            else "its first or last bytes differ from what the embed run wrote")
    raise StoreError(f"store shard file {path} was replaced or changed after it was embedded ({what}, recorded in "
                     f"{manifest_path}); its rows may belong to other captions. Run lift-fast embed on the data again: "
                     "it embeds again every shard whose files do not match")


def read_keys(path: Path) -> list[str]:
    """The keys of a .keys.txt file, one per line."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise StoreError(f"store shard keys {path} does not exist") from None
