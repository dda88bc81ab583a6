"""SigLIP pairwise sigmoid loss without the B x B logits: `siglip_loss` and open_clip's `SigLipLoss`.

Row slabs as in clip_loss.py: sim = rows @ texts.T [m, N] float32 (one GEMM), one element-wise
pass for the loss terms (forward) or their gradient (backward), then d image[rows] = G @ texts and
d texts += G.T @ rows. No column statistics are needed: the sigmoid loss is a plain sum. Under
torch.distributed each rank scores its images against every rank's texts (gathered without
autograd; their gradients are summed back to their owners), as open_clip's neighbour exchange does.
"""

from __future__ import annotations

import torch
from torch import nn

from . import slab_ops
from .chunking import accumulate_matmul, all_gather_rows, autocast_off, similarity, slab_rows, text_gradient
from .reference import check_process_group, check_rank, loss_implementation, prepare_loss_inputs

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


@torch.library.custom_op("lift_fast::siglip_forward", mutates_args=())
def siglip_forward(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, rank: int,
                   world_size: int, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of this rank's images against all texts (divided by b), and the gathered texts [N, D]
    (an empty tensor when world_size is 1). image, text: [b, D]; scale, bias: 0-d."""
    with autocast_off(image.device):  # one GEMM dtype: the one the inputs were cast to
        b, dim = image.shape
        texts = all_gather_rows(text, world_size) if world_size > 1 else text  # [N, D]
        s, t = scale, bias  # device tensors: the kernels read them through pointers, no host sync
        total = torch.zeros((), device=image.device, dtype=scale.dtype)
        step = slab_rows(b, texts.shape[0], dim)
        for start in range(0, b, step):
            sim = similarity(image[start:start + step], texts)  # [m, N]
            # coef weighs the gradient only: any device scalar will do without one
            total += slab_ops.siglip_slab(sim, None, scale=s, bias=t, coef=s, diag_offset=rank * b + start,
                                          use_triton=use_triton)[0].to(total.dtype)
        return total / b, texts if world_size > 1 else text.new_empty(0)


@siglip_forward.register_fake
def _(image, text, scale, bias, rank, world_size, use_triton):
    b, dim = image.shape
    return scale.new_empty(()), image.new_empty(b * world_size, dim) if world_size > 1 else image.new_empty(0)


@torch.library.custom_op("lift_fast::siglip_backward", mutates_args=())
def siglip_backward(grad_loss: torch.Tensor, image: torch.Tensor, text: torch.Tensor, gathered: torch.Tensor,
                    scale: torch.Tensor, bias: torch.Tensor, rank: int, world_size: int, text_grad: bool,
                    use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """d image [b, D], d text [b, D] (empty unless text_grad; summed over every rank's loss), d scale, d bias."""
    with autocast_off(image.device):  # one GEMM dtype: the one the inputs were cast to
        b, dim = image.shape
        texts = gathered if world_size > 1 else text  # [N, D]
        n = texts.shape[0]
        s, t, coef = scale, bias, grad_loss.reshape(()).to(scale.dtype) / b  # device tensors, no host sync
        step = slab_rows(b, n, dim)
        slab_grad = torch.empty(min(step, b), n, device=image.device, dtype=image.dtype)
        grad_image = torch.empty_like(image)
        grad_texts = torch.zeros(n, dim, device=image.device, dtype=scale.dtype) if text_grad else None
        sums = torch.zeros(3, device=image.device, dtype=scale.dtype)  # loss, d scale, d bias
        for start in range(0, b, step):
            rows = image[start:start + step]
            grad = slab_grad[:rows.shape[0]]
            sums += slab_ops.siglip_slab(similarity(rows, texts), grad, scale=s, bias=t, coef=coef,
                                         diag_offset=rank * b + start, use_triton=use_triton).to(sums.dtype)
            torch.mm(grad, texts, out=grad_image[start:start + step])
            if grad_texts is not None:
                accumulate_matmul(grad_texts, grad.T, rows)
        grad_text = text_gradient(grad_texts, text, image, rank, world_size)
        return grad_image, grad_text, sums[1].clone(), sums[2].clone()


@siglip_backward.register_fake
def _(grad_loss, image, text, gathered, scale, bias, rank, world_size, text_grad, use_triton):
    grad_text = torch.empty_like(text) if text_grad else image.new_empty(0)
    return torch.empty_like(image), grad_text, torch.empty_like(scale), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    image, text, scale, bias, rank, world_size, use_triton = inputs
    ctx.save_for_backward(image, text, output[1], scale, bias)
    ctx.config = (rank, world_size, use_triton)


def _backward(ctx, grad_loss, _gathered):
    image, text, gathered, scale, bias = ctx.saved_tensors
    rank, world_size, use_triton = ctx.config
    grads = siglip_backward(grad_loss, image, text, gathered, scale, bias, rank, world_size,
                            ctx.needs_input_grad[1], use_triton)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])), None, None, None)


torch.library.register_autograd("lift_fast::siglip_forward", _backward, setup_context=_setup_context)


def chunked_siglip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *,
                        rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The chunked loss on prepared inputs (one dtype, 0-d scale and bias); see `siglip_loss`."""
    use_triton = loss_implementation(image.device) == "triton"
    if bias is None:
        bias = torch.zeros((), device=scale.device, dtype=scale.dtype)
    loss, _ = siglip_forward(image.contiguous(), text.contiguous(), scale, bias, rank, world_size, use_triton)
    return loss


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
        0-d loss in float32 (float64 if an input is float64), computed slab by slab without the
        [B, B] logits. Differentiable in the features, the scale and the bias; frozen texts cost no
        text-gradient FLOPs.

    Raises:
        TypeError, ValueError: features that are not matching [B, D] floating tensors with B >= 1,
            or a scale/bias with more than one element.
        ValueError, RuntimeError: a bad or unavailable `LIFT_FAST_KERNELS` choice.
    """
    image_features, text_features, scale, bias = prepare_loss_inputs(
        image_features, text_features, logit_scale, logit_bias)
    return chunked_siglip_loss(image_features, text_features, scale, bias)


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
            image_features, text_features, scale, bias = prepare_loss_inputs(
                image_features, text_features, logit_scale, logit_bias)
            check_process_group(self.rank, self.world_size, "SigLipLoss")
            loss = chunked_siglip_loss(image_features, text_features, scale, bias, rank=self.rank,
                                       world_size=self.world_size)
        return {"contrastive_loss": loss} if output_dict else loss
