"""Training on one GPU: ViT-B/16 at 224 px with the LIFT head to 4096-d (DESIGN's reference), bf16.

train_step_gemm_dtypes  (first, before any timing) the GEMM dtypes of a bf16 train step on the device:
                    all bf16, for the CLIP, SigLIP and fused-projection losses (lift_fast.train.step_profile).
train_step_host_syncs   (first) host syncs of train steps that are not logged: goal 0.
train_vit_b16_step  the trainer's own step (lift_fast.train.loop._train_step: bf16 autocast, the
                    compiled model, the fused CLIP loss, fused AdamW with LIFT's groups, grad clip,
                    the logit-scale clamp) on synthetic batches already on the GPU, batch 256, with
                    flash-attn and with SDPA: images/s, achieved TFLOP/s (lift_fast.models.flops, the
                    formula tests check against FlopCounterMode) and MFU against the dense bf16 peak
                    (and against the matmul ceiling measured at the start of the run). Goal: MFU >= 45%.
train_data_wait     `train()` end to end with the DALI loader (mixed decoding) over shards of 500x375
                    photo-like JPEGs and a random 4096-d embedding store: steady samples/s, the
                    loop's data_wait_fraction, and what the input pipeline costs against the
                    synthetic step above (1 - end-to-end / synthetic images/s). Goal: under 5%.

`--device cpu --quick` runs both on a tiny ViT, fp32, uncompiled, to check that they still run.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import Context, Row, gpu_check

BATCH, IMAGE_SIZE, TEXT_DIM = 256, 224, 4096
WARMUP, STEPS = 3, 10
MFU_GOAL, DATA_COST_GOAL = 0.45, 0.05
QUICK = ["model.name=vit_tiny_patch16", "model.depth=2", "train.precision=fp32", "train.compile=off"]


def _config(ctx: Context, *extra: str):
    from lift_fast.config import load_config

    sizes = QUICK if ctx.quick else ["model.name=vit_b16", "train.precision=bf16", "train.compile=on"]
    return load_config(overrides=[f"data.image_size={ctx.size(IMAGE_SIZE, 32)}", *sizes, *extra])


def _label(ctx: Context) -> str:
    return f"vit_b16 {IMAGE_SIZE}px B={BATCH}" if not ctx.quick else "vit_tiny depth 2 32px B=8 (smoke)"


def _step_rate(ctx: Context, attention: str) -> tuple[float, object]:
    """Images/s of the trainer's step with model.attention=`attention` on synthetic batches (steps
    that are not logged, as most are: nothing read back until the end)."""
    from lift_fast.train.distributed import Distributed
    from lift_fast.train.loop import Progress, _train_step
    from lift_fast.train.step_profile import synthetic_parts

    cfg = _config(ctx, f"model.attention={attention}")
    batch, dim = ctx.size(BATCH, 8), ctx.size(TEXT_DIM, 64)
    dist = Distributed(device=ctx.device)
    parts, data = synthetic_parts(cfg, dist, dim, batch)
    data["images"] = data["images"].to(parts.precision or torch.float32)
    progress = Progress(step=0)
    parts.model.train()
    with tempfile.TemporaryDirectory() as run_dir:
        for _ in range(WARMUP):  # the first compiles
            _train_step(cfg, dist, parts, progress, data, [], {"normalized": True}, Path(run_dir), read_now=False)
        ctx.synchronize()
        began = time.perf_counter()
        steps = ctx.size(STEPS, 2)
        for _ in range(steps):
            _train_step(cfg, dist, parts, progress, data, [], {"normalized": True}, Path(run_dir), read_now=False)
        ctx.synchronize()
    seconds = time.perf_counter() - began
    loss = progress.tally.read()[0]["loss"]
    if not math.isfinite(loss):
        raise AssertionError(f"attention={attention}: the loss is {loss}")
    return batch * steps / seconds, parts


def _proof_config(ctx: Context, *extra: str):
    """A small ViT in bf16 on ctx.device, eager (the profiler names the aten ops; a compiled graph's
    kernels would hide them), the loss as LIFT_FAST_KERNELS picks it (Triton on CUDA)."""
    from lift_fast.config import load_config

    return load_config(overrides=["model.name=vit_tiny_patch16", "model.depth=2", "data.image_size=64",
                                  "train.precision=bf16", "train.compile=off", "train.batch_size=32", *extra])


def _profiled_steps(ctx: Context, cfg, steps: int = 2):
    from lift_fast.train.distributed import Distributed
    from lift_fast.train.loop import Progress, _train_step
    from lift_fast.train.step_profile import profile_steps, synthetic_parts

    dist = Distributed(device=ctx.device)
    parts, data = synthetic_parts(cfg, dist, ctx.size(1024, 64), cfg.train.batch_size)
    progress = Progress(step=0)
    with tempfile.TemporaryDirectory() as run_dir:
        _train_step(cfg, dist, parts, progress, data, [], {"normalized": True}, Path(run_dir), read_now=False)  # warm-up
        ctx.synchronize()
        return profile_steps(cfg, dist, parts, progress, data, steps, run_dir=run_dir)


@gpu_check("train_step_gemm_dtypes", est_seconds=40, proof=True)
def train_step_gemm_dtypes(ctx: Context) -> list[Row]:
    """Every GEMM of a bf16 train step (forward, loss, backward) takes bf16 inputs, on the device
    itself (CUDA autocast's float32 ops are what the trainer's cast is for); plain and fused head."""
    from lift_fast.train.step_profile import gemms_not_in

    rows = []
    for label, extra in (("clip", ()), ("siglip", ("train.loss=siglip",)),
                         ("fused projection", ("model.fuse_projection=true",))):
        count, wrong = gemms_not_in(_profiled_steps(ctx, _proof_config(ctx, *extra), steps=1))
        notes = "all bf16" if not wrong else "not bf16: " + "; ".join(
            f"{name} {'/'.join(dtypes)} in {' < '.join(callers)}" for name, dtypes, callers in wrong[:4])
        rows.append(Row(f"{label}: GEMMs with bf16 inputs", (count - len(wrong)) / max(1, count), "fraction",
                        f"{count} GEMMs; goal 1 (the loss backward's float32 aten::dot, the logit-scale gradient, "
                        f"is left out by design); {notes}"))
    return rows


@gpu_check("train_step_host_syncs", est_seconds=40, proof=True)
def train_step_host_syncs(ctx: Context) -> list[Row]:
    """Host syncs in two train steps that are not logged: aten::_local_scalar_dense (item(),
    float(), bool() of a device tensor) and the CUDA runtime's synchronising calls. Goal: 0."""
    from lift_fast.train.step_profile import host_syncs

    rows = []
    for label, extra in (("clip", ()), ("siglip", ("train.loss=siglip",)),
                         ("fused projection", ("model.fuse_projection=true",))):
        events = _profiled_steps(ctx, _proof_config(ctx, *extra))
        chains = host_syncs(events, device=ctx.device)
        # CUDA runtime calls that wait for the device, made from inside an op of the step (the
        # profiler's own synchronisation when it stops has no calling op)
        runtime = [event.name for event in events if event.cpu_parent is not None
                   and ("Synchronize" in event.name or event.name in ("cudaMemcpy", "cudaMemset"))]
        where = "; ".join(" < ".join(chain[1:4]) for chain in chains[:3])
        rows.append(Row(f"{label}: aten::_local_scalar_dense in 2 steps", len(chains), "calls",
                        f"goal 0{'; from ' + where if where else ''}"))
        if ctx.device.type == "cuda":
            rows.append(Row(f"{label}: CUDA synchronize calls in 2 steps", len(runtime), "calls",
                            f"goal 0{'; ' + ', '.join(sorted(set(runtime))) if runtime else ''}"))
    return rows


@gpu_check("train_vit_b16_step", est_seconds=150)
def train_vit_b16_step(ctx: Context) -> list[Row]:
    """ViT-B/16 train step images/s and MFU, flash-attn against SDPA."""
    from lift_fast.models.attention import _flash_kernel_for

    rows = []
    ceiling = ctx.earlier_value("matmul_bf16", "TFLOP/s")
    for attention in ("flash", "sdpa"):
        name = f"train step {_label(ctx)} {attention}"
        kernel, why = _flash_kernel_for(ctx.device, torch.bfloat16)
        if attention == "flash" and kernel is None:
            rows.append(Row(name, math.nan, "images/s", f"not run: {why}"))
            continue
        name += f" ({kernel})" if attention == "flash" else ""
        rate, parts = _step_rate(ctx, attention)
        tflops = rate * parts.flops_per_sample / 1e12
        rows.append(Row(name, rate, "images/s", f"{tflops:.0f} TFLOP/s achieved"))
        if parts.peak:
            mfu = tflops / parts.peak
            met = "met" if mfu >= MFU_GOAL else "NOT MET"
            rows.append(Row(f"{name} MFU", mfu, "fraction", f"of {parts.peak:.0f} TFLOP/s dense bf16; goal "
                            f">= {MFU_GOAL:.0%} {met}"))
        if ceiling:
            rows.append(Row(f"{name} / matmul ceiling", tflops / ceiling, "fraction",
                            f"of the {ceiling:.0f} TFLOP/s measured by matmul_bf16"))
        del parts
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


@gpu_check("train_data_wait", est_seconds=120)
def train_data_wait(ctx: Context) -> list[Row]:
    """`train()` end to end with the DALI loader: samples/s, data wait, and the pipeline's cost."""
    from image_shards import ENCODER, write_image_shards

    from lift_fast.data.dali import dali_available
    from lift_fast.train.loop import train

    device_id = (ctx.device.index or 0) if ctx.device.type == "cuda" else None
    usable, why = dali_available(device_id)
    name = f"train() {_label(ctx)} DALI loader"
    if not usable:
        return [Row(name, math.nan, "images/s", f"not run: {why}")]
    steps = ctx.size(60, 4)
    cfg = _config(ctx, "data.backend=dali", "data.num_workers=8", f"train.batch_size={ctx.size(BATCH, 8)}",
                  f"train.steps={steps}", "train.log_every=10" if not ctx.quick else "train.log_every=1",
                  "train.checkpoint_every=0", "train.tensorboard=false", f"embed.model={ENCODER}")
    width, height = (500, 375) if not ctx.quick else (64, 48)
    with tempfile.TemporaryDirectory() as tmp:
        data, store_dir = write_image_shards(tmp, count=ctx.size(4096, 32), width=width, height=height,
                                             dim=ctx.size(TEXT_DIM, 64))
        train(cfg, data, store_dir, Path(tmp) / "run", progress=False)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:] or records  # the first window holds the compile step
    rate = float(np.mean([r["samples_per_second"] for r in steady]))
    wait = float(np.mean([r["data_wait_fraction"] for r in steady]))
    rows = [Row(name, rate, "images/s", f"mean of {len(steady)} logged windows after the first"),
            Row(f"{name} data wait", wait, "fraction", "time the loop waited for batches")]
    # model.attention=auto trains with flash-attn where it runs: compare with that row, else SDPA's
    rates = [row.value for row in ctx.results.get("train_vit_b16_step", ()) if row.unit == "images/s"]
    synthetic = next((rate for rate in rates if math.isfinite(rate)), None)
    if synthetic:
        cost = 1 - rate / synthetic
        met = "met" if cost < DATA_COST_GOAL else "NOT MET"
        rows.append(Row(f"{name} pipeline cost", cost, "fraction",
                        f"1 - {rate:.0f} / {synthetic:.0f} synthetic images/s; goal < {DATA_COST_GOAL:.0%} {met}"))
    return rows
