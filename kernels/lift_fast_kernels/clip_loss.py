"""CLIP InfoNCE without the B x B logits: `clip_loss`, open_clip-compatible `ClipLoss`, and
`fused_projection_clip_loss` (the image head's last linear layer and the L2 norm fused in).

Algorithm (row slabs; B rows of this rank, N = global batch, D = feature dim):
  forward   for each slab of rows: sim = rows @ texts.T  [m, N] float32 (one GEMM)
            -> row log-sum-exp (complete) and column log-sum-exp (running, over slabs)
            under torch.distributed the column stats of all ranks are merged (an all-gather of [N])
  backward  for each slab: recompute sim, turn it into d loss / d sim (one element-wise pass),
            d image[rows] = G @ texts, d texts += G.T @ rows (skipped for frozen texts)
FLOPs: 2 B N D forward, 4 (frozen texts) or 6 B N D backward. Memory beyond inputs and their
gradients: one [m, N] float32 slab and its gradient, with m chosen so the slab stays O(N D),
plus a float32 accumulator for the text gradient when texts need one.

The element-wise passes are Triton kernels on CUDA (or with LIFT_FAST_KERNELS=triton, on CPU
under TRITON_INTERPRET=1) and their torch twins otherwise (slab_ops.py). Forward and backward are
`torch.library` custom ops with fake implementations, so a compiled train step calls them as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
from .reference import (
    as_scalar,
    check_process_group,
    check_rank,
    clip_loss_torch,
    compute_dtype,
    gather_rows,
    gemm_dtype,
    loss_implementation,
    normalize_rows,
    prepare_loss_inputs,
    project_and_normalize,
)
from .siglip_loss import chunked_siglip_loss

FUSED_LOSSES = ("clip", "siglip")

# ------------------------------------------------------------------------------ the custom ops


def merge_stats(maxima: torch.Tensor, sums: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-block (max, sum of exp(x - max)) pairs along `dim` into one pair."""
    top = maxima.amax(dim=dim, keepdim=True)
    total = (sums * torch.exp(maxima - top)).sum(dim=dim, keepdim=True)
    return top.squeeze(dim), total.squeeze(dim)


@torch.library.custom_op("lift_fast::clip_forward", mutates_args=())
def clip_forward(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, rank: int, world_size: int,
                 use_triton: bool, gathered_in: torch.Tensor | None = None,
                 slab_bytes: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of this rank's rows, row and global column softmax statistics ([2, b] and [2, N]: max and
    log of sum(exp(logit - max))), and the gathered texts.

    image, text: [b, D] (unit rows); scale: 0-d; gathered_in: every rank's texts [N, D] already
    gathered (then no gather here), or None; slab_bytes: the slab budget (chunking.slab_budget, 0 for
    the default). The texts this call gathered [N, D] are returned for the backward, else an empty
    tensor (the texts themselves, or gathered_in, are used).
    Per slab: one GEMM and two Triton launches (the statistics kernel and the row merge).
    """
    with autocast_off(image.device):  # one GEMM dtype: the one the inputs were cast to
        b, dim = image.shape
        gathered = all_gather_rows(text, world_size) if world_size > 1 and gathered_in is None else None
        texts = text if world_size == 1 else gathered_in if gathered is None else gathered  # [N, D]
        n = texts.shape[0]
        stat_dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
        s = scale.to(stat_dtype)  # stays on the device: the kernels read it through a pointer
        row_stats = torch.empty(2, b, device=image.device, dtype=stat_dtype)  # max, log sum exp(logit - max)
        # scale * <image i, text of its positive>: from the same similarities as the softmaxes, so a pair that
        # wins by a margin of 0 in the GEMM's rounding scores exactly log(N), whatever the dtype
        positives = torch.empty(b, device=image.device, dtype=stat_dtype)
        col_stats = slab_ops.new_column_stats(n, row_stats)  # running max, sum of exp(logit - max)
        step = slab_rows(b, n, slab_bytes, image.is_cuda)
        for start in slab_starts(b, step):
            # [m, N], not bound to a name: it is freed before the next slab's is made
            slab_ops.clip_stats(similarity(image[start:start + step], texts), s, row_stats[:, start:start + step],
                                positives[start:start + step], col_stats, diag_offset=rank * b + start,
                                use_triton=use_triton)
        col_max, col_sum = col_stats
        if world_size > 1:  # merge the column statistics of every rank's rows: an all-gather of [2, N]
            merged = all_gather_rows(col_stats[None], world_size)  # [W, 2, N]
            col_max, col_sum = merge_stats(merged[:, 0], merged[:, 1], dim=0)
        col_stats = torch.stack([col_max, torch.log(col_sum)])  # [2, N]
        own = col_stats[:, rank * b:(rank + 1) * b]
        # lse - positive = (max - positive) + log sum: small terms, no large lse cancelling a large positive
        loss = ((row_stats[0] - positives + row_stats[1]).sum() + (own[0] - positives + own[1]).sum()) / (2 * b)
        return loss, row_stats, col_stats, text.new_empty(0) if gathered is None else gathered


@clip_forward.register_fake
def _(image, text, scale, rank, world_size, use_triton, gathered_in=None, slab_bytes=0):
    b, dim = image.shape
    stat_dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    gathered = image.new_empty(b * world_size, dim) if world_size > 1 and gathered_in is None else image.new_empty(0)
    return (image.new_empty((), dtype=stat_dtype), image.new_empty(2, b, dtype=stat_dtype),
            image.new_empty(2, b * world_size, dtype=stat_dtype), gathered)


@torch.library.custom_op("lift_fast::clip_backward", mutates_args=())
def clip_backward(grad_loss: torch.Tensor, image: torch.Tensor, text: torch.Tensor, gathered: torch.Tensor,
                  scale: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor, rank: int, world_size: int,
                  text_grad: bool, use_triton: bool,
                  slab_bytes: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d image [b, D], d text [b, D] (empty unless text_grad), d scale (0-d) of the rank's loss.

    Under torch.distributed these are the gradients of the sum of all ranks' losses, each rank's
    weighted by its own grad_loss: what open_clip's gather-with-grad all_gather gives.
    Row slabs give d image (per slab: the similarity GEMM, one Triton launch, the d image GEMM into
    its rows); with text_grad, column slabs give d texts the same way on the transposed similarities
    (texts [cols] @ image.T, K = D; d texts[cols] = G[:, cols].T @ image, K = b), each row written
    once, in the texts' dtype in one process: no float32 [N, D] accumulator read and written per slab.
    """
    with autocast_off(image.device):  # one GEMM dtype: the one the inputs were cast to
        b, dim = image.shape
        texts = gathered if world_size > 1 else text  # [N, D]
        n = texts.shape[0]
        s = scale.to(row_stats.dtype)
        # the coefficients stay device tensors: reading grad_loss on the host would wait for the GPU
        row_coef = grad_loss.reshape(()).to(row_stats.dtype) / (2 * b)
        if world_size > 1:  # column j belongs to the loss of the rank that owns text j
            col_coef = all_gather_rows(row_coef.reshape(1), world_size).repeat_interleave(b)  # [N]
        else:
            col_coef = row_coef  # 0-d: the kernels broadcast it (stride 0)
        step = slab_rows(b, n, slab_bytes, image.is_cuda)
        starts = slab_starts(b, step)
        slab_grad = torch.empty(min(step, b), n, device=image.device, dtype=image.dtype)
        grad_image = torch.empty_like(image)
        # d scale's partial sums of every slab, summed once after the loop (no per-slab reduction)
        partials = row_stats.new_zeros(len(starts), slab_ops.partials_per_slab(min(step, b), n, use_triton))
        for index, start in enumerate(starts):
            rows = image[start:start + step]
            grad = slab_grad[:rows.shape[0]]
            slab_ops.clip_grad(similarity(rows, texts), grad, row_stats[:, start:start + step], col_stats, row_coef,
                               col_coef, partials[index], scale=s, diag_offset=rank * b + start, use_triton=use_triton)
            torch.mm(grad, texts, out=grad_image[start:start + step])
        del slab_grad
        grad_texts = None
        if text_grad:
            grad_texts = text_gradient_buffer(texts, world_size)
            col_step = slab_rows(n, b, slab_bytes, image.is_cuda)
            column_grad = torch.empty(min(col_step, n), b, device=image.device, dtype=image.dtype)
            scratch = row_stats.new_empty(slab_ops.partials_per_slab(min(col_step, n), b, use_triton))
            for start in slab_starts(n, col_step):
                columns = texts[start:start + col_step]
                grad = column_grad[:columns.shape[0]]  # [k, b] = G[:, cols].T
                coef = col_coef if col_coef.dim() == 0 else col_coef[start:start + col_step]
                slab_ops.clip_grad(similarity(columns, image), grad, col_stats[:, start:start + col_step], row_stats,
                                   coef, row_coef, scratch, scale=s, diag_offset=start - rank * b,
                                   use_triton=use_triton)
                write_matmul(grad_texts[start:start + col_step], grad, image)
        grad_text = text_gradient(grad_texts, text, image, rank, world_size)
        return grad_image, grad_text, partials.sum().to(scale.dtype)


@clip_backward.register_fake
def _(grad_loss, image, text, gathered, scale, row_stats, col_stats, rank, world_size, text_grad, use_triton,
      slab_bytes=0):
    grad_text = torch.empty_like(text) if text_grad else image.new_empty(0)
    return torch.empty_like(image), grad_text, torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    image, text, scale, rank, world_size, use_triton, gathered_in, slab_bytes = inputs
    _, row_stats, col_stats, gathered = output
    ctx.save_for_backward(image, text, gathered if gathered_in is None else gathered_in, scale, row_stats, col_stats)
    ctx.config = (rank, world_size, use_triton, slab_bytes)


def _backward(ctx, grad_loss, _row_stats, _col_stats, _gathered):
    image, text, gathered, scale, row_stats, col_stats = ctx.saved_tensors
    rank, world_size, use_triton, slab_bytes = ctx.config
    grad_image, grad_text, grad_scale = clip_backward(grad_loss, image, text, gathered, scale, row_stats, col_stats,
                                                      rank, world_size, ctx.needs_input_grad[1], use_triton, slab_bytes)
    return (grad_image if ctx.needs_input_grad[0] else None,
            grad_text if ctx.needs_input_grad[1] else None,
            grad_scale if ctx.needs_input_grad[2] else None, None, None, None, None, None)


torch.library.register_autograd("lift_fast::clip_forward", _backward, setup_context=_setup_context)


def chunked_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, *, rank: int = 0,
                      world_size: int = 1, gathered_text_features=None, slab_bytes: int | None = None) -> torch.Tensor:
    """The chunked loss on prepared inputs (one dtype, contiguous, 0-d scale); see `clip_loss`."""
    use_triton = loss_implementation(image.device) == "triton"
    gathered = resolve_gathered(gathered_text_features, text, world_size)
    loss, *_ = clip_forward(image.contiguous(), text.contiguous(), scale, rank, world_size, use_triton, gathered,
                            slab_budget(slab_bytes))
    return loss


# ------------------------------------------------------------------------------ public API


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
    *,
    slab_bytes: int | None = None,
) -> torch.Tensor:
    """Symmetric CLIP InfoNCE loss of matched image/text pairs (row i of each is a pair).

    logits = logit_scale * image_features @ text_features.T (+ logit_bias);
    loss = (cross_entropy(logits, arange(B)) + cross_entropy(logits.T, arange(B))) / 2,
    computed slab by slab without the [B, B] logits (see the module docstring).

    Args:
        image_features: [B, D], used as given (normalise them first, as open_clip's model does).
        text_features: [B, D]; a different floating dtype is promoted to a common one. Frozen
            texts (requires_grad False) cost no text-gradient FLOPs.
        logit_scale: the already-exponentiated scale, a float or 0-d (one-element) tensor.
        logit_bias: optional float or 0-d tensor added to every logit (it cancels in the softmax,
            so its gradient is zero).
        slab_bytes: bytes of similarities per slab (a float32 value and its gradient each); None:
            `LIFT_FAST_SLAB_BYTES`, else 2 GiB with at least 1,024 rows (docs/loss.md, "Slab size").

    Returns:
        0-d loss in float32 (float64 if an input is float64). Differentiable in the features, the
        scale and the bias.

    Raises:
        TypeError, ValueError: features that are not matching [B, D] floating tensors with B >= 1,
            or a scale/bias with more than one element; a slab budget that is not a positive int.
        ValueError, RuntimeError: a bad or unavailable `LIFT_FAST_KERNELS` choice.
    """
    image_features, text_features, scale, bias = prepare_loss_inputs(
        image_features, text_features, logit_scale, logit_bias)
    loss = chunked_clip_loss(image_features, text_features, scale, slab_bytes=slab_bytes)
    return loss if bias is None else loss + 0 * bias  # the bias cancels; keep it in the graph


class _FusedProjectionClip(torch.autograd.Function):
    """CLIP loss of normalize(hidden @ weight.T + bias) against unit texts, keeping neither the
    projection nor the normalised features for the backward (both are recomputed from hidden).
    hidden, weight, bias and text come in one GEMM dtype; autocast is off inside, forward and backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, text, scale, rank, world_size, use_triton, gathered_in, slab_bytes):
        with autocast_off(hidden.device):
            projected = F.linear(hidden, weight, bias).to(scale.dtype)  # [B, D], float32 or float64
            inv_norm = torch.rsqrt(projected.pow(2).sum(dim=1).clamp_min(1e-24))  # [B]
            image = (projected * inv_norm[:, None]).to(hidden.dtype)
            loss, row_stats, col_stats, gathered = clip_forward(image, text, scale, rank, world_size, use_triton,
                                                                gathered_in, slab_bytes)
        gathered = gathered if gathered_in is None else gathered_in
        ctx.save_for_backward(hidden, weight, bias, text, gathered, scale, inv_norm, row_stats, col_stats)
        ctx.config = (rank, world_size, use_triton, slab_bytes)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, text, gathered, scale, inv_norm, row_stats, col_stats = ctx.saved_tensors
        rank, world_size, use_triton, slab_bytes = ctx.config
        with autocast_off(hidden.device):
            image = (F.linear(hidden, weight, bias).to(inv_norm.dtype) * inv_norm[:, None]).to(hidden.dtype)
            grad_image, grad_text, grad_scale = clip_backward(grad_loss, image, text, gathered, scale, row_stats,
                                                              col_stats, rank, world_size, ctx.needs_input_grad[3],
                                                              use_triton, slab_bytes)
            # through the L2 norm: d projected = (d image - image * <image, d image>) / |projected|
            unit, grad_unit = image.to(inv_norm.dtype), grad_image.to(inv_norm.dtype)
            grad_projected = ((grad_unit - unit * (unit * grad_unit).sum(1, keepdim=True))
                              * inv_norm[:, None]).to(hidden.dtype)
            grad_hidden = grad_projected @ weight
            grad_weight = grad_projected.T @ hidden
            grad_bias = grad_projected.sum(0) if bias is not None else None
        return (grad_hidden, grad_weight, grad_bias, grad_text if ctx.needs_input_grad[3] else None,
                grad_scale, None, None, None, None, None)


def check_fused_world(rank: int, world_size: int) -> None:
    """fused_projection_clip_loss's distributed arguments against the process group.

    Raises:
        ValueError: a bad rank/world_size, one that disagrees with the process group, or
            world_size=1 left as it is under a process group of several processes (the loss would
            silently be a local-batch loss).
        RuntimeError: world_size > 1 without torch.distributed initialised.
    """
    import torch.distributed as dist

    check_rank(rank, world_size, "fused_projection_clip_loss")
    if world_size > 1:
        check_process_group(rank, world_size, "fused_projection_clip_loss")
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            f"fused_projection_clip_loss(world_size=1) under torch.distributed with {dist.get_world_size()} "
            "processes would be a local-batch loss: pass rank=torch.distributed.get_rank(), "
            "world_size=torch.distributed.get_world_size()")


def fused_projection_clip_loss(
    image_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
    loss: str = "clip",
    *,
    rank: int = 0,
    world_size: int = 1,
    gathered_text_features=None,
    slab_bytes: int | None = None,
) -> torch.Tensor:
    """Contrastive loss of the head's last linear layer output, projection and loss in one call.

    Computes `clip_loss` (or `siglip_loss`) of normalize(image_hidden @ weight.T + bias) against
    normalize(text_features). For "clip" the projection and the norm are recomputed in the backward
    instead of being kept: the only [B, D] tensors held between forward and backward are the inputs.
    The GEMMs run in one dtype: the autocast dtype under autocast, else the promotion of
    image_hidden's and weight's dtypes (text_features are cast to it).

    Args:
        image_hidden: [B, H] hidden states entering the head's last linear layer (this rank's rows).
        weight: [D, H] that layer's weight; bias: [D] or None.
        text_features: [B, D] caption embeddings (normalised here; already unit rows are fine).
        logit_scale: the already-exponentiated scale; logit_bias: optional additive bias.
        loss: "clip" or "siglip".
        rank, world_size: this process's place in the default process group. With world_size > 1,
            "clip" is `ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size)` and
            "siglip" is `SigLipLoss(rank=rank, world_size=world_size)` of the projected features.
        gathered_text_features: with world_size > 1, every rank's text_features [N, D] already
            gathered (a tensor, or the GatheredTexts of `start_text_gather`), normalised here as
            text_features are; None gathers them in the loss. slab_bytes: as in `clip_loss`.

    Returns:
        0-d loss, as `clip_loss`/`siglip_loss` return it.

    Raises:
        ValueError: an unknown `loss`, shapes that do not chain ([B, H] x [D, H] -> [B, D] against
            [B, D] text features), named in the message; rank/world_size that do not match the
            process group, or world_size=1 under a process group of several processes.
        TypeError, RuntimeError: as `clip_loss`; RuntimeError: world_size > 1 without
            torch.distributed initialised.
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
    check_fused_world(rank, world_size)
    dtype = gemm_dtype(image_hidden, weight)
    image_hidden, weight = image_hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    text_features = normalize_rows(text_features).to(dtype)  # [B, D]
    gathered = resolve_gathered(gathered_text_features, text_features, world_size)
    gathered = None if gathered is None else normalize_rows(gathered).to(dtype)  # row-wise, as text_features
    if loss == "siglip":
        with autocast_off(image_hidden.device):
            image_features = project_and_normalize(image_hidden, weight, bias)
        image_features, text_features, scale, logit_bias = prepare_loss_inputs(
            image_features, text_features, logit_scale, logit_bias)
        return chunked_siglip_loss(image_features, text_features, scale, logit_bias, rank=rank,
                                   world_size=world_size, gathered_text_features=gathered, slab_bytes=slab_bytes)
    stat_dtype = compute_dtype(image_hidden)
    scale = as_scalar(logit_scale, "logit_scale", image_hidden.device, stat_dtype)
    logit_bias = None if logit_bias is None else as_scalar(logit_bias, "logit_bias", image_hidden.device, stat_dtype)
    use_triton = loss_implementation(image_hidden.device) == "triton"
    value = _FusedProjectionClip.apply(image_hidden.contiguous(), weight, bias, text_features.contiguous(), scale,
                                       rank, world_size, use_triton, gathered, slab_budget(slab_bytes))
    return value if logit_bias is None else value + 0 * logit_bias


class ClipLoss(nn.Module):
    """open_clip's ClipLoss (same constructor, forward and values), on the lift_fast.kernels path.

    world_size 1, and `local_loss=True, gather_with_grad=True` under torch.distributed (the setting
    large runs use), go through the chunked loss: no [b, N] logits, only the texts and an [N] vector
    of column statistics are gathered, and the gradients equal open_clip's. The other distributed
    settings gather both sides and build the logits as open_clip does. Every rank must pass the
    same local batch size.

    Args:
        local_loss, gather_with_grad, rank, world_size: as in open_clip.
        cache_labels: accepted for compatibility; the labels are a cheap arange built per call.
        use_horovod: must be False (Horovod is not supported).
        slab_bytes: the chunked loss's slab budget, as in `clip_loss` (None: the variable or default).

    Raises:
        NotImplementedError: use_horovod=True.
        ValueError: world_size < 1 or rank outside [0, world_size), or a bad slab_bytes.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        slab_bytes: int | None = None,
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
        self.slab_bytes = slab_bytes
        if slab_bytes is not None:
            slab_budget(slab_bytes)  # a bad budget fails at construction

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        output_dict: bool = False,
        *,
        gathered_text_features=None,
    ):
        """Loss of this rank's [b, D] image and text features; see `clip_loss` for dtypes and errors.

        gathered_text_features: every rank's text_features [world_size * b, D] in rank order, already
        gathered (a tensor, or the GatheredTexts handle of `start_text_gather`, waited for here), for
        the chunked setting (local_loss and gather_with_grad) under torch.distributed; the loss then
        gathers nothing itself. Ignored by the other settings; checked for its shape.

        Returns:
            the 0-d loss, or {"contrastive_loss": loss} with `output_dict`.
        """
        if self.world_size == 1:
            resolve_gathered(gathered_text_features, text_features, 1)  # checked, nothing to gather
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias, slab_bytes=self.slab_bytes)
        else:
            loss = self._distributed_loss(image_features, text_features, logit_scale, logit_bias,
                                          gathered_text_features)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed_loss(self, image_features, text_features, logit_scale, logit_bias, gathered_text_features):
        image_features, text_features, scale, bias = prepare_loss_inputs(
            image_features, text_features, logit_scale, logit_bias)
        check_process_group(self.rank, self.world_size, "ClipLoss")
        if self.local_loss and self.gather_with_grad:
            loss = chunked_clip_loss(image_features, text_features, scale, rank=self.rank,
                                     world_size=self.world_size, gathered_text_features=gathered_text_features,
                                     slab_bytes=self.slab_bytes)
            return loss if bias is None else loss + 0 * bias
        resolve_gathered(gathered_text_features, text_features, self.world_size)  # the shape is still checked
        loss_implementation(image_features.device)
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
