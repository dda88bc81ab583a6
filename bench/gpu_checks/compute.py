"""LIFT vs CLIP compute on one GPU: peak memory of a training step and FLOPs per sample (docs/compute.md).

compute_lift_vs_clip  ViT-B/16 at 224 px with the LIFT head 768 -> 4096 -> 4096 (DESIGN's reference), batch 256,
                      bf16 autocast, uncompiled: torch.cuda.max_memory_allocated over the second of two
                      training steps (forward, fused CLIP loss, backward, AdamW) of LIFT (frozen 4096-d
                      caption embeddings) and of CLIP (the 512 x 12-layer text tower at 77 tokens, trained
                      jointly, same joint width), as lift_fast.flops.peak_step_memory measures it; the
                      fraction LIFT saves; and the FLOPs per sample of both from the trainer's formulas
                      (the embedding pass left out, as the paper's figures do). Paper: 6.8% memory saved.
                      Also at 323 tokens (long captions): paper 12.6% memory, 35.7% FLOPs saved.

`--device cpu --quick` runs it on a tiny ViT and text tower at batch 4, 77 tokens only (memory from the CPU
profiler).
"""

from __future__ import annotations

import math

from . import Context, Row, gpu_check

BATCH, TEXT_DIM, IMAGE_SIZE = 256, 4096, 224
LONG_CONTEXT = 323
QUICK = ["model.name=vit_tiny_patch16", "model.depth=2", "model.text_width=32", "model.text_layers=2",
         "model.text_heads=4"]


def _config(ctx: Context, context: int):
    from lift_fast.config import load_config

    sizes = QUICK if ctx.quick else ["model.name=vit_b16", f"model.head_hidden={TEXT_DIM}"]
    return load_config(overrides=[f"data.image_size={ctx.size(IMAGE_SIZE, 32)}", f"model.text_context={context}",
                                  f"train.batch_size={ctx.size(16384, 8)}", *sizes])


def _rows(ctx: Context, context: int) -> list[Row]:
    from lift_fast.flops import Encoder, flops_rows, peak_step_memory

    cfg = _config(ctx, context)
    batch, dim = ctx.size(BATCH, 4), ctx.size(TEXT_DIM, 64)
    label = f"{'vit_b16 224px' if not ctx.quick else 'vit_tiny depth 2 32px (smoke)'} {context} tokens B={batch}"
    lift, clip = (peak_step_memory(cfg, mode, batch, dim, ctx.device) for mode in ("lift", "clip"))
    flops_lift, flops_clip = flops_rows(cfg, Encoder("frozen", 0, dim), epochs=math.inf)
    how = "max_memory_allocated, 2nd of 2 steps, bf16 autocast, eager" if ctx.device.type == "cuda" else "CPU profiler"
    return [
        Row(f"LIFT peak memory {label}", lift["peak_bytes"] / 2**30, "GiB", how),
        Row(f"CLIP peak memory {label}", clip["peak_bytes"] / 2**30, "GiB",
            f"text tower {clip['parameters'] - lift['parameters']:,} parameters"),
        Row(f"LIFT memory saved {label}", 1 - lift["peak_bytes"] / clip["peak_bytes"], "fraction",
            "paper: 0.068 (short), 0.126 (long)"),
        Row(f"LIFT FLOPs saved {label}", flops_lift["saved_vs_clip"], "fraction",
            f"{flops_lift['per_sample'] / 1e9:.4g} vs {flops_clip['per_sample'] / 1e9:.4g} GFLOPs/sample at global "
            f"batch {flops_lift['global_batch']}, computed; paper: 0.255 (short), 0.357 (long)"),
    ]


@gpu_check("compute_lift_vs_clip", est_seconds=90)
def compute_lift_vs_clip(ctx: Context) -> list[Row]:
    contexts = (77,) if ctx.quick else (77, LONG_CONTEXT)  # the smoke run checks the code path once
    return [row for context in contexts for row in _rows(ctx, context)]
