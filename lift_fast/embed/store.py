"""The embedding store: one file of caption embeddings per data shard, plus `manifest.json`.

    store/
      manifest.json      format version, encoder identity, dtype, dim, normalized, data shards, per-shard counts
      00000.keys.txt     one sample key per line, in shard order
      00000.json         count, skipped (with keys and reasons), truncated, duplicates, source tar stamp
      00000.caption_hash.npy  [count] uint64: blake2b-8 digest of the exact caption text of each row
      00000.scales.npy   [count] float32 per-row scales, int8 stores only (row = int8 row * scale)
      00000.npy          [count, dim] rows in the order of 00000.keys.txt (float16 by default)

Every file is written under a temporary name and renamed into place; a shard's `.npy` is written
last, so its presence marks a finished shard. Ranks of one job write disjoint shards and update
the manifest's per-shard counts under a file lock.

    keys, embeddings, manifest = load_store("store/")       # everything, concatenated in shard order
    store = open_store("store/")                             # per-shard memmaps, for loaders
    rows = store.embeddings("00000")[store.row_index("00000")["000123"]]   # float32 when the store is int8

The caption hashes let a loader check that the caption it reads for a key is the one that key's
row was made from: two data folders can share shard names and keys (`00000.tar`, key `00000000`),
and a by-key join alone would then pair images with another folder's captions without a word.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lift_fast.atomic import atomic_write, write_json

FORMAT = "lift-fast-embeddings"
# 2: per-row caption hashes (NAME.caption_hash.npy) and the data folder in the manifest.
# 3: int8 rows with per-row scales (NAME.scales.npy); encoder fields model_dim, append_eos, precision,
#    quantize. Version 2 stores are still read (they hold float rows; the new fields take LEGACY_DEFAULTS).
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
# The embed settings (EmbedConfig fields) that decide what a row means: the one list embed, train
# and eval take from their config to compare with a store's manifest (with the weights hash, see below).
# `dim` is embed.dim, Matryoshka truncation, where 0 asks for the model's full width (see check_manifest).
EMBED_SETTINGS = ("model", "pooling", "prompt", "max_length", "normalize", "dim")
# Fields that decide whether two stores' rows are interchangeable. `model` counts only when the
# weights hash is not known (the hash identifies the encoder better than the name it was given by);
# `path` and `revision` depend on the machine and are recorded for people, not compared.
MATCH_FIELDS = ("weights_sha256", *EMBED_SETTINGS, "append_eos", "dtype")
# How the rows were computed (and whether long captions got one): compared only when `embed` adds
# shards to an existing store, so that one store never mixes, say, fp8 and bf16 rows; readers (train,
# eval) accept any, as the rows agree to within the fidelity the embed run checked.
WRITE_FIELDS = ("precision", "quantize", "on_long")
# What a field absent from an older manifest stands for.
LEGACY_DEFAULTS = {"append_eos": False, "precision": "fp32", "quantize": "none", "on_long": "truncate"}
STORE_DTYPES = ("float16", "float32", "int8")
# Top-level manifest fields readers rely on, with their JSON types.
REQUIRED_FIELDS = {"encoder": dict, "dtype": str, "dim": int, "normalized": bool, "data_dir": str,
                   "data_shards": list, "shards": dict}
_JSON_NAMES = {dict: "object", str: "string", int: "integer", bool: "boolean", list: "array"}
HASH_DTYPE = np.dtype("<u8")


def caption_hash(caption: str) -> int:
    """A 64-bit digest (blake2b, 8 bytes, little-endian) of the exact caption text; stored per row."""
    return int.from_bytes(hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest(), "little")


class StoreError(ValueError):
    """A store folder, manifest or shard file that is missing or unreadable; the message names the file."""


class StoreMismatchError(StoreError):
    """A store made with another encoder or setting than the one asked for."""


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{what} {path} is not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise StoreError(f"{what} {path} does not hold a JSON object")
    return obj


# ---------------------------------------------------------------------------------------- manifest


def new_manifest(identity: dict, dtype: str, data_dir: str | Path) -> dict:
    """A manifest for an empty store of the shards in `data_dir` (recorded as an absolute path),
    written by the encoder with this identity (a TextEncoder.identity plus `quantize`), rows stored
    as `dtype` (one of STORE_DTYPES)."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"embed.dtype={dtype!r} is not one of {', '.join(STORE_DTYPES)}")
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "encoder": dict(identity),
        "dtype": dtype,
        "dim": identity["dim"],
        "normalized": identity["normalize"],
        "data_dir": str(Path(data_dir).resolve()),
        "data_shards": [],
        "shards": {},
    }


def read_manifest(store_dir: str | Path) -> dict:
    """The manifest of a store folder.

    Raises StoreError naming the folder or file when it is absent, not JSON, of another format or
    an older version (which must be embedded again), or lacks a required field (named).
    """
    store_dir = Path(store_dir)
    if not store_dir.is_dir():
        raise StoreError(f"embedding store {store_dir} does not exist (run `lift-fast embed` to make it)")
    path = store_dir / MANIFEST
    if not path.is_file():
        raise StoreError(f"embedding store {store_dir} has no {MANIFEST} ({path} is missing); "
                         "it is not a finished `lift-fast embed` output")
    manifest = _read_json(path, "store manifest")
    version = manifest.get("version")
    if manifest.get("format") == FORMAT and isinstance(version, int) and version < min(READABLE_VERSIONS):
        raise StoreError(f"{path}: embedding store format version {version} is older than this lift-fast's "
                         f"{FORMAT_VERSION} (it lacks the per-row caption hashes that guard the image-caption "
                         f"pairing); embed the data again into a new folder: lift-fast embed --data DIR --out NEW_DIR")
    if manifest.get("format") != FORMAT or version not in READABLE_VERSIONS:
        raise StoreError(f"{path}: format {manifest.get('format')!r} version {version!r} "
                         f"is not {FORMAT!r} version {' or '.join(map(str, READABLE_VERSIONS))}")
    for name, kind in REQUIRED_FIELDS.items():
        if name not in manifest:
            raise StoreError(f"{path}: required field {name!r} is missing")
        if not isinstance(manifest[name], kind) or (kind is int and isinstance(manifest[name], bool)):
            raise StoreError(f"{path}: field {name!r} must be a JSON {_JSON_NAMES[kind]}, "
                             f"got {manifest[name]!r}")
    if manifest["dtype"] not in STORE_DTYPES:
        raise StoreError(f"{path}: field 'dtype' must be one of {', '.join(STORE_DTYPES)}, got {manifest['dtype']!r}")
    for shard, info in manifest["shards"].items():
        count = info.get("count") if isinstance(info, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise StoreError(f"{path}: field 'shards.{shard}.count' must be a count of rows, got {count!r}")
    return manifest


def _found(manifest: dict, name: str):
    encoder = manifest.get("encoder", {})
    if name in encoder:
        return encoder[name]
    if name == "normalize":
        return manifest.get("normalized")
    if name in LEGACY_DEFAULTS and name not in manifest:
        return LEGACY_DEFAULTS[name]
    return manifest.get(name)


def _asked(expected: dict, manifest: dict, name: str) -> Any:
    """The value `expected` asks for `name`; embed.dim=0 (the model's full width) becomes that width."""
    value = expected[name]
    if name == "dim" and value == 0:
        encoder = manifest.get("encoder", {})
        return encoder.get("model_dim", _found(manifest, "dim"))  # version 2: never truncated
    return value


def check_manifest(manifest: dict, expected: dict, path: str | Path) -> None:
    """Refuse a store whose rows were made differently from what `expected` asks.

    expected: any of MATCH_FIELDS (e.g. a TextEncoder.identity, plus "dtype"); other keys are
    ignored, and `model` is compared only when `weights_sha256` is not given. `dim` 0 (embed.dim's
    default) asks for the model's full width, i.e. a store whose rows were not truncated.
    path: the manifest file (or the store folder), named in the message.
    Raises StoreMismatchError listing every field that differs, asked vs found.
    """
    path = Path(path)
    if path.name != MANIFEST:
        path = path / MANIFEST
    fields = [f for f in MATCH_FIELDS if f in expected and not (f == "model" and "weights_sha256" in expected)]
    differ = [(f, expected[f], _found(manifest, f)) for f in fields if _asked(expected, manifest, f) != _found(manifest, f)]
    if differ:
        lines = "\n".join(f"  {f}: asked {asked!r}{_full_width(f, asked, manifest)}, found {found!r}"
                          for f, asked, found in differ)
        encoder = manifest.get("encoder", {})
        context = (f"\n  (asked encoder {_where(expected)}; the store was made by {_where(encoder)})"
                   if any(f in ("weights_sha256", "model") for f, _, _ in differ) else "")
        raise StoreMismatchError(
            f"embedding store manifest {path} does not match what was asked ({len(differ)} "
            f"{'fields differ' if len(differ) > 1 else 'field differs'}):\n{lines}{context}\n"
            "Use another store folder, or the settings the store was made with.")


def _full_width(field: str, asked: Any, manifest: dict) -> str:
    return f" (the model's full width, {_asked({'dim': 0}, manifest, 'dim')})" if field == "dim" and asked == 0 else ""


def _where(identity: dict) -> str:
    """'name' or 'name' at PATH, when the path is known."""
    path = identity.get("path")
    return f"{identity.get('model')!r}" + (f" at {path}" if path else "")


@contextlib.contextmanager
def manifest_lock(store_dir: Path) -> Iterator[None]:
    """An exclusive lock for read-modify-write of the manifest by several ranks (flock on a local FS)."""
    with open(store_dir / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_for_writing(store_dir: str | Path, identity: dict, dtype: str, data_shards: list[str],
                     data_dir: str | Path) -> dict:
    """Create the store (folder and manifest) or check that an existing one matches; return its manifest.

    identity: the encoder's identity; dtype: storage dtype; data_shards: names of all shards of the
    data; data_dir: the shard folder they are in (the manifest records its absolute path).
    Raises StoreMismatchError (nothing is touched) when the store was made with another encoder or
    setting, or from another data folder, and StoreError when the folder holds shard files but no
    manifest, or is a store of an older format.
    """
    store_dir = Path(store_dir)
    data_dir = Path(data_dir).resolve()
    check_for_writing(store_dir, identity, dtype, data_dir)  # refuse before creating anything (the lock file included)
    store_dir.mkdir(parents=True, exist_ok=True)
    with manifest_lock(store_dir):
        for stale in store_dir.glob(f".{MANIFEST}.*.tmp"):  # left by a killed run; the lock keeps out live writers
            stale.unlink(missing_ok=True)
        path = store_dir / MANIFEST
        if path.exists():
            manifest = _check_existing(store_dir, identity, dtype, data_dir)
        else:
            strays = sorted(p.name for p in store_dir.glob("*.npy"))
            if strays:
                raise StoreError(f"{store_dir} holds embedding files ({', '.join(strays[:3])}, ...) but no {MANIFEST}; "
                                 "its encoder is unknown, so lift-fast will not add to it: use an empty folder")
            manifest = new_manifest(identity, dtype, data_dir)
        manifest["data_shards"] = sorted(set(manifest["data_shards"]) | set(data_shards))
        write_json(path, manifest)
    return manifest


def check_for_writing(store_dir: str | Path, identity: dict, dtype: str, data_dir: str | Path) -> None:
    """Refuse, touching nothing, to add to an existing store made otherwise (see open_for_writing);
    a folder without a manifest passes."""
    if (Path(store_dir) / MANIFEST).exists():
        _check_existing(Path(store_dir), identity, dtype, Path(data_dir).resolve())


def _check_existing(store_dir: Path, identity: dict, dtype: str, data_dir: Path) -> dict:
    """The manifest of an existing store after checking it was made by this encoder from `data_dir`."""
    path = store_dir / MANIFEST
    manifest = read_manifest(store_dir)
    check_manifest(manifest, {**identity, "dtype": dtype}, path)
    differ = [(f, identity[f], _found(manifest, f)) for f in WRITE_FIELDS
              if f in identity and identity[f] != _found(manifest, f)]
    if differ:
        lines = "; ".join(f"embed.{f}: asked {asked!r}, found {found!r}" for f, asked, found in differ)
        raise StoreMismatchError(
            f"embedding store manifest {path}: its rows were computed differently ({lines}); one store never "
            "mixes rows of two precisions or quantizations. Use the store's settings to add to it, or another folder.")
    if manifest["data_dir"] != str(data_dir):
        raise StoreMismatchError(
            f"embedding store {store_dir} was made from the shards in {manifest['data_dir']}, not from {data_dir} "
            f"(recorded in {path}); its finished shards would be kept or overwritten by another folder's "
            "shards of the same names. Use another --out folder for this data.")
    return manifest


def record_fields(store_dir: str | Path, **fields: Any) -> None:
    """Set top-level manifest fields (e.g. the quantized encoder's measured `fidelity`), under the lock."""
    store_dir = Path(store_dir)
    with manifest_lock(store_dir):
        manifest = read_manifest(store_dir)
        manifest.update(fields)
        write_json(store_dir / MANIFEST, manifest)


def record_shard(store_dir: str | Path, name: str, info: dict) -> None:
    """Add or replace the counts of one finished shard in the manifest (under the lock)."""
    store_dir = Path(store_dir)
    with manifest_lock(store_dir):
        manifest = read_manifest(store_dir)
        manifest["shards"][name] = info
        manifest["shards"] = dict(sorted(manifest["shards"].items()))
        write_json(store_dir / MANIFEST, manifest)


# ---------------------------------------------------------------------------------------- shard files


def shard_files(store_dir: Path, name: str) -> tuple[Path, Path, Path, Path]:
    """(rows .npy, keys .keys.txt, counts .json, caption hashes .caption_hash.npy) of one shard."""
    return (store_dir / f"{name}.npy", store_dir / f"{name}.keys.txt", store_dir / f"{name}.json",
            store_dir / f"{name}.caption_hash.npy")


def scales_file(store_dir: Path, name: str) -> Path:
    """The per-row float32 scales of an int8 shard."""
    return store_dir / f"{name}.scales.npy"


def quantize_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: rows [N, D] float -> (int8 [N, D], float32 scales [N]), row ~ int8 * scale.

    The scale is the row's largest magnitude / 127 (1 for an all-zero row), so each element is off by
    at most half a scale step.
    """
    rows = np.asarray(rows, dtype=np.float32)
    peak = np.abs(rows).max(axis=1) if rows.size else np.zeros(rows.shape[0], dtype=np.float32)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(rows / scales[:, None]), -127, 127).astype(np.int8)
    return quantized, scales


def store_rows(rows: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float rows [N, D] in the storage dtype: (rows, None) for float16/float32, (int8 rows, scales [N]) for int8."""
    if dtype == "int8":
        return quantize_rows(rows)
    return np.asarray(rows).astype(dtype), None


def write_shard(store_dir: str | Path, name: str, keys: list[str], embeddings: np.ndarray, info: dict,
                captions: list[str], scales: np.ndarray | None = None) -> None:
    """Write one shard's keys, counts, caption hashes, scales and rows [len(keys), D], each atomically,
    the rows last.

    captions: the exact text each row was embedded from (its hash is stored, see `caption_hash`).
    scales: [len(keys)] float32, with int8 rows only (see `store_rows`).
    Raises ValueError when the lengths disagree or int8 rows come without scales, and StoreError naming
    the key when a key holds a line break.
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
    hashes = np.array([caption_hash(c) for c in captions], dtype=HASH_DTYPE)
    npy, keys_txt, counts, hashes_npy = shard_files(store_dir, name)
    npy.unlink(missing_ok=True)  # from here on the shard counts as unfinished until its rows are in place
    # Temporaries of this shard left by a killed run (atomic_write names them .NAME.SUFFIX.PID.tmp);
    # only the rank that owns the shard writes it, so none of these is being written now.
    for stale in store_dir.glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)
    atomic_write(keys_txt, lambda f: f.write("".join(f"{k}\n" for k in keys).encode("utf-8")))
    atomic_write(hashes_npy, lambda f: np.save(f, hashes, allow_pickle=False))
    write_json(counts, {**info, "count": len(keys)})
    if scales is not None:
        atomic_write(scales_file(store_dir, name),
                     lambda f: np.save(f, np.ascontiguousarray(scales, dtype=np.float32), allow_pickle=False))
    atomic_write(npy, lambda f: np.save(f, np.ascontiguousarray(embeddings), allow_pickle=False))


def read_keys(path: Path) -> list[str]:
    """The keys of a .keys.txt file, one per line."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise StoreError(f"store shard keys {path} does not exist") from None


def finished_shard(store_dir: str | Path, name: str) -> dict | None:
    """The counts of a shard whose files are complete and agree, else None (the shard must be redone)."""
    npy, keys_txt, counts, hashes_npy = shard_files(Path(store_dir), name)
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
            scales = np.load(scales_file(Path(store_dir), name), mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError):
            return None
        if scales.shape != (count,):
            return None
    return info


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


# ---------------------------------------------------------------------------------------- reading


class EmbeddingStore:
    """A finished store opened for reading: per-shard keys and memory-mapped rows, checked against the manifest."""

    def __init__(self, store_dir: str | Path):
        self.path = Path(store_dir)
        self.manifest = read_manifest(self.path)
        self.dim = int(self.manifest["dim"])
        self.dtype = np.dtype(self.manifest["dtype"])
        missing = [s for s in self.manifest.get("data_shards", []) if s not in self.manifest["shards"]]
        if missing:
            raise StoreError(f"embedding store {self.path} is unfinished: {len(missing)} of "
                             f"{len(self.manifest['data_shards'])} data shards have no embeddings yet "
                             f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); run `lift-fast embed` again")
        self.shard_names: list[str] = list(self.manifest["shards"])
        self._keys: dict[str, list[str]] = {}
        self._rows: dict[str, np.ndarray] = {}
        self._hashes: dict[str, np.ndarray] = {}

    def keys(self, name: str) -> list[str]:
        """The sample keys of shard `name`, in row order."""
        if name not in self._keys:
            self._check_name(name)
            keys = read_keys(shard_files(self.path, name)[1])
            if len(keys) != self.manifest["shards"][name]["count"]:
                raise StoreError(f"{shard_files(self.path, name)[1]}: {len(keys)} keys, the manifest says "
                                 f"{self.manifest['shards'][name]['count']}")
            self._keys[name] = keys
        return self._keys[name]

    def embeddings(self, name: str) -> np.ndarray | Int8Rows:
        """The rows of shard `name` [count, dim]: a read-only memmap in the store's dtype, or for an int8
        store an Int8Rows that returns float32 rows when indexed (np.asarray(rows[i], dtype=np.float32)
        works the same for both)."""
        if name not in self._rows:
            self._check_name(name)
            npy = shard_files(self.path, name)[0]
            if not npy.is_file():
                raise StoreError(f"store shard {npy} does not exist (listed in {self.path / MANIFEST})")
            try:
                rows = np.load(npy, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as err:
                raise StoreError(f"store shard {npy} cannot be read: {err}") from None
            count = self.manifest["shards"][name]["count"]
            if rows.shape != (count, self.dim) or rows.dtype != self.dtype:
                raise StoreError(f"store shard {npy}: rows {rows.shape} {rows.dtype}, the manifest says "
                                 f"({count}, {self.dim}) {self.dtype}")
            self._rows[name] = Int8Rows(rows, self._scales(name, count)) if self.dtype == np.int8 else rows
        return self._rows[name]

    def _scales(self, name: str, count: int) -> np.ndarray:
        """The [count] float32 scales of int8 shard `name`; StoreError naming the file when missing or wrong."""
        path = scales_file(self.path, name)
        try:
            scales = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise StoreError(f"store shard scales {path} do not exist (the store is int8, see {self.path / MANIFEST})") from None
        except (ValueError, OSError) as err:
            raise StoreError(f"store shard scales {path} cannot be read: {err}") from None
        if scales.shape != (count,) or scales.dtype != np.float32:
            raise StoreError(f"store shard scales {path}: {scales.shape} {scales.dtype}, the manifest says ({count},) float32")
        return scales

    def caption_hashes(self, name: str) -> np.ndarray:
        """The `caption_hash` of each row of shard `name`: a [count] uint64 array, in row order.

        Raises StoreError naming the file when it is missing, unreadable or of the wrong length.
        """
        if name not in self._hashes:
            self._check_name(name)
            path = shard_files(self.path, name)[3]
            if not path.is_file():
                raise StoreError(f"store shard caption hashes {path} do not exist (listed in {self.path / MANIFEST}); "
                                 "embed the data again into a new folder")
            try:
                hashes = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as err:
                raise StoreError(f"store shard caption hashes {path} cannot be read: {err}") from None
            count = self.manifest["shards"][name]["count"]
            if hashes.shape != (count,) or hashes.dtype != HASH_DTYPE:
                raise StoreError(f"store shard caption hashes {path}: {hashes.shape} {hashes.dtype}, the manifest "
                                 f"says ({count},) {HASH_DTYPE}")
            self._hashes[name] = hashes
        return self._hashes[name]

    def row_index(self, name: str) -> dict[str, int]:
        """Key -> row of shard `name`."""
        return {key: row for row, key in enumerate(self.keys(name))}

    def __len__(self) -> int:
        return sum(info["count"] for info in self.manifest["shards"].values())

    def _check_name(self, name: str) -> None:
        if name not in self.manifest["shards"]:
            raise StoreError(f"embedding store {self.path} has no shard {name!r}; "
                             f"it has {', '.join(self.shard_names[:5])}{', ...' if len(self.shard_names) > 5 else ''}")


def open_store(store_dir: str | Path) -> EmbeddingStore:
    """Open a finished store for reading; raises StoreError naming the missing or bad file."""
    return EmbeddingStore(store_dir)


def load_store(path: str | Path) -> tuple[list[str], np.ndarray, dict]:
    """All of a store in memory: keys (N), embeddings [N, D] in the store's dtype (float32, dequantized,
    for an int8 store), and the manifest.

    Rows follow the shards in name order, each in shard order. Raises StoreError when the folder,
    manifest or a shard file is missing or disagrees with the manifest.
    """
    store = open_store(path)
    keys = [key for name in store.shard_names for key in store.keys(name)]
    parts = [np.asarray(store.embeddings(name)) for name in store.shard_names]
    row_dtype = np.float32 if store.dtype == np.int8 else store.dtype
    embeddings = np.concatenate(parts) if parts else np.zeros((0, store.dim), dtype=row_dtype)
    return keys, embeddings, store.manifest
