"""Writing store shards: rows in the storage dtype (int8 with per-row scales), each shard's files
written atomically and durably, and the check that tells a finished shard from one to redo.

    stored, scales = store_rows(rows, "float16")                  # rows [N, D] float32
    entry = write_shard(store_dir, "00000", keys, stored, info, captions, scales)
    record_shard(store_dir, "00000", entry)                       # lift_fast.store.manifest
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from lift_fast.atomic import atomic_write, write_json
from lift_fast.store.files import (
    HASH_DTYPE,
    caption_hash,
    fingerprint_bytes,
    fingerprint_file,
    read_keys,
    scales_file,
    shard_files,
    shard_fingerprints,
)
from lift_fast.store.manifest import MANIFEST, StoreError, read_manifest, record_shard


def quantize_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: rows [N, D] float -> (int8 [N, D], float32 scales [N]), row ~ int8 * scale.

    The scale is the row's largest magnitude / 127 (1 for an all-zero row), so each element is off by
    at most half a scale step. A row holding NaN or inf gets a NaN or inf scale (and meaningless int8
    values), so that `write_shard` refuses it.
    """
    rows = np.asarray(rows, dtype=np.float32)
    peak = np.abs(rows).max(axis=1) if rows.size else np.zeros(rows.shape[0], dtype=np.float32)
    scales = np.where((peak > 0) | np.isnan(peak), peak / 127.0, 1.0).astype(np.float32)
    with np.errstate(invalid="ignore"):  # NaN rows: their scale tells
        quantized = np.clip(np.nan_to_num(np.rint(rows / scales[:, None])), -127, 127).astype(np.int8)
    return quantized, scales


def store_rows(rows: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float rows [N, D] in the storage dtype: (rows, None) for float16/float32, (int8 rows, scales [N]) for int8."""
    if dtype == "int8":
        return quantize_rows(rows)
    return np.asarray(rows).astype(dtype), None


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_shard(store_dir: str | Path, name: str, keys: list[str], embeddings: np.ndarray, info: dict,
                captions: list[str], scales: np.ndarray | None = None) -> dict:
    """Write one shard's keys, caption hashes, scales, counts and rows [len(keys), D], each atomically
    and durably (lift_fast.atomic: fsynced, renamed, folder fsynced), the rows last.

    captions: the exact text each row was embedded from (its hash is stored, see `caption_hash`).
    scales: [len(keys)] float32, with int8 rows only (see `store_rows`).
    Returns the shard's manifest entry: info with `count` and `files` (each file's fingerprint, see
    lift_fast.store.files), as also written to NAME.json.
    Raises ValueError when the lengths disagree or int8 rows come without scales, and StoreError naming
    the key when a key holds a line break or its row (or int8 scale) a NaN or inf.
    """
    store_dir = Path(store_dir)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(keys) or len(captions) != len(keys):
        raise ValueError(f"shard {name}: {len(keys)} keys and {len(captions)} captions but embeddings of shape "
                         f"{tuple(embeddings.shape)}")
    if (embeddings.dtype == np.int8) != (scales is not None) or (scales is not None and scales.shape != (len(keys),)):
        raise ValueError(f"shard {name}: int8 rows need [count] scales and float rows none; got rows "
                         f"{embeddings.dtype} and scales {None if scales is None else scales.shape}")
    bad = next((key for key in keys if "\n" in key or "\r" in key), None)
    if bad is not None:
        raise StoreError(f"shard {name}: key {bad!r} holds a line break; keys.txt stores one key per line")
    finite = np.isfinite(scales) if scales is not None else np.isfinite(embeddings).all(axis=1)
    if not finite.all():
        broken = [keys[row] for row in np.flatnonzero(~finite)[:5]]
        raise StoreError(f"shard {name}: the encoder gave NaN or inf rows for {int((~finite).sum())} caption(s) "
                         f"(keys {', '.join(map(repr, broken))}{', ...' if (~finite).sum() > 5 else ''}); nothing "
                         "of the shard is written. Rows like these would turn the loss into NaN: an fp16/bf16 "
                         "overflow is the usual cause (try embed.precision=fp32 or bf16-mixed)")
    npy, keys_txt, counts, hashes_npy = shard_files(store_dir, name)
    # Each file's bytes are made in memory first, so that NAME.json can record the fingerprints of all
    # of them (the rows' included) and still be written before the rows.
    contents = {keys_txt: "".join(f"{k}\n" for k in keys).encode("utf-8"),
                hashes_npy: _npy_bytes(np.array([caption_hash(c) for c in captions], dtype=HASH_DTYPE))}
    if scales is not None:
        contents[scales_file(store_dir, name)] = _npy_bytes(np.asarray(scales, dtype=np.float32))
    contents[npy] = _npy_bytes(embeddings)
    entry = {**info, "count": len(keys), "files": {path.name: fingerprint_bytes(data) for path, data in contents.items()}}
    npy.unlink(missing_ok=True)  # from here on the shard counts as unfinished until its rows are in place
    # Temporaries of this shard left by a killed run (atomic_write names them .NAME.SUFFIX.PID.tmp);
    # only the rank that owns the shard writes it, so none of these is being written now.
    for stale in store_dir.glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)
    for path, data in contents.items():
        if path == npy:
            write_json(counts, entry)
        atomic_write(path, lambda f, data=data: f.write(data))
    return entry


def finished_shard(store_dir: str | Path, name: str) -> dict | None:
    """The counts of a shard whose files are complete, agree, and (where recorded) are the files the
    embed run wrote; else None (the shard must be redone)."""
    store_dir = Path(store_dir)
    npy, keys_txt, counts, hashes_npy = shard_files(store_dir, name)
    if not (npy.is_file() and keys_txt.is_file() and counts.is_file() and hashes_npy.is_file()):
        return None
    try:
        info = json.loads(counts.read_text(encoding="utf-8"))
        rows = np.load(npy, mmap_mode="r", allow_pickle=False)
        hashes = np.load(hashes_npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return None
    count = info.get("count") if isinstance(info, dict) else None
    if rows.ndim != 2 or rows.shape[0] != count or hashes.shape != (count,) or len(read_keys(keys_txt)) != count:
        return None
    if rows.dtype == np.int8:
        try:
            scales = np.load(scales_file(store_dir, name), mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError):
            return None
        if scales.shape != (count,):
            return None
    for file_name, recorded in (info.get("files") or {}).items():
        try:
            if fingerprint_file(store_dir / file_name) != recorded:
                return None
        except OSError:
            return None
    return info


def record_files(store_dir: str | Path, name: str) -> dict:
    """Record the fingerprints of shard `name`'s files as they are now (in NAME.json and the manifest),
    for a tool that rewrote them on purpose (e.g. to put the rows in another order); readers refuse
    shard files whose fingerprints differ from the recorded ones. Returns the shard's new entry.

    Raises StoreError when the manifest has no entry for the shard.
    """
    store_dir = Path(store_dir)
    entry = read_manifest(store_dir)["shards"].get(name)
    if entry is None:
        raise StoreError(f"embedding store {store_dir / MANIFEST} has no shard {name!r} to record the files of")
    entry = {**entry, "files": shard_fingerprints(store_dir, name)}
    write_json(shard_files(store_dir, name)[2], entry)
    record_shard(store_dir, name, entry)
    return entry
