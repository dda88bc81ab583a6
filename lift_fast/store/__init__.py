"""The embedding store: one file of caption embeddings per data shard, plus `manifest.json`.

The store sits below both stages that touch it: the embed stage (lift_fast.embed) writes it, the
data loader (lift_fast.data) and eval read it. It imports neither, so imports point down:
embed -> data, store; data -> store; store -> lift_fast.atomic only.

    store/
      manifest.json      format version, encoder identity, dtype, dim, normalized, data shards, per-shard
                         counts and file fingerprints
      00000.keys.txt     one sample key per row, in shard order (a key once per caption source, its rows together)
      00000.json         count, skipped (with keys and reasons), truncated, duplicates, source tar stamp, files
      00000.caption_hash.npy  [count] uint64: blake2b-8 digest of the exact caption text of each row
      00000.scales.npy   [count] float32 per-row scales, int8 stores only (row = int8 row * scale)
      00000.npy          [count, dim] rows in the order of 00000.keys.txt (float16 by default)

A store of several caption sources (manifest `captions`, e.g. ["txt", "json:re_caption"]) holds one row
per (key, source): the rows of a key follow each other in the order of `captions`, so the row of
source s is row_index(name)[key] + s, and a sample with a source missing has none of its rows.

Four modules: manifest (format, identity checks, the lock), files (file names, caption hashes,
fingerprints), writer (rows in the storage dtype, writing a shard atomically: every file under a
temporary name, fsynced and renamed, the `.npy` last so that its presence marks a finished shard)
and reader (open_store, load_store). Every public name of the four is importable from here.

    keys, embeddings, manifest = load_store("store/")       # everything, concatenated in shard order
    store = open_store("store/")                             # per-shard memmaps, for loaders

The caption hashes let a loader check that the caption it reads for a key is the one that key's
row was made from: two data folders can share shard names and keys (`00000.tar`, key `00000000`),
and a by-key join alone would then pair images with another folder's captions without a word.
"""

from lift_fast.store.files import (
    FINGERPRINT_ENDS,
    HASH_DTYPE,
    caption_hash,
    check_fingerprint,
    fingerprint_bytes,
    fingerprint_file,
    read_keys,
    scales_file,
    shard_files,
    shard_fingerprints,
)
from lift_fast.store.manifest import (
    EMBED_SETTINGS,
    FORMAT,
    FORMAT_VERSION,
    LEGACY_DEFAULTS,
    MANIFEST,
    MATCH_FIELDS,
    READABLE_VERSIONS,
    STORE_DTYPES,
    WRITE_FIELDS,
    StoreError,
    StoreMismatchError,
    caption_sources,
    check_for_writing,
    check_manifest,
    manifest_lock,
    new_manifest,
    open_for_writing,
    read_manifest,
    record_fields,
    record_shard,
)
from lift_fast.store.reader import (
    CHECK_ROWS,
    OPEN_SHARDS,
    EmbeddingStore,
    Int8Rows,
    OpenShard,
    load_store,
    nonfinite_rows,
    open_store,
)
from lift_fast.store.writer import finished_shard, quantize_rows, record_files, store_rows, write_shard

__all__ = [
    "CHECK_ROWS", "EMBED_SETTINGS", "FINGERPRINT_ENDS", "FORMAT", "FORMAT_VERSION", "HASH_DTYPE", "LEGACY_DEFAULTS",
    "MANIFEST", "MATCH_FIELDS", "OPEN_SHARDS", "READABLE_VERSIONS", "STORE_DTYPES", "WRITE_FIELDS",
    "EmbeddingStore", "Int8Rows", "OpenShard", "StoreError", "StoreMismatchError", "caption_hash",
    "caption_sources", "check_fingerprint", "check_for_writing", "check_manifest", "finished_shard",
    "fingerprint_bytes", "fingerprint_file", "load_store", "manifest_lock", "new_manifest", "nonfinite_rows",
    "open_for_writing", "open_store", "quantize_rows", "read_keys", "read_manifest", "record_fields",
    "record_files", "record_shard", "scales_file", "shard_files", "shard_fingerprints", "store_rows",
    "write_shard",
]
