"""Evaluation on the GPU: retrieval of 50k images against 50k captions on the device, and the tower of a
flash-trained run evaluated in bf16.

`eval_retrieval_50k`: lift_fast.eval.retrieval.multi_caption_retrieval (two passes of blocked
similarities, ranks counted on the device) at N = M = 50,000, D = 4096 (NV-Embed-v2's width): seconds
per call, and the peak device memory beside what one [N, M] float32 matrix would take (the point of
the blocks). The only device-to-host traffic is the hit counts.

`eval_flash_bf16` (a proof): a ViT-B/16 built from a config with model.attention=flash, loaded as
`lift-fast eval` loads it (load_run_model maps flash to auto, eval.precision=auto gives bf16 autocast
on CUDA): which attention kernel runs, and the cosine of its features to fp32 SDPA's on the same
weights and images.
"""

from __future__ import annotations

import dataclasses

import torch

from lift_fast.config import Config
from lift_fast.eval.model import eval_autocast_dtype
from lift_fast.eval.retrieval import multi_caption_retrieval
from lift_fast.models.attention import resolve_backend
from lift_fast.models.vit import build_model

from . import Context, Row, best_seconds, gpu_check


@gpu_check("eval_retrieval_50k", est_seconds=40)
def eval_retrieval_50k(ctx: Context) -> list[Row]:
    num, dim = ctx.size(50_000, 700), ctx.size(4096, 32)
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(num, dim, device=ctx.device, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(images + torch.randn(num, dim, device=ctx.device, generator=generator), dim=-1)
    text_image = torch.arange(num, device=ctx.device)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
        before = torch.cuda.memory_allocated(ctx.device)
    metrics = {}

    def run():
        metrics.update(multi_caption_retrieval(images, texts, text_image))

    seconds = best_seconds(ctx, run, warmup=1, repeats=3)
    rows = [Row(f"multi_caption_retrieval N=M={num} D={dim}", seconds, "s", f"best of 3; i2t_r1 {metrics['i2t_r1']:.3f}")]
    if ctx.device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(ctx.device) - before) / 2**30
        rows.append(Row("peak device memory above the features", peak, "GiB",
                        f"one [N, M] fp32 matrix would be {num * num * 4 / 2**30:.1f} GiB"))
    return rows


@gpu_check("eval_flash_bf16", est_seconds=20, proof=True)
def eval_flash_bf16(ctx: Context) -> list[Row]:
    cfg = Config()
    cfg.model.name = "vit_b16" if not ctx.quick else "vit_tiny_patch16"
    image_size = ctx.size(224, 32)
    cfg.model.depth = ctx.size(0, 1)
    torch.manual_seed(0)
    model_cfg = dataclasses.replace(cfg.model, attention="auto")  # what load_run_model does with flash
    model = build_model(model_cfg, image_size, ctx.size(4096, 64)).to(ctx.device).eval()
    images = torch.randn(ctx.size(64, 4), 3, image_size, image_size, device=ctx.device)
    dtype = eval_autocast_dtype("auto", ctx.device)
    kernel = resolve_backend("auto", ctx.device, dtype or torch.float32)
    with torch.inference_mode():
        with torch.autocast(ctx.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            fast = model(images).float()
        for block in model.visual.blocks:
            block.attn.backend = "sdpa"
        reference = model(images).float()
    cosine = torch.nn.functional.cosine_similarity(fast, reference, dim=-1)
    return [Row(f"eval attention kernel ({str(dtype).removeprefix('torch.') if dtype else 'fp32'}): {kernel}",
                cosine.min().item(), "min cosine", "features vs fp32 sdpa, same weights")]
