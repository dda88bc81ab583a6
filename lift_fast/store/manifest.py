"""The embedding store's manifest: what made the rows (encoder, settings, dtype), which data they
are from, and each finished shard's counts and file fingerprints; plus the lock under which the
ranks of one embed job update it.

Readers check a manifest against what they are asked for (`check_manifest`); the embed run creates
or checks one before it writes a row (`open_for_writing`). docs/formats.md has the fields and the
version rules.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lift_fast.atomic import write_json

FORMAT = "lift-fast-embeddings"
# 2: per-row caption hashes (NAME.caption_hash.npy) and the data folder in the manifest.
# 3: int8 rows with per-row scales (NAME.scales.npy); encoder fields model_dim, append_eos, precision,
#    quantize. Version 2 stores are still read (they hold float rows; the new fields take LEGACY_DEFAULTS).
# 4: each shard's entry records its files' sizes and fingerprints (`files`, checked when a reader opens
#    the shard), and the encoder's `weights_fingerprint` (paths, sizes, times, inodes of its weight files, so
#    that train and eval can take `weights_sha256` from here instead of hashing GBs again). Version 2
#    and 3 stores are still read, without the file check.
# 5: several caption sources (`captions`, e.g. ["txt", "json:re_caption"]): one row per (key, source),
#    a key's rows together in the order of `captions`; older stores read as the one source "txt".
FORMAT_VERSION = 5
READABLE_VERSIONS = (2, 3, 4, 5)
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


def new_manifest(identity: dict, dtype: str, data_dir: str | Path, captions: tuple[str, ...] = ("txt",)) -> dict:
    """A manifest for an empty store of the shards in `data_dir` (recorded as an absolute path),
    written by the encoder with this identity (a TextEncoder.identity plus `quantize`), rows stored
    as `dtype` (one of STORE_DTYPES), one row per key and caption source in `captions`."""
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
        "captions": list(captions),
        "data_shards": [],
        "shards": {},
    }


def caption_sources(manifest: dict) -> tuple[str, ...]:
    """The caption sources of a store, in row order within a key ("txt" for a store older than version 5)."""
    return tuple(manifest.get("captions", ["txt"]))


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
    captions = manifest.get("captions", ["txt"])
    if (not isinstance(captions, list) or not captions or len(set(map(str, captions))) != len(captions)
            or not all(isinstance(c, str) and c for c in captions)):
        raise StoreError(f"{path}: field 'captions' must be a list of distinct caption source names, got {captions!r}")
    if manifest["dtype"] not in STORE_DTYPES:
        raise StoreError(f"{path}: field 'dtype' must be one of {', '.join(STORE_DTYPES)}, got {manifest['dtype']!r}")
    for shard, info in manifest["shards"].items():
        count = info.get("count") if isinstance(info, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise StoreError(f"{path}: field 'shards.{shard}.count' must be a count of rows, got {count!r}")
        files = info.get("files", {})
        if not isinstance(files, dict) or not all(
                isinstance(f, dict) and isinstance(f.get("bytes"), int) and isinstance(f.get("ends_sha256"), str)
                for f in files.values()):
            raise StoreError(f"{path}: field 'shards.{shard}.files' must map file names to "
                             f'{{"bytes": size, "ends_sha256": hex digest}}, got {files!r}')
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
                     data_dir: str | Path, captions: tuple[str, ...] = ("txt",)) -> dict:
    """Create the store (folder and manifest) or check that an existing one matches; return its manifest.

    identity: the encoder's identity; dtype: storage dtype; data_shards: names of all shards of the
    data; data_dir: the shard folder they are in (the manifest records its absolute path); captions:
    the caption sources (embed.captions).
    Raises StoreMismatchError (nothing is touched) when the store was made with another encoder,
    setting or caption sources, or from another data folder, and StoreError when the folder holds shard files but no
    manifest, or is a store of an older format.
    """
    store_dir = Path(store_dir)
    data_dir = Path(data_dir).resolve()
    check_for_writing(store_dir, identity, dtype, data_dir, captions)  # refuse before creating anything (the lock file included)
    store_dir.mkdir(parents=True, exist_ok=True)
    with manifest_lock(store_dir):
        for stale in store_dir.glob(f".{MANIFEST}.*.tmp"):  # left by a killed run; the lock keeps out live writers
            stale.unlink(missing_ok=True)
        path = store_dir / MANIFEST
        if path.exists():
            manifest = _check_existing(store_dir, identity, dtype, data_dir, captions)
        else:
            strays = sorted(p.name for p in store_dir.glob("*.npy"))
            if strays:
                raise StoreError(f"{store_dir} holds embedding files ({', '.join(strays[:3])}, ...) but no {MANIFEST}; "
                                 "its encoder is unknown, so lift-fast will not add to it: use an empty folder")
            manifest = new_manifest(identity, dtype, data_dir, captions)
        manifest["data_shards"] = sorted(set(manifest["data_shards"]) | set(data_shards))
        write_json(path, manifest)
    return manifest


def check_for_writing(store_dir: str | Path, identity: dict, dtype: str, data_dir: str | Path,
                      captions: tuple[str, ...] = ("txt",)) -> None:
    """Refuse, touching nothing, to add to an existing store made otherwise (see open_for_writing);
    a folder without a manifest passes."""
    if (Path(store_dir) / MANIFEST).exists():
        _check_existing(Path(store_dir), identity, dtype, Path(data_dir).resolve(), captions)


def _check_existing(store_dir: Path, identity: dict, dtype: str, data_dir: Path, captions: tuple[str, ...]) -> dict:
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
    if caption_sources(manifest) != tuple(captions):
        raise StoreMismatchError(
            f"embedding store manifest {path}: its rows are of the caption sources {', '.join(caption_sources(manifest))}, "
            f"not embed.captions={','.join(captions)}; one store holds one set of sources. Use the store's "
            "embed.captions to add to it, or another --out folder.")
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
