"""What a store reader holds per open shard, measured, and what that makes at LIFT's scale.

    python bench/store_memory.py [SHARDS] [ROWS]      # default 100 shards of 10,000 rows

Writes SHARDS shards of ROWS keys (9-character keys, as img2dataset names them) into a temporary
store, walks them as the data reader does (key -> row map, one caption hash and one row per shard),
with the default bound (lift_fast.embed.store.OPEN_SHARDS) and with the cache unbounded (every
shard stays open, as before the bound), each in a forked child of its own, and prints one JSON object: resident bytes and memory
maps per open shard, and both per process at 1.28B samples (128,000 shards of 10,000).
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_store_memory import maps_of, resident_bytes, write_tiny_store  # noqa: E402

from lift_fast.embed.store import OPEN_SHARDS, open_store  # noqa: E402

SCALE_SHARDS, SCALE_ROWS = 128_000, 10_000  # 1.28B samples
DIM = 8  # rows are mapped, not read: their width does not change what stays resident


def walk(store, names: list[str], rows: int) -> None:
    for number, name in enumerate(names):
        row = store.row_index(name)[f"{number * rows + 3:09d}"]
        int(store.caption_hashes(name)[row])
        np.asarray(store.embeddings(name)[row], dtype=np.float32)


def measure(folder: Path, names: list[str], rows: int, open_shards: int, results) -> None:
    """In a forked child (a heap the other measurement has not used): resident bytes and maps a pass adds."""
    store = open_store(folder, open_shards=open_shards)
    start = resident_bytes()
    walk(store, names, rows)
    results.put((resident_bytes() - start, maps_of(folder)))


def main(shards: int = 100, rows: int = SCALE_ROWS) -> dict:
    context = multiprocessing.get_context("fork")
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "store"
        names = write_tiny_store(folder, shards, rows, DIM, key=lambda shard, row: f"{shard * rows + row:09d}")
        for mode, open_shards in (("bounded", OPEN_SHARDS), ("unbounded", shards + 1)):
            results = context.Queue()
            child = context.Process(target=measure, args=(folder, names, rows, open_shards, results))
            child.start()
            measured[mode] = results.get()
            child.join()
    per_shard = measured["unbounded"][0] / shards
    maps_per_shard = measured["unbounded"][1] / shards
    max_maps = int(Path("/proc/sys/vm/max_map_count").read_text())
    return {"shards": shards, "rows_per_shard": rows, "bytes_per_open_shard": round(per_shard),
            "maps_per_open_shard": maps_per_shard, "open_shards_bound": OPEN_SHARDS,
            "bounded_pass_growth_bytes": measured["bounded"][0], "bounded_pass_maps": measured["bounded"][1],
            "at_1.28B_before_bytes": round(per_shard * SCALE_SHARDS * rows / SCALE_ROWS),
            "at_1.28B_before_maps": round(maps_per_shard * SCALE_SHARDS), "vm.max_map_count": max_maps,
            "at_1.28B_after_bytes": round(per_shard * OPEN_SHARDS * rows / SCALE_ROWS),
            "at_1.28B_after_maps": round(maps_per_shard * OPEN_SHARDS)}


if __name__ == "__main__":
    print(json.dumps(main(*map(int, sys.argv[1:])), indent=1))
