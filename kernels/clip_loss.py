"""CLIP InfoNCE loss: functional `clip_loss`, open_clip-compatible `ClipLoss`, and the
fused-projection form `fused_projection_clip_loss`.

All three run the plain-torch path in `reference.py` in this build; `LIFT_FAST_KERNELS` is read and
checked at every call so that the Triton kernels can slot in later without changing callers.
"""

from __future__ import annotations

import torch
from torch import nn

from .reference import (
    check_process_group,
    check_rank,
    clip_loss_torch,
    gather_rows,
    loss_implementation,
    normalize_rows,
    prepare_loss_inputs,
    project_and_normalize,
)
from .siglip_loss import siglip_loss

FUSED_LOSSES = ("clip", "siglip")


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Symmetric CLIP InfoNCE loss of matched image/text pairs (row i of each is a pair).

    logits = logit_scale * image_features @ text_features.T (+ logit_bias);
    loss = (cross_entropy(logits, arange(B)) + cross_entropy(logits.T, arange(B))) / 2.

    Args:
        image_features: [B, D], used as given (normalise them first, as open_clip's model does).
        text_features: [B, D]; a different floating dtype is promoted to a common one.
        logit_scale: the already-exponentiated scale, a float or 0-d (one-element) tensor.
        logit_bias: optional float or 0-d tensor added to every logit (it cancels in the softmax,
            so its gradient is zero).

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
    return clip_loss_torch(image_features, text_features, scale, bias)


def fused_projection_clip_loss(
    image_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
    loss: str = "clip",
) -> torch.Tensor:
    """Contrastive loss of the head's last linear layer output, projection and loss in one call.

    Computes `clip_loss` (or `siglip_loss`) of normalize(image_hidden @ weight.T + bias) against
    normalize(text_features). In this build it is the plain-torch composition of those steps (the
    projection in the input dtype, the norms in float32); the fused Triton kernel, which never holds
    the [B, D] projection, comes later behind the same signature.

    Args:
        image_hidden: [B, H] hidden states entering the head's last linear layer.
        weight: [D, H] that layer's weight; bias: [D] or None.
        text_features: [B, D] caption embeddings (normalised here; already unit rows are fine).
        logit_scale: the already-exponentiated scale; logit_bias: optional additive bias.
        loss: "clip" or "siglip".

    Returns:
        0-d loss, as `clip_loss`/`siglip_loss` return it.

    Raises:
        ValueError: an unknown `loss`, or shapes that do not chain ([B, H] x [D, H] -> [B, D] against
            [B, D] text features), named in the message.
        TypeError, RuntimeError: as `clip_loss`.
    """
    if loss not in FUSED_LOSSES:
        raise ValueError(f"loss={loss!r} is not supported; use one of {', '.join(FUSED_LOSSES)}")
    if image_hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != image_hidden.shape[1]:
        raise ValueError(
            f"image_hidden {tuple(image_hidden.shape)} must be [B, H] and weight "
            f"{tuple(weight.shape)} must be [D, H] with the same H"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} must be [D] = ({weight.shape[0]},) to match "
                         f"weight {tuple(weight.shape)}")
    if text_features.dim() != 2 or tuple(text_features.shape) != (image_hidden.shape[0], weight.shape[0]):
        raise ValueError(
            f"text_features {tuple(text_features.shape)} must be [B, D] = "
            f"({image_hidden.shape[0]}, {weight.shape[0]}) to match image_hidden "
            f"{tuple(image_hidden.shape)} and weight {tuple(weight.shape)}"
        )
    loss_implementation()
    image_features = project_and_normalize(image_hidden, weight, bias)  # [B, D]
    text_features = normalize_rows(text_features)  # [B, D]
    if loss == "clip":
        return clip_loss(image_features, text_features, logit_scale, logit_bias)
    return siglip_loss(image_features, text_features, logit_scale, logit_bias)


class ClipLoss(nn.Module):
    """open_clip's ClipLoss (same constructor, forward and values), on the lift_fast.kernels path.

    Under torch.distributed (world_size > 1) the features of all ranks are gathered, as open_clip does:
    `gather_with_grad=True` gathers with gradients (torch.distributed.nn all_gather); otherwise the
    gathered copies are detached (and, without `local_loss`, this rank's slot keeps its graph).
    `local_loss=True` scores this rank's rows against the global batch; without it every rank
    computes the full global-batch loss. Every rank must pass the same local batch size.

    Args:
        local_loss, gather_with_grad, rank, world_size: as in open_clip.
        cache_labels: accepted for compatibility; the labels are a cheap arange built per call.
        use_horovod: must be False (Horovod is not supported).

    Raises:
        NotImplementedError: use_horovod=True.
        ValueError: world_size < 1 or rank outside [0, world_size).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
    ):
        super().__init__()
        if use_horovod:
            raise NotImplementedError(
                "ClipLoss(use_horovod=True): Horovod is not supported by lift_fast.kernels; "
                "run under torch.distributed (torchrun) with use_horovod=False"
            )
        check_rank(rank, world_size, "ClipLoss")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        output_dict: bool = False,
    ):
        """Loss of this rank's [b, D] image and text features; see `clip_loss` for dtypes and errors.

        Returns:
            the 0-d loss, or {"contrastive_loss": loss} with `output_dict`.
        """
        if self.world_size == 1:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias)
        else:
            loss = self._distributed_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed_loss(self, image_features, text_features, logit_scale, logit_bias):
        loss_implementation()
        image_features, text_features, scale, bias = prepare_loss_inputs(
            image_features, text_features, logit_scale, logit_bias)
        check_process_group(self.rank, self.world_size, "ClipLoss")
        gather = dict(rank=self.rank, world_size=self.world_size, with_grad=self.gather_with_grad,
                      keep_local_grad=not self.local_loss)
        all_image_features = gather_rows(image_features, **gather)  # [W * b, D]
        all_text_features = gather_rows(text_features, **gather)  # [W * b, D]
        if not self.local_loss:
            return clip_loss_torch(all_image_features, all_text_features, scale, bias)
        return clip_loss_torch(
            image_features, text_features, scale, bias,
            image_columns=all_image_features, text_columns=all_text_features,
            label_offset=self.rank * image_features.shape[0],
        )

