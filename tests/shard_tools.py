"""Helpers for tests that build or damage shards and stores by hand (plain tarfile, no webdataset)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def read_members(shard: Path) -> list[tuple[str, bytes]]:
    """(member name, content) of every file in a tar, in order."""
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def write_members(shard: Path, members: list[tuple[str, bytes]]) -> None:
    """Write (member name, content) pairs as a tar, in the given order."""
    shard.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under a folder (hidden ones too): relative path -> (bytes, mtime_ns)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}
