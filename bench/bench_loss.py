"""Contrastive (CLIP InfoNCE) loss, forward + backward: lift_fast.kernels.clip_loss against the
naive loss that materialises the [B, B] logits and calls F.cross_entropy both ways.

Besides time, each side records `saved_bytes`: the bytes autograd keeps for the backward pass
(measured with saved_tensors_hooks, outside the timing), which is what a fused loss saves on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lift_fast.kernels import clip_loss

BATCH, DIM = 1024, 256
PAIR = f"clip_loss fwd+bwd B={BATCH} D={DIM} fp32 cpu"


def naive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                    logit_scale: torch.Tensor) -> torch.Tensor:
    """open_clip's formulation: full logits, cross-entropy over rows and over columns."""
    logits = logit_scale * image_features @ text_features.T  # [B, B]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


LOSSES = {"baseline": naive_clip_loss, "lift_fast": clip_loss}


def forward_backward(loss_fn, image_features, text_features, logit_scale):
    """One loss evaluation and the gradients of features and scale (no accumulation into .grad)."""
    loss = loss_fn(image_features, text_features, logit_scale)
    return torch.autograd.grad(loss, (image_features, text_features, logit_scale))


def saved_bytes(loss_fn, *inputs: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward pass."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(*inputs)
    return sum(storages.values())


@pytest.fixture(scope="module")
def loss_inputs():
    generator = torch.Generator().manual_seed(0)
    image_features = F.normalize(torch.randn(BATCH, DIM, generator=generator), dim=-1)
    text_features = F.normalize(torch.randn(BATCH, DIM, generator=generator), dim=-1)
    logit_scale = torch.tensor(1 / 0.07)
    return tuple(t.requires_grad_() for t in (image_features, text_features, logit_scale))


@pytest.mark.parametrize("side", list(LOSSES))
def test_clip_loss_forward_backward(paired_benchmark, side, loss_inputs):
    loss_fn = LOSSES[side]
    # A speedup only counts if the answer is the same.
    torch.testing.assert_close(loss_fn(*loss_inputs), naive_clip_loss(*loss_inputs))
    paired_benchmark(PAIR, forward_backward, loss_fn, *loss_inputs, rounds=8, warmup_rounds=1)
    paired_benchmark.record(saved_bytes=saved_bytes(loss_fn, *loss_inputs))
