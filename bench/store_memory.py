"""What a store reader holds per open shard, measured, and what that makes at LIFT's scale.

    python bench/store_memory.py [SHARDS] [ROWS]      # default 100 shards of 10,000 rows

Writes SHARDS shards of ROWS keys (9-character keys, as img2dataset names them) into a temporary
store, walks them as the data reader does (key -> row map, one caption hash and one row per shard),
first with the default bound (lift_fast.embed.store.OPEN_SHARDS), then with the cache unbounded
(every shard stays open, as before the bound), and prints one JSON object: resident bytes and memory
maps per open shard, and both per process at 1.28B samples (128,000 shards of 10,000).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_store_memory import maps_of, resident_bytes  # noqa: E402

from lift_fast.embed.manifest import FORMAT, FORMAT_VERSION  # noqa: E402
from lift_fast.embed.shard_files import HASH_DTYPE, fingerprint_bytes  # noqa: E402
from lift_fast.embed.store import OPEN_SHARDS, open_store  # noqa: E402
from lift_fast.embed.store_writer import _npy_bytes  # noqa: E402

SCALE_SHARDS, SCALE_ROWS = 128_000, 10_000  # 1.28B samples
DIM = 8  # rows are mapped, not read: their width does not change what stays resident


def write_store(folder: Path, shards: int, rows: int) -> list[str]:
    folder.mkdir()
    names = [f"{i:05d}" for i in range(shards)]
    entries = {}
    block = np.zeros((rows, DIM), dtype=np.float16)
    for number, name in enumerate(names):
        contents = {f"{name}.keys.txt": "".join(f"{number * rows + row:09d}\n" for row in range(rows)).encode(),
                    f"{name}.caption_hash.npy": _npy_bytes(np.arange(rows, dtype=HASH_DTYPE)),
                    f"{name}.npy": _npy_bytes(block)}
        for file_name, data in contents.items():
            (folder / file_name).write_bytes(data)
        entries[name] = {"count": rows, "files": {n: fingerprint_bytes(d) for n, d in contents.items()}}
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "encoder": {"model": "bench", "dim": DIM},
                "dtype": "float16", "dim": DIM, "normalized": False, "data_dir": str(folder),
                "data_shards": names, "shards": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return names


def walk(store, names: list[str], rows: int) -> None:
    for number, name in enumerate(names):
        row = store.row_index(name)[f"{number * rows + 3:09d}"]
        int(store.caption_hashes(name)[row])
        np.asarray(store.embeddings(name)[row], dtype=np.float32)


def main(shards: int = 100, rows: int = SCALE_ROWS) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "store"
        names = write_store(folder, shards, rows)
        bounded = open_store(folder)  # first, in a fresh heap: what the bound keeps over a pass
        start = resident_bytes()
        walk(bounded, names, rows)
        bounded_growth = resident_bytes() - start
        bounded_maps = maps_of(folder)
        del bounded
        unbounded = open_store(folder, open_shards=shards + 1)
        start = resident_bytes()
        walk(unbounded, names, rows)
        per_shard = (resident_bytes() - start) / shards
        maps_per_shard = maps_of(folder) / shards
    max_maps = int(Path("/proc/sys/vm/max_map_count").read_text())
    return {"shards": shards, "rows_per_shard": rows, "bytes_per_open_shard": round(per_shard),
            "maps_per_open_shard": maps_per_shard, "open_shards_bound": OPEN_SHARDS,
            "bounded_pass_growth_bytes": bounded_growth, "bounded_pass_maps": bounded_maps,
            "at_1.28B_before_bytes": round(per_shard * SCALE_SHARDS * rows / SCALE_ROWS),
            "at_1.28B_before_maps": round(maps_per_shard * SCALE_SHARDS), "vm.max_map_count": max_maps,
            "at_1.28B_after_bytes": round(per_shard * OPEN_SHARDS * rows / SCALE_ROWS),
            "at_1.28B_after_maps": round(maps_per_shard * OPEN_SHARDS)}


if __name__ == "__main__":
    print(json.dumps(main(*map(int, sys.argv[1:])), indent=1))
