"""A training set for benchmarks: shards of photo-like JPEGs, their indexes, and a store of random rows.

    data_dir, store_dir = write_image_shards(folder, count=4096, width=500, height=375, dim=4096)

The store's manifest names the encoder "synthetic-random-rows" (no text encoder runs: benchmark
machines may have none), so a run that checks the store must ask for embed.model=synthetic-random-rows;
its other settings are EmbedConfig's defaults with dim `dim`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from photos import photo_jpeg

ENCODER = "synthetic-random-rows"
SAMPLES_PER_SHARD = 1024


def write_image_shards(folder: str | Path, *, count: int, width: int, height: int, dim: int,
                       distinct: int = 256) -> tuple[Path, Path]:
    """Write `count` samples (cycling through `distinct` JPEGs, captions "photo N") as indexed shards
    into folder/data and unit-norm float16 rows [count, dim] into the store folder/store."""
    from lift_fast.config import EmbedConfig
    from lift_fast.data.index import index_shards
    from lift_fast.data.shards import ShardWriter
    from lift_fast.embed import store

    folder = Path(folder)
    data, store_dir = folder / "data", folder / "store"
    images = [photo_jpeg(seed, width, height) for seed in range(min(count, distinct))]
    keys = [f"{i:08d}" for i in range(count)]
    with ShardWriter(data, samples_per_shard=SAMPLES_PER_SHARD) as writer:
        for i, key in enumerate(keys):
            writer.write(key, {"jpg": images[i % len(images)], "txt": f"photo {i}"})
    index_shards(data, progress=False)
    settings = EmbedConfig(model=ENCODER)
    identity = {name: getattr(settings, name) for name in store.EMBED_SETTINGS if hasattr(settings, name)}
    identity.update(path=None, revision=None, weights_sha256=None, dim=dim, normalize=True)
    shards = sorted(data.glob("*.tar"))
    store.open_for_writing(store_dir, identity, "float16", [s.stem for s in shards], data)
    rng = np.random.default_rng(0)
    for number, shard in enumerate(shards):
        shard_keys = keys[number * SAMPLES_PER_SHARD:(number + 1) * SAMPLES_PER_SHARD]
        rows = rng.standard_normal((len(shard_keys), dim), dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        info = {"source": shard.name, "source_bytes": shard.stat().st_size, "source_mtime_ns": shard.stat().st_mtime_ns}
        entry = store.write_shard(store_dir, shard.stem, shard_keys, rows.astype(np.float16), info,
                                  [f"photo {int(key)}" for key in shard_keys])
        store.record_shard(store_dir, shard.stem, entry)  # with the files' fingerprints, which readers check
    return data, store_dir
