"""The two ceilings every other GPU number is read against: dense bf16 matmul throughput and
device-memory copy bandwidth."""

from __future__ import annotations

import torch

from . import Context, Row, best_seconds, gpu_check

MATMUL_N = 8192  # 1.1 TFLOP per matmul: long enough that launch overhead does not count
MATMUL_QUICK_N = 256
COPY_BYTES = 2 << 30  # 2 GiB source, far past any L2 cache
COPY_QUICK_BYTES = 4 << 20


@gpu_check("matmul_bf16", est_seconds=15)
def matmul_bf16(ctx: Context) -> list[Row]:
    """TFLOP/s of an N x N x N bf16 matmul (2 N^3 flops), best of 10 timings of 10 matmuls."""
    n = ctx.size(MATMUL_N, MATMUL_QUICK_N)
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16, generator=generator)
    out = torch.empty(n, n, device=ctx.device, dtype=torch.bfloat16)
    seconds = best_seconds(ctx, lambda: torch.matmul(a, b, out=out), warmup=5, repeats=10,
                           inner=ctx.size(10, 2))
    return [Row(f"matmul bf16 {n}^3", 2 * n**3 / seconds / 1e12, "TFLOP/s",
                f"best of 10 timings; {seconds * 1e3:.3f} ms per matmul")]


@gpu_check("copy_d2d", est_seconds=15)
def copy_d2d(ctx: Context) -> list[Row]:
    """GB/s (1e9 bytes) of a device-to-device tensor copy, counting bytes read plus written."""
    nbytes = ctx.size(COPY_BYTES, COPY_QUICK_BYTES)
    source = torch.ones(nbytes, device=ctx.device, dtype=torch.uint8)
    target = torch.zeros_like(source)
    seconds = best_seconds(ctx, lambda: target.copy_(source), warmup=3, repeats=10,
                           inner=ctx.size(5, 2))
    return [Row(f"copy_ {nbytes / 2**20:.0f} MiB", 2 * nbytes / seconds / 1e9, "GB/s",
                f"read+write bytes; {seconds * 1e3:.3f} ms per copy, best of 10")]
