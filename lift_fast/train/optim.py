"""AdamW with LIFT's parameter groups, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

# Parameters that never get weight decay besides biases and norm weights (all 1-D).
NO_DECAY_NAMES = ("logit_scale", "pos_embed", "cls_token")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices with weight decay; biases, norms, logit scale and embeddings without."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, train_cfg) -> torch.optim.AdamW:
    """AdamW (fused where the device supports it) over `parameter_groups`."""
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(parameter_groups(model, train_cfg.weight_decay), lr=train_cfg.lr,
                             betas=train_cfg.betas, eps=train_cfg.eps, fused=fused or None)


def cosine_schedule(step: int, *, steps: int, warmup_steps: int, lr: float, min_lr: float = 0.0) -> float:
    """Learning rate at `step` (0-based): linear warm-up to lr, then cosine down to min_lr at `steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `cosine_schedule`, so its state saves and restores with the optimizer."""
    def factor(step: int) -> float:
        return cosine_schedule(step, steps=train_cfg.steps, warmup_steps=train_cfg.warmup_steps,
                               lr=train_cfg.lr, min_lr=train_cfg.min_lr) / max(train_cfg.lr, 1e-30)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
