"""Reading a finished store: per-shard keys, caption hashes and memory-mapped rows, each file checked
against the manifest when a shard is first opened (see lift_fast.store for the format).

    keys, embeddings, manifest = load_store("store/")       # everything, concatenated in shard order
    store = open_store("store/")                             # per-shard memmaps, for loaders
    rows = store.embeddings("00000")[store.row_index("00000")["000123"]]   # float32 when the store is int8

A reader keeps at most `open_shards` shards open (keys, caption hashes, memory map), dropping the
least recently used, so a pass over 128,000 shards holds as much as a pass over 64. When it opens a
shard it checks each file against the size and fingerprint the manifest recorded, and every row
for NaN or inf, so a replaced file or a broken row is an error naming shard and row before a step
trains on it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lift_fast.store.files import HASH_DTYPE, check_fingerprint, read_keys, scales_file, shard_files
from lift_fast.store.manifest import MANIFEST, StoreError, caption_sources, read_manifest

# Shards a reader keeps open per process, as the data reader keeps its indexes (lift_fast.data.reader):
# a mixing window's worth. Each costs its keys (~66 bytes a key as Python strings), caption hashes
# (8 bytes a row) and one memory map; see docs/formats.md for the figures at 1.28B samples.
OPEN_SHARDS = 64
# Rows checked at a time for NaN/inf: 16 MiB of float16 rows at D=4096, read with plain reads so that
# the check does not fault the whole shard into this process's memory map.
CHECK_ROWS = 2048
# The exponent field of an IEEE float of each width in bytes: all ones in a NaN or an inf, and only there.
EXPONENT_BITS = {2: 0x7C00, 4: 0x7F800000, 8: 0x7FF0000000000000}


class Int8Rows:
    """The rows of an int8 shard, dequantized on indexing: behaves like a read-only float32 array [count, dim].

    rows[i] -> [dim], rows[i:j] or rows[index_array] -> [n, dim], np.asarray(rows) -> all [count, dim];
    each float32, int8 row x its scale.
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, quantized: np.ndarray, scales: np.ndarray):
        self.quantized = quantized  # [count, dim] int8 (a memmap)
        self.scales = scales  # [count] float32
        self.shape = quantized.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple):  # rows[i, j:k]: dequantize the rows, then pick the columns
            rows = self[index[0]]
            return rows[index[1:]] if rows.ndim == 1 else rows[(slice(None), *index[1:])]
        scales = np.asarray(self.scales[index], dtype=np.float32)
        return np.asarray(self.quantized[index], dtype=np.float32) * scales[..., None]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype, copy=False)


@dataclass
class OpenShard:
    """What a reader holds for one open shard; each part is read on first use."""

    keys: list[str] | None = None
    rows: np.ndarray | Int8Rows | None = None  # a read-only memmap (or Int8Rows over one)
    hashes: np.ndarray | None = None  # [count] uint64


def nonfinite_rows(path: Path, rows: np.memmap) -> np.ndarray:
    """Indices of the rows of a float shard that hold a NaN or an inf (empty for int8 rows).

    path: the .npy file; rows: its memmap [count, dim] (only its layout is used: the rows are read
    CHECK_ROWS at a time with plain reads). A float is NaN or inf exactly when all its exponent bits
    are set; testing them on the integer view takes 4.4x less than a float32 row sum and 3.5x less
    than np.isfinite on 10,000 x 4096 float16 rows (bench/store_nonfinite.py, 2 EPYC cores).
    """
    if rows.dtype.kind != "f" or rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    count, dim = rows.shape
    bits = np.dtype(f"<u{rows.dtype.itemsize}")
    exponent = bits.type(EXPONENT_BITS[rows.dtype.itemsize])
    bad = []
    with open(path, "rb") as f:
        f.seek(rows.offset)
        for start in range(0, count, CHECK_ROWS):
            n = min(CHECK_ROWS, count - start)
            block = np.fromfile(f, dtype=rows.dtype, count=n * dim).reshape(n, dim).view(bits)
            full = np.bitwise_and(block, exponent, out=block).max(axis=1) == exponent
            bad.extend((start + np.flatnonzero(full)).tolist())
    return np.array(bad, dtype=np.int64)


class EmbeddingStore:
    """A finished store opened for reading: per-shard keys and memory-mapped rows, checked against the
    manifest, at most `open_shards` shards held at a time (least recently used dropped first).

    Picklable: a loader worker gets the manifest, not the parent's open shards.
    """

    def __init__(self, store_dir: str | Path, open_shards: int = OPEN_SHARDS):
        if open_shards < 1:
            raise ValueError(f"open_shards={open_shards}: a store reader keeps at least one shard open")
        self.path = Path(store_dir)
        self.manifest = read_manifest(self.path)
        self.manifest_path = self.path / MANIFEST
        self.dim = int(self.manifest["dim"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self.sources = caption_sources(self.manifest)  # caption sources, in row order within a key
        self.open_shards = open_shards
        missing = [s for s in self.manifest.get("data_shards", []) if s not in self.manifest["shards"]]
        if missing:
            raise StoreError(f"embedding store {self.path} is unfinished: {len(missing)} of "
                             f"{len(self.manifest['data_shards'])} data shards have no embeddings yet "
                             f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); run `lift-fast embed` again")
        self.shard_names: list[str] = list(self.manifest["shards"])
        self._open: OrderedDict[str, OpenShard] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"path": self.path, "open_shards": self.open_shards}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["open_shards"])

    def _shard(self, name: str) -> OpenShard:
        """The open shard `name`, opened (and the least recently used one dropped) when not open."""
        with self._lock:  # a loader's producer thread and the caller's may both read
            shard = self._open.get(name)
            if shard is not None:
                self._open.move_to_end(name)
                return shard
            self._check_name(name)
            shard = self._open[name] = OpenShard()
            # Dropping the last reference unmaps a shard's rows (numpy closes the map when the memmap is
            # freed); rows a caller still holds stay valid until it lets them go.
            while len(self._open) > self.open_shards:
                self._open.popitem(last=False)
            return shard

    def _file(self, name: str, path: Path) -> Path:
        """`path`, a file of shard `name`, after checking it against the fingerprint the manifest recorded (if any)."""
        check_fingerprint(path, (self.manifest["shards"][name].get("files") or {}).get(path.name), self.manifest_path)
        return path

    def keys(self, name: str) -> list[str]:
        """The sample keys of shard `name`, in row order."""
        shard = self._shard(name)
        if shard.keys is None:
            path = shard_files(self.path, name)[1]
            keys = read_keys(path)
            if len(keys) != self.manifest["shards"][name]["count"]:
                raise StoreError(f"{path}: {len(keys)} keys, the manifest says {self.manifest['shards'][name]['count']}")
            self._file(name, path)
            shard.keys = keys
        return shard.keys

    def embeddings(self, name: str) -> np.ndarray | Int8Rows:
        """The rows of shard `name` [count, dim]: a read-only memmap in the store's dtype, or for an int8
        store an Int8Rows that returns float32 rows when indexed (np.asarray(rows[i], dtype=np.float32)
        works the same for both).

        Raises StoreError naming the file when it is missing, unreadable, of another shape or dtype than
        the manifest says, not the file the embed run wrote, or holds a NaN or inf (naming row and key).
        """
        shard = self._shard(name)
        if shard.rows is None:
            npy = shard_files(self.path, name)[0]
            if not npy.is_file():
                raise StoreError(f"store shard {npy} does not exist (listed in {self.manifest_path})")
            try:
                rows = np.load(npy, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as err:
                raise StoreError(f"store shard {npy} cannot be read: {err}") from None
            count = self.manifest["shards"][name]["count"]
            if rows.shape != (count, self.dim) or rows.dtype != self.dtype:
                raise StoreError(f"store shard {npy}: rows {rows.shape} {rows.dtype}, the manifest says "
                                 f"({count}, {self.dim}) {self.dtype}")
            self._file(name, npy)
            bad = nonfinite_rows(npy, rows)
            if self.dtype == np.int8:
                scales = self._scales(name, count)
                bad = np.flatnonzero(~np.isfinite(scales))
            if len(bad):
                self._refuse_nonfinite(name, npy, bad)
            shard.rows = Int8Rows(rows, scales) if self.dtype == np.int8 else rows
        return shard.rows

    def _refuse_nonfinite(self, name: str, npy: Path, bad: np.ndarray) -> None:
        keys = self.keys(name)
        where = ", ".join(f"row {int(row)} (key {keys[int(row)]!r})" for row in bad[:5])
        scales = " (its scale in " + scales_file(self.path, name).name + ")" if self.dtype == np.int8 else ""
        raise StoreError(f"store shard {npy}: {len(bad)} row(s) hold NaN or inf{scales}: {where}"
                         f"{', ...' if len(bad) > 5 else ''}; a row like that would turn the loss into NaN. "
                         "Embed the shard again (remove its files and run lift-fast embed)")

    def _scales(self, name: str, count: int) -> np.ndarray:
        """The [count] float32 scales of int8 shard `name`; StoreError naming the file when missing or wrong."""
        path = scales_file(self.path, name)
        try:
            scales = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise StoreError(f"store shard scales {path} do not exist (the store is int8, see {self.manifest_path})") from None
        except (ValueError, OSError) as err:
            raise StoreError(f"store shard scales {path} cannot be read: {err}") from None
        if scales.shape != (count,) or scales.dtype != np.float32:
            raise StoreError(f"store shard scales {path}: {scales.shape} {scales.dtype}, the manifest says ({count},) float32")
        self._file(name, path)
        return scales

    def caption_hashes(self, name: str) -> np.ndarray:
        """The `caption_hash` of each row of shard `name`: a [count] uint64 array, in row order.

        Raises StoreError naming the file when it is missing, unreadable, of the wrong length or not
        the file the embed run wrote.
        """
        shard = self._shard(name)
        if shard.hashes is None:
            path = shard_files(self.path, name)[3]
            if not path.is_file():
                raise StoreError(f"store shard caption hashes {path} do not exist (listed in {self.manifest_path}); "
                                 "embed the data again into a new folder")
            try:
                hashes = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as err:
                raise StoreError(f"store shard caption hashes {path} cannot be read: {err}") from None
            count = self.manifest["shards"][name]["count"]
            if hashes.shape != (count,) or hashes.dtype != HASH_DTYPE:
                raise StoreError(f"store shard caption hashes {path}: {hashes.shape} {hashes.dtype}, the manifest "
                                 f"says ({count},) {HASH_DTYPE}")
            self._file(name, path)
            shard.hashes = hashes
        return shard.hashes

    def row_index(self, name: str) -> dict[str, int]:
        """Key -> row of shard `name`, the row of its first caption source (add s for source s: see the
        module docstring); a new dict each call: callers keep it as long as they need it."""
        rows: dict[str, int] = {}
        for row, key in enumerate(self.keys(name)):
            rows.setdefault(key, row)
        return rows

    def __len__(self) -> int:
        return sum(info["count"] for info in self.manifest["shards"].values())

    def _check_name(self, name: str) -> None:
        if name not in self.manifest["shards"]:
            raise StoreError(f"embedding store {self.path} has no shard {name!r}; "
                             f"it has {', '.join(self.shard_names[:5])}{', ...' if len(self.shard_names) > 5 else ''}")


def open_store(store_dir: str | Path, open_shards: int = OPEN_SHARDS) -> EmbeddingStore:
    """Open a finished store for reading, holding at most `open_shards` shards open at a time;
    raises StoreError naming the missing or bad file."""
    return EmbeddingStore(store_dir, open_shards)


def load_store(path: str | Path) -> tuple[list[str], np.ndarray, dict]:
    """All of a store in memory: keys (N), embeddings [N, D] in the store's dtype (float32, dequantized,
    for an int8 store), and the manifest.

    Rows follow the shards in name order, each in shard order; in a store of several caption sources
    a key appears once per source (its rows together, in the order of manifest["captions"]). Raises StoreError when the folder,
    manifest or a shard file is missing, disagrees with the manifest, or holds a NaN or inf row.
    """
    store = open_store(path)
    keys = [key for name in store.shard_names for key in store.keys(name)]
    parts = [np.asarray(store.embeddings(name)) for name in store.shard_names]
    row_dtype = np.float32 if store.dtype == np.int8 else store.dtype
    embeddings = np.concatenate(parts) if parts else np.zeros((0, store.dim), dtype=row_dtype)
    return keys, embeddings, store.manifest
