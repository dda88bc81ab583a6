"""SigLIP pairwise sigmoid loss: functional `siglip_loss` and open_clip-compatible `SigLipLoss`.

Runs the plain-torch path in `reference.py` in this build; `LIFT_FAST_KERNELS` is read and checked
at every call.
"""

from __future__ import annotations

import torch
from torch import nn

from .reference import (
    check_process_group,
    check_rank,
    gather_rows,
    loss_implementation,
    prepare_loss_inputs,
    siglip_loss_torch,
)

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None,
) -> torch.Tensor:
    """SigLIP loss of matched image/text pairs (row i of each is a pair), as open_clip's SigLipLoss.

    logits = logit_scale * image_features @ text_features.T + logit_bias; labels = 2 * eye(B) - 1;
    loss = -logsigmoid(labels * logits).sum() / B.

    Args:
        image_features: [B, D], used as given (normalise them first).
        text_features: [B, D]; a different floating dtype is promoted to a common one.
        logit_scale: the already-exponentiated scale, a float or 0-d (one-element) tensor.
        logit_bias: float or 0-d tensor (SigLIP learns it, init -10); None means no bias.

    Returns:
        0-d loss in float32 (float64 if an input is float64); the similarity matmul runs in the
        features' dtype, everything after it in float32. Differentiable in the features, the scale
        and the bias.

    Raises:
        TypeError, ValueError: features that are not matching [B, D] floating tensors with B >= 1,
            or a scale/bias with more than one element.
        ValueError, RuntimeError: a bad or unavailable `LIFT_FAST_KERNELS` choice.
    """
    loss_implementation()
    image_features, text_features, scale, bias = prepare_loss_inputs(
        image_features, text_features, logit_scale, logit_bias)
    return siglip_loss_torch(image_features, text_features, scale, bias)


class SigLipLoss(nn.Module):
    """open_clip's SigLipLoss (same constructor, forward and values), on the lift_fast.kernels path.

    Under torch.distributed (world_size > 1) each rank scores its own images against the text
    features of every rank, gathered with gradients; this gives the loss and gradients of open_clip's
    neighbour exchange, whichever `dist_impl` is named. Every rank must pass the same local batch
    size.

    Args:
        cache_labels: accepted for compatibility (open_clip does not use it either).
        rank, world_size: this process's place in the default process group.
        dist_impl: None, "bidir", "shift", "reduce" or "gather" (all computed by one all_gather).

    Raises:
        ValueError: an unknown dist_impl, world_size < 1 or rank outside [0, world_size).
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
    ):
        super().__init__()
        check_rank(rank, world_size, "SigLipLoss")
        dist_impl = dist_impl or "bidir"
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"SigLipLoss(dist_impl={dist_impl!r}): use None or one of "
                             f"{', '.join(DIST_IMPLS)}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None,
        output_dict: bool = False,
    ):
        """Loss of this rank's [b, D] image and text features; see `siglip_loss` for dtypes and errors.

        Returns:
            the 0-d loss, or {"contrastive_loss": loss} with `output_dict` (open_clip's key).
        """
        if self.world_size == 1:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias)
        else:
            loss_implementation()
            image_features, text_features, scale, bias = prepare_loss_inputs(
                image_features, text_features, logit_scale, logit_bias)
            check_process_group(self.rank, self.world_size, "SigLipLoss")
            all_text_features = gather_rows(  # [W * b, D]
                text_features, rank=self.rank, world_size=self.world_size, with_grad=True)
            loss = siglip_loss_torch(image_features, all_text_features, scale, bias,
                                     positive_offset=self.rank * image_features.shape[0])
        return {"contrastive_loss": loss} if output_dict else loss
