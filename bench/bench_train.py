"""One CPU training step, samples/s: lift_fast's step against a plain reference step.

Both sides train the same ViT (build_model: vit_tiny_patch16, depth 6, 64-px images, text dim 384,
same seed, so identical weights) on the same synthetic batch (images [128, 3, 64, 64], frozen unit
text embeddings [128, 384]), with AdamW at the same settings (train config defaults) and gradient
clipping at 1.0; both clamp the logit scale after the update, as open_clip and `lift-fast train` do.

  baseline:  forward, naive CLIP loss (the materialised [B, B] logits, F.cross_entropy both ways,
             open_clip's formulation), backward, clip, AdamW over all parameters in one group
  lift_fast: the same with lift_fast.kernels.clip_loss (chunked) and
             lift_fast.train.optim.build_optimizer (parameter groups): what `lift-fast train` runs
             per step, without the data loader (and without the lr schedule)

Throughput: the batch is the same on both sides, so samples/s = BATCH / step time and the pair's
speedup (baseline time / candidate time) is the throughput ratio, candidate / baseline. Each side
records `seconds_per_sample` (a cost, so its printed ratio reads like the speedup) and
`samples_per_second` as text (no ratio, which for a throughput would read inverted).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lift_fast.kernels import clip_loss

from lift_fast.config import ModelConfig, TrainConfig
from lift_fast.models.vit import build_model
from lift_fast.train.optim import build_optimizer

BATCH, IMAGE_SIZE, TEXT_DIM, DEPTH, SEED = 128, 64, 384, 6, 0
PAIR = f"train step vit_tiny_patch16 depth={DEPTH} B={BATCH} {IMAGE_SIZE}px D={TEXT_DIM} fp32 cpu"


def naive_clip_loss(image_features, text_features, logit_scale):
    """open_clip's ClipLoss: full logits, cross-entropy over rows and over columns."""
    logits = logit_scale * image_features @ text_features.T  # [B, B]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def make_batch():
    generator = torch.Generator().manual_seed(SEED)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = (torch.rand(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) - mean) / std
    texts = F.normalize(torch.randn(BATCH, TEXT_DIM, generator=generator), dim=-1)  # frozen
    return images, texts


def make_step(side: str):
    """(model, step): step(images, texts) runs one training step and returns the loss."""
    model_cfg = ModelConfig(name="vit_tiny_patch16", depth=DEPTH)
    train_cfg = TrainConfig()
    torch.manual_seed(SEED)
    model = build_model(model_cfg, IMAGE_SIZE, TEXT_DIM, train_cfg.logit_scale_init)
    model.train()
    if side == "baseline":
        loss_fn = naive_clip_loss
        optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, betas=train_cfg.betas,
                                      eps=train_cfg.eps, weight_decay=train_cfg.weight_decay)
    else:
        loss_fn = clip_loss
        optimizer = build_optimizer(model, train_cfg)
    max_log_scale = math.log(train_cfg.logit_scale_max)

    def step(images, texts):
        loss = loss_fn(model(images), texts, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_log_scale)
        return loss.detach()

    return model, step


@pytest.fixture(scope="module")
def batch():
    return make_batch()


@pytest.fixture(scope="module")
def first_step_loss(batch):
    """The reference side's loss on its first step (before any update)."""
    return make_step("baseline")[1](*batch)


@pytest.mark.parametrize("side", ["baseline", "lift_fast"])
def test_train_step(paired_benchmark, side, batch, first_step_loss):
    _, step = make_step(side)
    # Same weights, same batch: the first step's loss must be the reference's.
    torch.testing.assert_close(step(*batch), first_step_loss, rtol=1e-4, atol=1e-5)
    paired_benchmark(PAIR, step, *batch, rounds=5, warmup_rounds=1)
    stats = paired_benchmark.benchmark.stats
    if stats is not None:
        seconds = stats.stats.mean
        paired_benchmark.record(seconds_per_sample=seconds / BATCH,
                                samples_per_second=f"{BATCH / seconds:.1f}")
