"""img2dataset-style webdataset shards: `00000.tar` holding `KEY.jpg`, `KEY.txt`, `KEY.json`.

Reading is done here with `tarfile` (one pass, members grouped by key, as webdataset does) so that
every error can name the shard and the key; writing goes through webdataset's `ShardWriter`.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ShardError(ValueError):
    """A shard folder, shard or sample that cannot be read; the message names file and key."""


@dataclass
class Sample:
    """One sample of a shard: its key and the raw bytes of each member, by extension."""

    key: str
    shard: Path
    files: dict[str, bytes]

    def image_bytes(self) -> bytes:
        """The encoded image; raises ShardError when the sample has none."""
        for ext in IMAGE_EXTENSIONS:
            if ext in self.files:
                return self.files[ext]
        raise ShardError(f"{self.shard}: sample {self.key!r} has no image (.jpg/.png/.webp); it has {sorted(self.files)}")

    def caption(self) -> str:
        """The caption text (strict UTF-8, stripped); raises ShardError when missing or undecodable."""
        if "txt" not in self.files:
            raise ShardError(f"{self.shard}: sample {self.key!r} has no caption ({self.key}.txt is missing)")
        try:
            return self.files["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise ShardError(f"{self.shard}: caption {self.key}.txt is not UTF-8 ({err.reason} at byte {err.start})") from None


def list_shards(data_dir: str | Path) -> list[Path]:
    """The `*.tar` shards of a folder, sorted; raises ShardError if the folder or its shards are missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ShardError(f"shard folder {data_dir} does not exist")
    shards = sorted(data_dir.glob("*.tar"))
    if not shards:
        hint = [p.name for p in sorted(data_dir.iterdir()) if p.is_dir() and any(p.glob("*.tar"))]
        extra = f"; shards were found in its subfolders {', '.join(hint)}" if hint else ""
        raise ShardError(f"shard folder {data_dir} holds no .tar shards{extra}")
    return shards


def require_end_block(shard: Path, end: int) -> None:
    """Raise tarfile.ReadError unless an end-of-archive block follows the last member (at byte `end`).

    tarfile ends the member loop quietly when the file stops at a header boundary, so a shard cut
    between two members would read as a shorter, valid one.
    """
    with open(shard, "rb") as f:
        f.seek(end)
        marker = f.read(tarfile.BLOCKSIZE)
    if len(marker) < tarfile.BLOCKSIZE or marker.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive block at byte {end} of {shard.stat().st_size}")


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/000001.jpg' -> ('dir/000001', 'jpg'): the key is everything before the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_samples(shard: str | Path) -> Iterator[Sample]:
    """Yield the samples of one shard in tar order.

    Raises ShardError naming the shard if it is missing, empty, truncated or not a tar file.
    """
    shard = Path(shard)
    if not shard.is_file():
        raise ShardError(f"shard {shard} does not exist")
    if shard.stat().st_size == 0:
        raise ShardError(f"shard {shard} is empty (0 bytes)")
    current: Sample | None = None
    count = 0
    try:
        with tarfile.open(shard, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if current is not None and key != current.key:
                    yield current
                    count += 1
                    current = None
                if current is None:
                    current = Sample(key, shard, {})
                current.files[ext] = tar.extractfile(member).read()
        require_end_block(shard, tar.offset)
    except (tarfile.TarError, EOFError, OSError) as err:
        after = f" after sample {current.key!r}" if current else ""
        raise ShardError(f"shard {shard} is truncated or corrupt{after}: {err}") from None
    if current is not None:
        yield current
        count += 1
    if count == 0:
        raise ShardError(f"shard {shard} holds no samples")


class ShardWriter:
    """Write samples into numbered shards `00000.tar`, `00001.tar`, ... of `samples_per_shard` each.

    Member times are fixed (mtime 0), so the same samples give byte-identical shards.
    """

    def __init__(self, out_dir: str | Path, samples_per_shard: int = 1000):
        import webdataset as wds

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._writer = wds.ShardWriter(str(out_dir / "%05d.tar"), maxcount=samples_per_shard, verbose=0, mtime=0)

    def write(self, key: str, files: dict[str, bytes | str | dict]) -> None:
        """Add one sample; `files` maps extension ('jpg', 'txt', 'json') to its content."""
        self._writer.write({"__key__": key, **files})

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
