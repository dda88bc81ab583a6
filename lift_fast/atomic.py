"""Durable, atomic writes: a file or a whole folder is written under a temporary name, fsynced, then
renamed into place, and the folder holding it is fsynced after the rename.

Both fsyncs are needed for a power loss, not only for a crash: without the first the rename can
reach the disk before the data (an empty file under its real name); without the second the rename
itself may be lost. A crash or kill at any point leaves either the old file (or none) or the new one,
complete, under the real name, plus at most a temporary that the next writer of that name removes.

Stable names that other modules call: `atomic_write(path, write)`, `write_text`, `write_json`,
`fsync_dir(folder)`, `fsync_tree(folder)` and `publish_dir(tmp, final)`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# errno values of fsync on a folder whose file system cannot sync folders (some FUSE and network
# file systems): nothing more can be done there, and a run must not stop for it.
UNSYNCABLE_DIR = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def fsync_dir(path: str | Path) -> None:
    """fsync the folder `path` itself, which makes the creations, renames and deletions in it durable.

    A file system that cannot sync folders (EINVAL, ENOTSUP) is passed over. Raises OSError
    (FileNotFoundError, NotADirectoryError) when `path` is not an existing folder.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in UNSYNCABLE_DIR:
            raise
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """fsync a file written earlier (by a library that does not fsync, such as safetensors or torch.save)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under `folder`, then every folder under it deepest first, then `folder` itself."""
    folder = Path(folder)
    for parent, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(Path(parent) / name)
        fsync_dir(parent)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(file) on a temporary binary file beside `path`, fsync it, rename it to `path`, fsync
    the folder.

    The temporary is `.NAME.PID.tmp` in the same folder (removed on any error). An OSError from the
    write (no space left, a file-size limit) is raised again naming `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, f"{err.strerror or err} while writing", str(path)) from err
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically and durably."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | Path, obj: dict, indent: int = 1) -> None:
    """Write a JSON object (and a final newline) atomically and durably."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def publish_dir(tmp: str | Path, final: str | Path) -> Path:
    """Make the folder `tmp` (written in full) durable and rename it to `final`; returns `final`.

    Every file and folder under `tmp` is fsynced before the rename and the parent after it. An
    existing `final` is first renamed aside (and deleted after), so `final` never names a folder
    being deleted; `tmp` and `final` must be in the same folder (one file system).
    Raises ValueError when they are not, OSError from the file system.
    """
    tmp, final = Path(tmp), Path(final)
    if tmp.parent.resolve() != final.parent.resolve():
        raise ValueError(f"publish_dir: {tmp} and {final} must be in one folder for the rename to be atomic")
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".old_{final.name}.{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final
