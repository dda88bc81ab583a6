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

A second pair, the head's last Linear + L2 norm + CLIP loss (forward and backward) at B=512,
H=D=1024, fp32: baseline `clip_loss(normalize(fc2(hidden)), ...)` as the plain head computes it,
candidate `fused_projection_clip_loss(hidden, fc2.weight, fc2.bias, ...)` (model.fuse_projection).
Besides the time it records the step's peak memory above what was allocated before it (the
profiler's allocation events on the CPU, torch.cuda.max_memory_allocated on CUDA).

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

from lift_fast.config import ModelConfig, TrainConfig
from lift_fast.kernels import clip_loss, fused_projection_clip_loss
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


HEAD_BATCH, HEAD_HIDDEN, HEAD_DIM = 512, 1024, 1024
HEAD_PAIR = f"head last Linear + norm + clip loss fwd+bwd B={HEAD_BATCH} H={HEAD_HIDDEN} D={HEAD_DIM} fp32 cpu"


def step_bytes(function) -> tuple[int, int, object]:
    """(peak bytes allocated while `function()` runs, bytes it leaves allocated, what it returned),
    both above what was allocated when it started."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = function()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, torch.cuda.memory_allocated() - start, result
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = function()
    # every allocation and free, in order (the FunctionEvents fold them into their ops' totals)
    changes = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                     if event.name() == "[memory]")
    level = peak = 0
    for _, change in changes:
        level += change
        peak = max(peak, level)
    return peak, level, result


def make_head_step(side: str):
    """(forward, step): forward() computes the head's last layer and the loss (the graph kept for
    backward); step() runs forward and backward and returns the loss and the gradients."""
    generator = torch.Generator().manual_seed(SEED)
    last = torch.nn.Linear(HEAD_HIDDEN, HEAD_DIM)
    with torch.no_grad():
        last.weight.copy_(torch.randn(HEAD_DIM, HEAD_HIDDEN, generator=generator) * HEAD_HIDDEN**-0.5)
        last.bias.zero_()
    hidden = torch.randn(HEAD_BATCH, HEAD_HIDDEN, generator=generator).requires_grad_()
    texts = F.normalize(torch.randn(HEAD_BATCH, HEAD_DIM, generator=generator), dim=-1)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [hidden, last.weight, last.bias, log_scale]

    def forward():
        if side == "baseline":
            return clip_loss(F.normalize(last(hidden), dim=-1), texts, log_scale.exp())
        return fused_projection_clip_loss(hidden, last.weight, last.bias, texts, log_scale.exp())

    def step():
        for param in params:
            param.grad = None
        loss = forward()
        loss.backward()
        return loss.detach(), [param.grad for param in params]

    return forward, step


@pytest.fixture(scope="module")
def head_reference():
    return make_head_step("baseline")[1]()


@pytest.mark.parametrize("side", ["baseline", "fused_projection"])
def test_head_fused_projection(paired_benchmark, side, head_reference):
    forward, step = make_head_step(side)
    loss, grads = step()
    torch.testing.assert_close(loss, head_reference[0], rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, head_reference[1], strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    peak, _, _ = step_bytes(step)
    _, held, kept = step_bytes(forward)  # what the graph holds from forward to backward, the loss included
    del kept
    paired_benchmark(HEAD_PAIR, step, rounds=8, warmup_rounds=1)
    if paired_benchmark.benchmark.stats is not None:
        paired_benchmark.record(peak_bytes=peak, held_for_backward_bytes=held, peak_mib=f"{peak / 2**20:.1f}",
                                held_mib=f"{held / 2**20:.2f}")
