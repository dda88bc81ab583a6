"""A pass over thousands of store shards, through the store and through the loader, keeps memory and
memory maps flat in the number of shards (the store keeps at most `open_shards` open), and the same
pass with an unbounded cache shows the growth the bound prevents (so the measurement can see it)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_tools import write_members

from lift_fast.data.loader import build_loader
from lift_fast.store.files import HASH_DTYPE, caption_hash, fingerprint_bytes
from lift_fast.store.manifest import FORMAT, FORMAT_VERSION
from lift_fast.store.reader import OPEN_SHARDS, open_store
from lift_fast.store.writer import _npy_bytes

SHARDS = 2500
ROWS = 200  # keys per shard: what the cache holds per shard is mostly these strings
DIM = 8


def write_tiny_store(folder, shards: int, rows: int, dim: int, key=lambda shard, row: f"{shard:06d}-{row:05d}",
                     hashes=lambda shard, row: row) -> list[str]:
    """A store of `shards` float16 shards written directly (no fsync: thousands of files in a few seconds),
    with the manifest a real embed run would write (fingerprints included); key(shard number, row)
    names each sample and hashes(shard number, row) gives its caption hash. Returns the shard names."""
    folder.mkdir()
    names = [f"{i:06d}" for i in range(shards)]
    entries = {}
    block = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float16)
    for number, name in enumerate(names):
        contents = {f"{name}.keys.txt": "".join(f"{key(number, row)}\n" for row in range(rows)).encode(),
                    f"{name}.caption_hash.npy": _npy_bytes(np.array([hashes(number, row) for row in range(rows)],
                                                                    dtype=HASH_DTYPE)),
                    f"{name}.npy": _npy_bytes(block)}
        for file_name, data in contents.items():
            (folder / file_name).write_bytes(data)
        entries[name] = {"count": rows, "files": {n: fingerprint_bytes(d) for n, d in contents.items()}}
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "encoder": {"model": "tiny", "dim": dim},
                "dtype": "float16", "dim": dim, "normalized": False, "data_dir": str(folder),
                "data_shards": names, "shards": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return names


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maps_of(folder) -> int:
    """Memory maps of files in `folder` held by this process."""
    with open("/proc/self/maps") as f:
        return sum(str(folder) in line for line in f)


def walk(store, names) -> float:
    """What the data reader does when it opens a shard: key -> row map, caption hash and row of a sample."""
    total = 0.0
    for name in names:
        row = store.row_index(name)[f"{name}-00003"]
        assert int(store.caption_hashes(name)[row]) == 3
        total += float(np.asarray(store.embeddings(name)[row], dtype=np.float32).sum())
    return total


def measure_a_pass(folder: Path) -> None:
    """Walk the store in `folder` with the bound and without it, asserting flat memory and maps with it
    and the growth without it (which shows that the measurement sees the cache)."""
    names = json.loads((folder / "manifest.json").read_text())["data_shards"]
    store = open_store(folder)
    warm = len(names) // 10
    walk(store, names[:warm])  # the cache fills to its bound, the allocator to its working size
    rss_warm, maps_warm = resident_bytes(), maps_of(folder)
    walk(store, names[warm:])
    rss_end, maps_end = resident_bytes(), maps_of(folder)
    assert maps_warm <= OPEN_SHARDS and maps_end <= OPEN_SHARDS
    assert len(store._open) == OPEN_SHARDS
    bounded_growth = rss_end - rss_warm
    assert bounded_growth < 4 << 20, f"RSS grew {bounded_growth / 2**20:.1f} MiB over {len(names) - warm} shards"
    del store
    assert maps_of(folder) == 0  # dropping the store unmaps what it held

    # The same pass with no bound: every shard stays mapped and its keys stay in memory.
    unbounded = open_store(folder, open_shards=len(names) + 1)
    rss_start = resident_bytes()
    walk(unbounded, names)
    assert maps_of(folder) == len(names)
    unbounded_growth = resident_bytes() - rss_start
    per_shard = unbounded_growth / len(names)
    assert per_shard > ROWS * 40, f"only {per_shard:.0f} bytes per shard: the measurement does not see the cache"
    assert unbounded_growth > 5 * max(bounded_growth, 1 << 20)


@pytest.mark.slow  # ~6 s of CPU (2,500 shards written and walked twice), more on a loaded machine
def test_a_pass_over_thousands_of_shards_keeps_memory_and_maps_flat(tmp_path):
    folder = tmp_path / "store"
    write_tiny_store(folder, SHARDS, ROWS, DIM)
    # Measured in a fresh interpreter: in the test process the heap that earlier tests freed absorbs the
    # unbounded cache's growth, and the RSS no longer shows it.
    done = subprocess.run([sys.executable, __file__, str(folder)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


LOADER_SHARDS = 1500
LOADER_SAMPLES = 2  # per shard


def write_tiny_shards(folder: Path, shards: int, samples: int) -> None:
    """`shards` tar shards of `samples` 8x8 PNGs each, with captions, keyed as write_tiny_store keys rows."""
    image = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(image, format="PNG")
    for number in range(shards):
        write_members(folder / f"{number:06d}.tar",
                      [member for row in range(samples) for member in
                       ((f"{number:06d}-{row:05d}.png", image.getvalue()),
                        (f"{number:06d}-{row:05d}.txt", f"shape {number} {row}".encode()))])


def measure_a_loader_pass(data: Path, store: Path) -> None:
    """An eval loader over every shard of `data`: resident memory and the store's open maps stay flat."""
    loader = build_loader(data, store, split="eval", batch_size=2 * LOADER_SAMPLES, image_size=8, backend="pil",
                          num_workers=0)
    batches, seen = iter(loader), 0
    warm = len(loader) // 10
    for _ in range(warm):
        seen += len(next(batches)["keys"])
    rss_warm, maps_warm = resident_bytes(), maps_of(store)
    for batch in batches:
        seen += len(batch["keys"])
    rss_end, maps_end = resident_bytes(), maps_of(store)
    assert seen == LOADER_SHARDS * LOADER_SAMPLES
    assert maps_warm <= OPEN_SHARDS and maps_end <= OPEN_SHARDS, (maps_warm, maps_end)
    growth = rss_end - rss_warm
    assert growth < 4 << 20, f"RSS grew {growth / 2**20:.1f} MiB over {LOADER_SHARDS - warm * 2} shards"


@pytest.mark.slow  # ~1,500 tiny shards written and read through the loader
def test_a_loader_pass_over_thousands_of_shards_keeps_memory_and_maps_flat(tmp_path):
    data, store = tmp_path / "data", tmp_path / "store"
    write_tiny_shards(data, LOADER_SHARDS, LOADER_SAMPLES)
    write_tiny_store(store, LOADER_SHARDS, LOADER_SAMPLES, DIM,
                     hashes=lambda number, row: caption_hash(f"shape {number} {row}"))
    done = subprocess.run([sys.executable, __file__, str(data), str(store)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_store_sent_to_a_worker_carries_no_open_shards(tmp_path):
    """Pickled into a loader worker, the store brings its manifest, not the parent's memory maps."""
    import pickle

    folder = tmp_path / "store"
    names = write_tiny_store(folder, 3, 5, 4)
    store = open_store(folder, open_shards=2)
    walk(store, names)
    copy = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < 4096 and not copy._open and copy.open_shards == 2
    np.testing.assert_array_equal(np.asarray(copy.embeddings(names[0])), np.asarray(store.embeddings(names[0])))


if __name__ == "__main__":  # the measurements' own process (see the tests above)
    if len(sys.argv) == 3:
        measure_a_loader_pass(Path(sys.argv[1]), Path(sys.argv[2]))
    else:
        measure_a_pass(Path(sys.argv[1]))
