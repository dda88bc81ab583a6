"""No host sync in a train step that is not logged: torch's profiler counts the
`aten::_local_scalar_dense` calls (.item(), float(), bool() of a tensor) of whole steps (forward,
loss, backward, clipping, the non-finite check, the update, the logit-scale clamp, the ranks'
agreement), outside the loader. The logged step's read-back is one copy, done by the loop.

LIFT_FAST_KERNELS=torch: the plain-torch loss path, the one CPU runs (the Triton kernels are
counted on CUDA by bench/gpu_checks/train.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lift_fast.config import load_config
from lift_fast.train import loop as loop_module
from lift_fast.train.distributed import Distributed
from lift_fast.train.loop import Progress
from lift_fast.train.step_profile import host_syncs, profile_steps, synthetic_parts

TINY = ["data.image_size=32", "model.depth=1", "model.head_hidden=24", "train.batch_size=6", "train.warmup_steps=1",
        "train.compile=off"]


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("LIFT_FAST_KERNELS", "torch")


def _steps(*overrides: str, steps: int = 2, nan: bool = False):
    cfg = load_config(overrides=TINY + list(overrides))
    ctx = Distributed()
    parts, data = synthetic_parts(cfg, ctx, dim=16, batch=cfg.train.batch_size)
    if nan:
        data = {**data, "images": data["images"] * math.nan}
    progress = Progress(step=0)
    loop_module._train_step(cfg, ctx, parts, progress, data, [], {"normalized": True}, ".")  # warm-up
    events = profile_steps(cfg, ctx, parts, progress, data, steps)
    return events, progress, parts


@pytest.mark.parametrize("overrides", [(), ("train.loss=siglip",), ("train.precision=bf16",),
                                       ("model.fuse_projection=true",), ("train.grad_clip=0",)],
                         ids=["clip", "siglip", "bf16", "fused_projection", "no_clip"])
def test_a_step_that_is_not_logged_never_waits_for_the_device(overrides):
    events, progress, _ = _steps(*overrides)
    assert host_syncs(events, device="cpu") == []
    # the steps ran: three updates, a finite loss on the device, nothing read back yet
    assert progress.step == 3 and math.isnan(progress.loss_value)
    numbers, _ = progress.tally.read()
    assert math.isfinite(numbers["loss"]) and numbers["nonfinite"] == 0


def test_the_counter_sees_a_sync_where_there_is_one(monkeypatch):
    """The check can fail: an .item() put back into the step (as clip_grad_norm had) is counted."""
    clip = loop_module.distributed.clip_grad_norm
    monkeypatch.setattr(loop_module.distributed, "clip_grad_norm",
                        lambda params, max_norm: torch.tensor(clip(params, max_norm).item()))
    events, _, _ = _steps()
    chains = host_syncs(events, device="cpu")
    assert len(chains) == 2 and all(chain[:2] == ["aten::_local_scalar_dense", "aten::item"] for chain in chains)
    # on CUDA nothing is left out: the CPU fused AdamW's own reads count there as well
    assert len(host_syncs(events, device="cuda")) > 2


def test_nonfinite_steps_are_skipped_and_counted_on_the_device():
    """NaN images: every step's loss is NaN; the update is skipped without a read-back (weights and
    AdamW's step counts as they were) and the tally holds the count and the first bad step."""
    events, progress, parts = _steps(nan=True)
    assert host_syncs(events, device="cpu") == []
    numbers, _ = progress.tally.read()
    assert numbers["nonfinite"] == 3 and numbers["in_a_row"] == 3 and numbers["first_nonfinite"] == 1
    assert all(not torch.any(state["step"]) for state in parts.optimizer.state.values())
    assert all(torch.isfinite(param).all() for param in parts.model.parameters())
