"""SugarCrepe compositionality benchmark files.

SugarCrepe ships one JSON file per negative category (`swap_att.json`, `replace_rel.json`, ...),
each an object from item id to an item:

    {"0": {"filename": "000000391895.jpg", "caption": "...", "negative_caption": "..."}, "1": ...}

The image of an item is found by its key: the filename without directory and extension.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

REQUIRED_FIELDS = ("filename", "caption", "negative_caption")


class SugarCrepeError(ValueError):
    """A SugarCrepe folder, file or item that cannot be used; the message names file and item id."""


def _reject_duplicate_ids(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.load keeps the last of two equal keys silently; a duplicated id means a broken file.
    result: dict[str, object] = {}
    for name, value in pairs:
        if name in result:
            raise SugarCrepeError(f"duplicate key {name!r}")
        result[name] = value
    return result


def _read_item(path: Path, item_id: str, item: object) -> dict[str, str]:
    if not isinstance(item, dict):
        raise SugarCrepeError(f"{path}: item {item_id!r} must be an object, got {type(item).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in item:
            raise SugarCrepeError(f"{path}: item {item_id!r} has no {field!r} field; it has {sorted(item)}")
        value = item[field]
        if not isinstance(value, str):
            raise SugarCrepeError(f"{path}: item {item_id!r} field {field!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise SugarCrepeError(f"{path}: item {item_id!r} field {field!r} is empty")
    filename = item["filename"].strip()
    return {
        "id": item_id,
        "filename": filename,
        "key": PurePosixPath(filename).stem,
        "caption": item["caption"].strip(),
        "negative_caption": item["negative_caption"].strip(),
    }


def load_category(path: str | Path) -> list[dict[str, str]]:
    """Read one SugarCrepe category file.

    Returns its items in numeric order of their ids, each a dict with `id`, `filename`, `key`
    (filename without directory and extension), `caption` and `negative_caption` (stripped).
    Raises SugarCrepeError naming the file (and item id) for unreadable or invalid JSON, a top
    level that is not a non-empty object, a non-integer or duplicate id, an item that is not an
    object, or a missing, non-string or empty field.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_reject_duplicate_ids)
    except SugarCrepeError as error:
        raise SugarCrepeError(f"{path}: {error}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SugarCrepeError(f"{path}: cannot read as JSON: {error}") from error
    if not isinstance(data, dict):
        raise SugarCrepeError(f"{path}: top level must be an object of id -> item, got {type(data).__name__}")
    if not data:
        raise SugarCrepeError(f"{path}: has no items")
    numbered: dict[int, str] = {}
    for item_id in data:
        try:
            number = int(item_id)
        except ValueError:
            raise SugarCrepeError(f"{path}: item id {item_id!r} is not an integer") from None
        if number in numbered:
            raise SugarCrepeError(f"{path}: item ids {numbered[number]!r} and {item_id!r} are the same number")
        numbered[number] = item_id
    return [_read_item(path, numbered[number], data[numbered[number]]) for number in sorted(numbered)]


def load_sugarcrepe(folder: str | Path) -> dict[str, list[dict[str, str]]]:
    """Read every `*.json` file of a SugarCrepe folder.

    Returns category name (the file stem, e.g. `swap_att`) -> that file's items, as
    `load_category` returns them; categories in sorted order. Raises SugarCrepeError when the
    folder is missing or holds no `*.json` file, or when any file is invalid (see `load_category`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SugarCrepeError(f"SugarCrepe folder {folder} does not exist or is not a folder")
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise SugarCrepeError(f"SugarCrepe folder {folder} holds no *.json category files")
    return {path.stem: load_category(path) for path in paths}
