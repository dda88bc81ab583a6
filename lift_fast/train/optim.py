"""AdamW with LIFT's parameter groups, and the warm-up + cosine learning-rate schedule.

The schedule's length is fixed when a run starts (train.schedule_steps, 0: train.steps then) and
kept on resume whatever train.steps becomes: a longer run goes on past the end at train.min_lr, a
shorter one stops early; the learning rate never jumps back up unless train.schedule_steps is set on
the resume command line (`resumed_schedule`; docs/training.md says why).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)

# Parameters that never get weight decay besides biases and norm weights (all 1-D); the text tower's
# (CLIP mode) position and token embeddings, as open_clip excludes them too.
NO_DECAY_NAMES = ("logit_scale", "pos_embed", "cls_token", "positional_embedding")
NO_DECAY_MODULES = ("token_embedding",)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices with weight decay; biases, norms, logit scale and embeddings without."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")
        if param.ndim < 2 or parts[-1] in NO_DECAY_NAMES or any(part in NO_DECAY_MODULES for part in parts[:-1]):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, train_cfg) -> torch.optim.AdamW:
    """AdamW (fused where the device supports it: CUDA and CPU) over `parameter_groups`.

    Fused, because its kernel honours found_inf on the device: the loop skips a non-finite step
    without reading anything back (loop._optimizer_step).
    """
    fused = all(p.device.type in ("cuda", "cpu") and p.dtype.is_floating_point for p in model.parameters())
    return torch.optim.AdamW(parameter_groups(model, train_cfg.weight_decay), lr=train_cfg.lr,
                             betas=train_cfg.betas, eps=train_cfg.eps, fused=fused or None)


def cosine_schedule(step: int, *, steps: int, warmup_steps: int, lr: float, min_lr: float = 0.0) -> float:
    """Learning rate at `step` (0-based): linear warm-up to lr, then cosine down to min_lr at `steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def schedule_length(train_cfg) -> int:
    """The steps the cosine runs over: train.schedule_steps, or train.steps where that is 0."""
    return train_cfg.schedule_steps or train_cfg.steps


def learning_rate(step: int, train_cfg) -> float:
    """The learning rate of 0-based step `step` under train_cfg's warm-up and cosine."""
    return cosine_schedule(step, steps=schedule_length(train_cfg), warmup_steps=train_cfg.warmup_steps,
                           lr=train_cfg.lr, min_lr=train_cfg.min_lr)


def resumed_schedule(saved, asked, step: int):
    """The train config a run resumed at `step` goes on with: `asked`, its schedule length settled.

    saved: the TrainConfig of the run's config.yaml; asked: the one the resume asks for. The cosine
    keeps the length the run started with (`schedule_length(saved)`) when asked.schedule_steps is 0
    (not given); the result then holds that length in schedule_steps whenever it differs from
    asked.steps, so config.yaml records it for the next resume. An asked.schedule_steps that differs
    is a deliberate re-stretch: it is kept and logged with the jump in learning rate. A run that is
    to go past its schedule's end is logged with the learning rate it will go on at.
    """
    started = schedule_length(saved)
    if asked.schedule_steps and asked.schedule_steps != started:
        before, after = learning_rate(step, saved), learning_rate(step, asked)
        log.warning("train.schedule_steps=%d re-stretches the cosine schedule this run started with (%d steps): the "
                    "learning rate at step %d goes from %.3g to %.3g", asked.schedule_steps, started, step, before, after)
        return asked
    kept = dataclasses.replace(asked, schedule_steps=0 if started == asked.steps else started)
    if asked.steps > started:
        log.warning("train.steps=%d goes past the end of the cosine schedule this run started with (%d steps): steps "
                    "%d-%d run at train.min_lr=%g; set train.schedule_steps=%d to re-stretch the cosine instead",
                    asked.steps, started, max(step, started) + 1, asked.steps, asked.min_lr, asked.steps)
    return kept


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `learning_rate` (warm-up and cosine over `schedule_length` steps), so its
    state saves and restores with the optimizer."""
    def factor(step: int) -> float:
        return learning_rate(step, train_cfg) / max(train_cfg.lr, 1e-30)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
