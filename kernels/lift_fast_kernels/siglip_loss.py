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
from .chunking import (
    all_gather_rows,
    autocast_off,
    resolve_gathered,
    similarity,
    slab_budget,
    slab_rows,
    slab_starts,
    text_gradient,
    text_gradient_buffer,
    write_matmul,
)
from .reference import check_process_group, check_rank, loss_implementation, prepare_loss_inputs

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


@torch.library.custom_op("lift_fast::siglip_forward", mutates_args=())
def siglip_forward(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, rank: int,
                   world_size: int, use_triton: bool, gathered_in: torch.Tensor | None = None,
                   slab_bytes: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of this rank's images against all texts (divided by b), and the texts this call gathered
    [N, D] (an empty tensor when world_size is 1 or gathered_in holds them already). image, text: [b, D];
    scale, bias: 0-d; slab_bytes: the slab budget (0: default). Per slab: one GEMM, one Triton launch."""
    with autocast_off(image.device):  # one GEMM dtype: the one the inputs were cast to
        b, dim = image.shape
        gathered = all_gather_rows(text, world_size) if world_size > 1 and gathered_in is None else None
        texts = text if world_size == 1 else gathered_in if gathered is None else gathered  # [N, D]
        n = texts.shape[0]
        step = slab_rows(b, n, slab_bytes, image.is_cuda)
        starts = slab_starts(b, step)
        partials = scale.new_zeros(len(starts), slab_ops.partials_per_slab(min(step, b), n, use_triton,
                                                                           slab_ops.SIGLIP_BLOCK_M), 3)
        for index, start in enumerate(starts):
            # the [m, N] similarities are not bound to a name: freed before the next slab's are made;
            # scale and bias are device tensors: the kernels read them through pointers, no host sync;
            # coef weighs the gradient only: any device scalar will do without one
            slab_ops.siglip_slab(similarity(image[start:start + step], texts), None, partials[index], scale=scale,
                                 bias=bias, coef=scale, diag_offset=rank * b + start, use_triton=use_triton)
        return partials[..., 0].sum() / b, text.new_empty(0) if gathered is None else gathered


@siglip_forward.register_fake
def _(image, text, scale, bias, rank, world_size, use_triton, gathered_in=None, slab_bytes=0):
    b, dim = image.shape
    gathered = image.new_empty(b * world_size, dim) if world_size > 1 and gathered_in is None else image.new_empty(0)
    return scale.new_empty(()), gathered


@torch.library.custom_op("lift_fast::siglip_backward", mutates_args=())
def siglip_backward(grad_loss: torch.Tensor, image: torch.Tensor, text: torch.Tensor, gathered: torch.Tensor,
                    scale: torch.Tensor, bias: torch.Tensor, rank: int, world_size: int, text_grad: bool,
                    use_triton: bool, slab_bytes: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """d image [b, D], d text [b, D] (empty unless text_grad; summed over every rank's loss), d scale, d bias.
    Row slabs for d image, transposed column slabs for d texts (each row written once), as clip_backward."""
    with autocast_off(image.device):  # one GEMM dtype: the one the inputs were cast to
        b, dim = image.shape
        texts = gathered if world_size > 1 else text  # [N, D]
        n = texts.shape[0]
        coef = grad_loss.reshape(()).to(scale.dtype) / b  # device tensors, no host sync
        step = slab_rows(b, n, slab_bytes, image.is_cuda)
        starts = slab_starts(b, step)
        slab_grad = torch.empty(min(step, b), n, device=image.device, dtype=image.dtype)
        grad_image = torch.empty_like(image)
        # loss, d scale, d bias partial sums of every slab, summed once after the loop
        partials = scale.new_zeros(len(starts), slab_ops.partials_per_slab(min(step, b), n, use_triton,
                                                                           slab_ops.SIGLIP_BLOCK_M), 3)
        for index, start in enumerate(starts):
            rows = image[start:start + step]
            grad = slab_grad[:rows.shape[0]]
            slab_ops.siglip_slab(similarity(rows, texts), grad, partials[index], scale=scale, bias=bias, coef=coef,
                                 diag_offset=rank * b + start, use_triton=use_triton)
            torch.mm(grad, texts, out=grad_image[start:start + step])
        del slab_grad
        grad_texts = None
        if text_grad:
            grad_texts = text_gradient_buffer(texts, world_size)
            col_step = slab_rows(n, b, slab_bytes, image.is_cuda)
            column_grad = torch.empty(min(col_step, n), b, device=image.device, dtype=image.dtype)
            scratch = scale.new_empty(slab_ops.partials_per_slab(min(col_step, n), b, use_triton,
                                                                 slab_ops.SIGLIP_BLOCK_M), 3)
            for start in slab_starts(n, col_step):
                columns = texts[start:start + col_step]
                grad = column_grad[:columns.shape[0]]  # [k, b] = G[:, cols].T: the sigmoid loss is symmetric
                slab_ops.siglip_slab(similarity(columns, image), grad, scratch, scale=scale, bias=bias, coef=coef,
                                     diag_offset=start - rank * b, use_triton=use_triton)
                write_matmul(grad_texts[start:start + col_step], grad, image)
        grad_text = text_gradient(grad_texts, text, image, rank, world_size)
        sums = partials.sum(dim=(0, 1))  # loss, d scale, d bias
        return grad_image, grad_text, sums[1].clone(), sums[2].clone()


@siglip_backward.register_fake
def _(grad_loss, image, text, gathered, scale, bias, rank, world_size, text_grad, use_triton, slab_bytes=0):
    grad_text = torch.empty_like(text) if text_grad else image.new_empty(0)
    return torch.empty_like(image), grad_text, torch.empty_like(scale), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    image, text, scale, bias, rank, world_size, use_triton, gathered_in, slab_bytes = inputs
    ctx.save_for_backward(image, text, output[1] if gathered_in is None else gathered_in, scale, bias)
    ctx.config = (rank, world_size, use_triton, slab_bytes)


def _backward(ctx, grad_loss, _gathered):
    image, text, gathered, scale, bias = ctx.saved_tensors
    rank, world_size, use_triton, slab_bytes = ctx.config
    grads = siglip_backward(grad_loss, image, text, gathered, scale, bias, rank, world_size,
                            ctx.needs_input_grad[1], use_triton, slab_bytes)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])), None, None, None, None, None)


torch.library.register_autograd("lift_fast::siglip_forward", _backward, setup_context=_setup_context)


def chunked_siglip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *,
                        rank: int = 0, world_size: int = 1, gathered_text_features=None,
                        slab_bytes: int | None = None) -> torch.Tensor:
    """The chunked loss on prepared inputs (one dtype, 0-d scale and bias); see `siglip_loss`."""
    use_triton = loss_implementation(image.device) == "triton"
    if bias is None:
        bias = torch.zeros((), device=scale.device, dtype=scale.dtype)
    gathered = resolve_gathered(gathered_text_features, text, world_size)
    loss, _ = siglip_forward(image.contiguous(), text.contiguous(), scale, bias, rank, world_size, use_triton,
                             gathered, slab_budget(slab_bytes))
    return loss


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None,
    *,
    slab_bytes: int | None = None,
) -> torch.Tensor:
    """SigLIP loss of matched image/text pairs (row i of each is a pair), as open_clip's SigLipLoss.

    logits = logit_scale * image_features @ text_features.T + logit_bias; labels = 2 * eye(B) - 1;
    loss = -logsigmoid(labels * logits).sum() / B.

    Args:
        image_features: [B, D], used as given (normalise them first).
        text_features: [B, D]; a different floating dtype is promoted to a common one.
        logit_scale: the already-exponentiated scale, a float or 0-d (one-element) tensor.
        logit_bias: float or 0-d tensor (SigLIP learns it, init -10); None means no bias.
        slab_bytes: bytes of similarities per slab, as in `clip_loss` (None: the variable or default).

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
    return chunked_siglip_loss(image_features, text_features, scale, bias, slab_bytes=slab_bytes)


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
        slab_bytes: the slab budget, as in `siglip_loss` (None: the variable or default).

    Raises:
        ValueError: an unknown dist_impl, world_size < 1 or rank outside [0, world_size), a bad slab_bytes.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        *,
        slab_bytes: int | None = None,
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
        self.slab_bytes = slab_bytes
        if slab_bytes is not None:
            slab_budget(slab_bytes)  # a bad budget fails at construction

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None,
        output_dict: bool = False,
        *,
        gathered_text_features=None,
    ):
        """Loss of this rank's [b, D] image and text features; see `siglip_loss` for dtypes and errors.

        gathered_text_features: as in `ClipLoss.forward`: every rank's texts already gathered (a tensor
        or a `start_text_gather` handle), so the loss gathers nothing itself.

        Returns:
            the 0-d loss, or {"contrastive_loss": loss} with `output_dict` (open_clip's key).
        """
        if self.world_size == 1:
            resolve_gathered(gathered_text_features, text_features, 1)  # checked, nothing to gather
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, slab_bytes=self.slab_bytes)
        else:
            image_features, text_features, scale, bias = prepare_loss_inputs(
                image_features, text_features, logit_scale, logit_bias)
            check_process_group(self.rank, self.world_size, "SigLipLoss")
            loss = chunked_siglip_loss(image_features, text_features, scale, bias, rank=self.rank,
                                       world_size=self.world_size, gathered_text_features=gathered_text_features,
                                       slab_bytes=self.slab_bytes)
        return {"contrastive_loss": loss} if output_dict else loss
