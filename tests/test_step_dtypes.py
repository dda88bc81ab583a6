"""One compute dtype: with train.precision=bf16 every matrix product of a whole train step (forward,
loss, backward) takes bf16 inputs, on the plain path and under train.parallel=fsdp (2 gloo ranks),
recorded with torch's profiler (which sees inside the losses' custom ops).

CPU autocast's op lists are not CUDA's: under CUDA autocast F.normalize runs in float32, so the
features leave the model in float32. The step is therefore also run with the model's output
forced to float32, as CUDA leaves it: the loss's GEMMs must still be bf16 (the trainer casts).

The one float32 product allowed: `aten::dot` in the losses' backward (lift_fast::clip_backward,
siglip_backward), the logit scale's gradient (the sum over a slab of grad * similarity), a
reduction of float32 statistics into one number, not a GEMM of the features.
"""

from __future__ import annotations

import json

import pytest
import torch
from two_ranks import fork_ranks

from lift_fast.config import load_config
from lift_fast.train import distributed
from lift_fast.train import loop as loop_module
from lift_fast.train.distributed import Distributed
from lift_fast.train.loop import Progress, train
from lift_fast.train.step_profile import callers, gemm_dtypes, gemms_not_in, profile_steps, synthetic_parts

BF16 = "c10::BFloat16"
TINY = ["data.image_size=32", "model.depth=1", "model.head_hidden=24", "train.batch_size=6", "train.precision=bf16",
        "train.compile=off"]
LOSS_OPS = ("lift_fast::", "ClipLoss", "SigLipLoss")


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("LIFT_FAST_KERNELS", "torch")


def float32_products(events) -> list:
    """The GEMMs with an input that is not bf16, less the allowed one (the module docstring's)."""
    return gemms_not_in(events)[1]


def loss_products(events) -> list:
    return [event for event in events if gemm_dtypes([event]) and any(
        any(part in name for part in LOSS_OPS) for name in callers(event))]


def _profiled_step(*overrides: str, float32_output: bool = False):
    cfg = load_config(overrides=TINY + list(overrides))
    ctx = Distributed()
    parts, data = synthetic_parts(cfg, ctx, dim=16, batch=cfg.train.batch_size)
    if float32_output:  # as CUDA autocast leaves the features (its normalize runs in float32)
        forward = parts.forward
        parts.forward = lambda images, **kwargs: forward(images, **kwargs).float()
    return profile_steps(cfg, ctx, parts, Progress(step=0), data, 1)


@pytest.mark.parametrize("float32_output", [False, True], ids=["cpu_autocast", "float32_head_output"])
@pytest.mark.parametrize("overrides", [(), ("train.loss=siglip",), ("model.fuse_projection=true",)],
                         ids=["clip", "siglip", "fused_projection"])
def test_every_gemm_of_a_bf16_step_is_bf16(overrides, float32_output):
    events = _profiled_step(*overrides, float32_output=float32_output)
    assert float32_products(events) == []
    # the profile saw the whole step: the ViT (patch conv, attention, MLP), the loss and the backward
    names = {name for name, _, _ in gemm_dtypes(events)}
    assert {"aten::mm", "aten::addmm", "aten::convolution_backward"} <= names
    assert any("attention" in name for name in names)
    assert len(loss_products(events)) >= 2  # the loss's own similarity GEMMs, forward and backward


def test_the_check_sees_a_float32_gemm():
    """It can fail: without the trainer's cast, float32 features make the loss's GEMMs float32."""
    original = loop_module.contrastive_loss
    loop_module.contrastive_loss = lambda loss_fn, image_features, texts, *rest: original(
        loss_fn, image_features.float(), texts.float(), *rest)
    try:
        events = _profiled_step()
    finally:
        loop_module.contrastive_loss = original
    wrong = float32_products(events)
    assert wrong and all(dtypes[0] == "float" for _, dtypes, _ in wrong)
    assert {event.name for event in loss_products(events)} & {name for name, _, _ in wrong}


def test_fp32_precision_runs_float32():
    events = _profiled_step("train.precision=fp32")
    assert all(set(dtypes) == {"float"} for _, dtypes, _ in gemm_dtypes(events))


# -- FSDP: 2 gloo ranks through train(), the second step profiled ---------------------------------

def _rank_main(rank: int, overrides: list[str], data, store, out, param_dtype: bool) -> None:
    if param_dtype:  # FSDP2 gathers bf16 weights and autocast is off, as on CUDA
        distributed.sharded_param_dtype = lambda parallel, ctx, precision: precision
    step, calls = loop_module._train_step, []

    def profiled(cfg, ctx, parts, progress, *args, **kwargs):
        calls.append(1)
        if len(calls) != 2:
            return step(cfg, ctx, parts, progress, *args, **kwargs)
        with torch.profiler.profile(record_shapes=True) as prof:
            stop = step(cfg, ctx, parts, progress, *args, **kwargs)
        events = list(prof.events())
        (out / f"rank{rank}.json").write_text(json.dumps({
            "wrong": [list(map(str, item)) for item in float32_products(events)],
            "names": sorted({name for name, _, _ in gemm_dtypes(events)}),
            "loss_products": len(loss_products(events)), "sharded": distributed.is_sharded(parts.model)}))
        return stop

    loop_module._train_step = profiled
    train(load_config(overrides=overrides), data, store, out / "run", progress=False)


@pytest.mark.parametrize("param_dtype", [False, True], ids=["autocast", "param_dtype"])
def test_every_gemm_of_a_bf16_fsdp_step_is_bf16(synth_data, stores, tmp_path, param_dtype):
    overrides = ["data.image_size=32", "model.depth=1", "model.head_hidden=13", "train.batch_size=8", "train.steps=2",
                 "train.precision=bf16", "train.parallel=fsdp", "train.log_every=1", "train.checkpoint_every=0",
                 "train.tensorboard=false", "data.num_workers=0"]
    fork_ranks(_rank_main, overrides, synth_data / "train", stores / "train", tmp_path, param_dtype)
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["sharded"] and seen["wrong"] == []
        assert {"aten::mm", "aten::addmm", "aten::convolution_backward"} <= set(seen["names"])
        assert seen["loss_products"] >= 2
