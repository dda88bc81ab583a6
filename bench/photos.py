"""Deterministic photo-like JPEGs for the input-pipeline benchmarks (bench_loader.py, gpu_checks/data.py)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo_jpeg(seed: int, width: int = 500, height: int = 375, quality: int = 90) -> bytes:
    """A deterministic photo-like JPEG: smooth colour waves, a few soft blobs, fine texture and noise,
    so that it compresses like a photograph (~47 KB at 500x375, quality 90), not like flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    for channel in range(3):
        a, b, phase = rng.uniform(-1, 1, 3)
        image[..., channel] = 128 + 60 * np.sin(a * x / 40 + b * y / 50 + 6 * phase)
        for _ in range(4):
            cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
            image[..., channel] += rng.uniform(-60, 60) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2))
    image += 8 * (np.sin(x / rng.uniform(1.5, 4)) * np.cos(y / rng.uniform(1.5, 4)))[..., None]
    image += rng.normal(0, 6, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()
