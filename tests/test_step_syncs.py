"""No host sync in a train step that is not logged: torch's profiler counts the
`aten::_local_scalar_dense` calls (.item(), float(), bool() of a tensor) of whole steps (forward,
loss, backward, clipping, the non-finite check, the update, the logit-scale clamp, the ranks'
agreement), outside the loader, in one process and as two gloo ranks (ddp and fsdp). The logged
step's read-back is one copy, done by the loop.

LIFT_FAST_KERNELS=torch: the plain-torch loss path, the one CPU runs (the Triton kernels are
counted on CUDA by bench/gpu_checks/train.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from two_ranks import fork_ranks

from lift_fast.config import load_config
from lift_fast.train import loop as loop_module
from lift_fast.train.distributed import Distributed
from lift_fast.train.loop import Progress, train
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


SEEN_OPS = ("aten::mm", "aten::_fused_adamw_", "c10d::allreduce_")


def _rank_main(rank: int, overrides: list[str], data, store, out) -> None:
    step, calls = loop_module._train_step, []

    def profiled(cfg, ctx, parts, progress, *args, read_now=True, **kwargs):
        calls.append(read_now)
        if len(calls) not in (2, 3):
            return step(cfg, ctx, parts, progress, *args, read_now=read_now, **kwargs)
        with torch.profiler.profile() as prof:
            stop = step(cfg, ctx, parts, progress, *args, read_now=read_now, **kwargs)
        seen = json.loads(path.read_text()) if (path := out / f"rank{rank}.json").exists() else []
        events = prof.events()
        path.write_text(json.dumps(seen + [{"read_now": read_now, "syncs": host_syncs(events, device="cpu"),
                                            "ran": sorted({e.name for e in events if e.name in SEEN_OPS})}]))
        return stop

    loop_module._train_step = profiled  # in the forked child only
    train(load_config(overrides=overrides), data, store, out / "run", progress=False)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_steps_of_two_ranks_that_are_not_logged_never_wait(synth_data, stores, tmp_path, parallel):
    """The distributed step too: the loss all-reduce, the stop flag and skip count copied to the host
    and read a step later, FSDP's global gradient norm: no host read in steps 2 and 3 (not logged)."""
    overrides = ["data.image_size=32", "model.depth=1", "model.head_hidden=13", "train.batch_size=8", "train.steps=4",
                 "train.log_every=4", "train.checkpoint_every=0", "train.tensorboard=false", "data.num_workers=0",
                 f"train.parallel={parallel}"]
    fork_ranks(_rank_main, overrides, synth_data / "train", stores / "train", tmp_path)
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # the profile saw the step: its GEMMs, the update and a collective (the loss all-reduce, FSDP's own)
        assert [(entry["read_now"], entry["syncs"]) for entry in seen] == [(False, [])] * 2
        assert all(set(entry["ran"]) >= {"aten::mm", "aten::_fused_adamw_", "c10d::allreduce_"} for entry in seen), seen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_step_tally_counts_exactly_as_a_host_loop_would(seed):
    """StepTally against the host bookkeeping it replaces, over random runs of NaN/inf losses and
    norms with read-backs at random steps: the same counts, first bad step and limit step."""
    from lift_fast.train.metrics import StepTally

    generator = torch.Generator().manual_seed(seed)
    limit = 3
    tally = StepTally(torch.device("cpu"), limit, nonfinite=5)  # resumed with 5 already counted
    nonfinite, in_a_row, first, limit_step = 5, 0, 0, 0
    for step in range(1, 60):
        kind = int(torch.randint(0, 6, (), generator=generator))
        loss = torch.tensor(math.nan if kind == 0 else math.inf if kind == 1 else 1.5)
        norm = torch.tensor(-math.inf if kind == 2 else 0.25)
        tally.values, found_inf = tally.updated(step, loss, norm)
        bad = kind in (0, 1, 2)
        assert found_inf.dtype == torch.float32 and found_inf.item() == float(bad)
        nonfinite, in_a_row = nonfinite + bad, in_a_row + 1 if bad else 0
        first = first or (step if bad else 0)
        limit_step = limit_step or (step if in_a_row >= limit else 0)
        if torch.rand((), generator=generator) < 0.3:
            numbers, _ = tally.read()
            assert (numbers["nonfinite"], numbers["in_a_row"], numbers["first_nonfinite"], numbers["limit_step"]) == (
                nonfinite, in_a_row, first, limit_step)
            first = 0  # each read reports the first bad step since the last
    assert limit_step > 0  # the random runs reached the limit at least once
