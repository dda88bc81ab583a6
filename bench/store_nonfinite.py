"""The store's NaN/inf check (lift_fast.embed.store.nonfinite_rows, exponent bits on the integer view)
against the plain numpy checks it replaced, in the same run, on one shard file in the page cache.

    python bench/store_nonfinite.py [ROWS] [DIM] [DTYPE]      # default 10,000 x 4096 float16

Prints one JSON object: milliseconds (best of 5) of nonfinite_rows, of a float32 row sum read the
same way, and of np.isfinite over the whole memmap, and the ratios.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lift_fast.embed import store


def best_ms(function, repeats: int = 5) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def row_sum_check(path: Path, rows: np.memmap) -> np.ndarray:
    """The baseline: each block summed in float32 (float64 for wider rows), a NaN or inf survives the sum."""
    accumulate = np.float64 if rows.dtype.itemsize >= 4 else np.float32
    count, dim = rows.shape
    bad = []
    with open(path, "rb") as f:
        f.seek(rows.offset)
        for start in range(0, count, store.CHECK_ROWS):
            n = min(store.CHECK_ROWS, count - start)
            sums = np.fromfile(f, dtype=rows.dtype, count=n * dim).reshape(n, dim).sum(axis=1, dtype=accumulate)
            bad.extend((start + np.flatnonzero(~np.isfinite(sums))).tolist())
    return np.array(bad, dtype=np.int64)


def main(count: int = 10_000, dim: int = 4096, dtype: str = "float16") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "00000.npy"
        rows = np.random.default_rng(0).standard_normal((count, dim)).astype(dtype)
        rows[[count // 2, count - 1], 1] = [np.nan, np.inf]
        np.save(path, rows)
        mapped = np.load(path, mmap_mode="r")
        assert store.nonfinite_rows(path, mapped).tolist() == row_sum_check(path, mapped).tolist() == [count // 2, count - 1]
        bits = best_ms(lambda: store.nonfinite_rows(path, mapped))
        row_sum = best_ms(lambda: row_sum_check(path, mapped))
        isfinite = best_ms(lambda: np.flatnonzero(~np.isfinite(mapped).all(axis=1)))
        size = path.stat().st_size
    return {"rows": count, "dim": dim, "dtype": dtype, "file_mb": round(size / 1e6, 1),
            "exponent_bits_ms": round(bits, 1), "float32_row_sum_ms": round(row_sum, 1),
            "isfinite_memmap_ms": round(isfinite, 1), "row_sum_over_bits": round(row_sum / bits, 2),
            "isfinite_over_bits": round(isfinite / bits, 2)}


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(*map(int, args[:2]), *args[2:3]), indent=1))
