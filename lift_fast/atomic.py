"""Atomic file writes: a temporary file beside the target, fsynced, then renamed over it, so a crash
never leaves a half-written manifest, config or result under its real name."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(file) on a temporary binary file beside `path`, fsync it, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | Path, obj: dict, indent: int = 1) -> None:
    """Write a JSON object (and a final newline) atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")
