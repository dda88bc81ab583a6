"""model.grad_checkpointing=auto at the start of training: the least recompute whose planned peak fits
this GPU (on all or some of the blocks) (plan/planner.py), none on a CPU. Called by train/build.py before the model is built."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lift_fast.config import Config, ModelConfig, save_config

log = logging.getLogger(__name__)


def choose_checkpointing(cfg: Config, device: torch.device, dim: int, world_size: int) -> ModelConfig:
    """cfg.model with model.grad_checkpointing (and _blocks, _rest) as they stand on `device`: as set
    unless auto; for auto, none on a CPU (memory is the host's), full in CLIP mode (the planner
    measures LIFT's step), else the planner's least recompute whose peak at train.batch_size /
    world_size per GPU is within (1 - planner.DEFAULT_MARGIN) of the GPU's memory: none, selective
    or full on the fewest blocks (full on all when nothing fits). Logs the choice.

    dim: the text embedding width (the store's). The plan runs in this process when it is alone,
    else in a fresh interpreter (its fake process group cannot live beside the job's).
    Raises RuntimeError when the planner's interpreter fails.
    """
    model = cfg.model
    if model.grad_checkpointing != "auto":
        return model
    if device.type != "cuda":
        log.info("model.grad_checkpointing=auto: none on %s", device)
        return dataclasses.replace(model, grad_checkpointing="none", grad_checkpointing_blocks=0)
    if model.text_tower == "transformer":
        log.info("model.grad_checkpointing=auto: full (CLIP mode; the planner measures LIFT's step only)")
        return dataclasses.replace(model, grad_checkpointing="full", grad_checkpointing_blocks=0)
    memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    cfg = dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, dim=dim))
    plan = _plan(cfg, memory_gib, world_size)
    peaks = ", ".join(f"{label} {row['peak_memory_gib']:.1f}" for label, row in plan["policies"].items())
    log.info("model.grad_checkpointing=auto: %s on %s (%.1f GiB, planned within %.1f GiB; peak GiB: %s; recompute "
             "+%.0f%% FLOPs)%s", plan["setting"], torch.cuda.get_device_name(device), memory_gib,
             plan["device"]["budget_gib"], peaks, 100 * plan["recompute_fraction"],
             "" if plan["fits"] else "; even full does not fit: lower train.batch_size (lift-fast plan says how far)")
    return dataclasses.replace(model, grad_checkpointing=plan["grad_checkpointing"],
                               grad_checkpointing_blocks=plan["grad_checkpointing_blocks"],
                               grad_checkpointing_rest=plan["grad_checkpointing_rest"])


def _plan(cfg: Config, memory_gib: float, world_size: int) -> dict:
    import torch.distributed as dist

    from lift_fast.plan.planner import Device, make_plan

    if world_size == 1 and not (dist.is_available() and dist.is_initialized()):
        return make_plan(cfg, Device(f"{memory_gib:.1f} GiB GPU", memory_gib, None), gpus=1, search=False)
    with tempfile.TemporaryDirectory(prefix="lift-fast-plan-") as folder:
        config, out = Path(folder) / "config.yaml", Path(folder) / "plan.json"
        save_config(cfg, config)
        command = [sys.executable, "-m", "lift_fast", "-q", "plan", "--config", str(config), "--memory-gib",
                   str(memory_gib), "--gpus", str(world_size), "--no-search", "--json", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, env=_without_torchrun())
        if done.returncode != 0:
            raise RuntimeError(f"model.grad_checkpointing=auto: the planner failed ({' '.join(command)}):\n"
                               f"{done.stderr[-2000:]}\nset model.grad_checkpointing=none, selective or full")
        return json.loads(out.read_text(encoding="utf-8"))


def _without_torchrun() -> dict:
    """This process's environment without torchrun's variables (the planner is not a rank)."""
    import os

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
             "ROLE_RANK", "TORCHELASTIC_RUN_ID")
    return {key: value for key, value in os.environ.items() if key not in names}
