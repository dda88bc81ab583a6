"""The materialised (open_clip-style) CLIP loss, used by ClipLoss's distributed settings other than
local_loss + gather_with_grad, and what every loss in this package shares: the `LIFT_FAST_KERNELS` choice, input checks,
conversion of `logit_scale`/`logit_bias`, and gathering features across a torch.distributed job.

Numerics: the similarity matmul runs in the features' dtype (bf16 stays bf16, so it runs on tensor
cores), then the logits are upcast to `compute_dtype` (float32, or float64 for float64 inputs) before
the scale, the bias, the log-sum-exp and the log-sigmoid. Losses come back in `compute_dtype`.
Only torch is imported here; nothing from the rest of lift_fast.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

KERNELS_ENV_VAR = "LIFT_FAST_KERNELS"
KERNELS_CHOICES = ("auto", "triton", "torch")

_logged_auto_choice = False


# --- implementation choice -------------------------------------------------------------------------


def loss_implementation(device: torch.device | str = "cpu") -> str:
    """Return the loss implementation to use now for tensors on `device`: "triton" or "torch".

    `LIFT_FAST_KERNELS` (read at every call): `auto` takes the Triton kernels on CUDA and the torch
    path elsewhere (logging its choice once); `triton` insists on the kernels, which on CPU tensors
    run under the Triton interpreter (TRITON_INTERPRET=1 set before lift_fast.kernels is imported);
    `torch` takes the torch path everywhere.

    Raises:
        ValueError: the variable holds something other than auto, triton or torch.
        RuntimeError: triton is asked for but not installed, or asked for on CPU tensors without
            the interpreter.
    """
    global _logged_auto_choice
    from . import slab_ops

    raw = os.environ.get(KERNELS_ENV_VAR, "auto")
    choice = raw.strip().lower() or "auto"
    if choice not in KERNELS_CHOICES:
        raise ValueError(
            f"{KERNELS_ENV_VAR}={raw!r} is not a known loss implementation; "
            f"use one of {', '.join(KERNELS_CHOICES)}"
        )
    on_cuda = torch.device(device).type == "cuda"
    if choice == "triton":
        if slab_ops.triton is None:
            raise RuntimeError(f"{KERNELS_ENV_VAR}=triton: triton is not installed (pip install triton)")
        if not on_cuda and not slab_ops.INTERPRETED:
            raise RuntimeError(
                f"{KERNELS_ENV_VAR}=triton on {torch.device(device).type} tensors needs the Triton interpreter: "
                "set TRITON_INTERPRET=1 before importing lift_fast.kernels, or use CUDA tensors")
        return "triton"
    if choice == "torch":
        return "torch"
    chosen = "triton" if on_cuda and slab_ops.triton is not None else "torch"
    if not _logged_auto_choice and not torch.compiler.is_compiling():  # logging inside a traced graph breaks it
        logger.info("%s=auto: %s contrastive loss on %s", KERNELS_ENV_VAR,
                    "Triton" if chosen == "triton" else "plain-torch chunked", torch.device(device).type)
        _logged_auto_choice = True
    return chosen


# --- input checks and conversions ------------------------------------------------------------------


def check_feature_pair(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Check that image and text features are matching [B, D] floating-point tensors.

    Raises:
        TypeError: either is not a floating-point tensor.
        ValueError: either is not 2-D, B or D differ (both shapes are named), B is 0, or the two
            live on different devices.
    """
    for name, features in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            kind = features.dtype if isinstance(features, torch.Tensor) else type(features).__name__
            raise TypeError(f"{name} must be a floating-point tensor [B, D], got {kind}")
        if features.dim() != 2:
            raise ValueError(f"{name} must be 2-D [B, D], got shape {tuple(features.shape)}")
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features "
            f"{tuple(text_features.shape)} must have the same shape [B, D]"
        )
    if image_features.shape[0] == 0:
        raise ValueError("image_features and text_features hold no rows (B=0); the loss needs B >= 1")
    if image_features.device != text_features.device:
        raise ValueError(
            f"image_features are on {image_features.device} but text_features on "
            f"{text_features.device}; move both to one device"
        )


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the logits and the loss are computed in: float32, or float64 if an input is."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def common_feature_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the similarity matmul runs in: the promotion of the features' dtypes."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def gemm_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The one dtype every GEMM of a loss call runs in, forward and backward, decided at the call.

    Under autocast enabled for the tensors' device, its dtype (bf16 or fp16), as autocast would cast
    the GEMMs' float32 inputs; float64 stays float64, as autocast leaves float64 alone. Without
    autocast, the promotion of the tensors' dtypes. The losses cast their inputs to it and run their
    custom ops with autocast off inside, so the backward's recompute meets the same dtype.
    """
    dtype = common_feature_dtype(*tensors)
    device_type = tensors[0].device.type
    if dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def as_scalar(value, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Turn `logit_scale` or `logit_bias` (float or one-element tensor) into a 0-d tensor.

    The conversion is differentiable, so a parameter passed in receives its gradient.

    Raises:
        ValueError: a tensor with more than one element.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (0-d or one-element tensor, or a float), "
                             f"got shape {tuple(value.shape)}")
        return value.reshape(()).to(device=device, dtype=dtype)
    return torch.tensor(float(value), device=device, dtype=dtype)


def prepare_loss_inputs(image_features, text_features, logit_scale, logit_bias):
    """Check a loss's inputs and bring them to the form the plain-torch losses take.

    Returns:
        (image_features, text_features) in the call's GEMM dtype (`gemm_dtype`), and logit_scale,
        logit_bias (or None) as 0-d tensors in the compute dtype on the features' device.

    Raises:
        as `check_feature_pair` and `as_scalar`.
    """
    check_feature_pair(image_features, text_features)
    feature_dtype = gemm_dtype(image_features, text_features)
    image_features = image_features.to(feature_dtype)
    text_features = text_features.to(feature_dtype)
    device, dtype = image_features.device, compute_dtype(image_features)
    scale = as_scalar(logit_scale, "logit_scale", device, dtype)
    bias = None if logit_bias is None else as_scalar(logit_bias, "logit_bias", device, dtype)
    return image_features, text_features, scale, bias


def check_rank(rank: int, world_size: int, owner: str) -> None:
    """Raise ValueError unless world_size >= 1 and 0 <= rank < world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{owner}(rank={rank}, world_size={world_size}): need world_size >= 1 "
                         "and 0 <= rank < world_size")


# --- plain-torch losses ----------------------------------------------------------------------------


def contrastive_logits(
    rows: torch.Tensor,
    columns: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
) -> torch.Tensor:
    """logit_scale * rows @ columns.T (+ logit_bias), matmul in the features' dtype, result upcast.

    Args:
        rows: [M, D]; columns: [N, D], same dtype; logit_scale, logit_bias: 0-d, in the result dtype.

    Returns:
        logits [M, N] in logit_scale's dtype.
    """
    similarity = rows @ columns.T  # [M, N], input dtype
    logits = similarity.to(logit_scale.dtype) * logit_scale
    if logit_bias is not None:
        logits = logits + logit_bias
    return logits


def clip_loss_torch(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    *,
    image_columns: torch.Tensor | None = None,
    text_columns: torch.Tensor | None = None,
    label_offset: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy over the rows.

    Without columns, the rows are the whole batch (one [B, B] logit matrix and its transpose). With
    columns (open_clip's local loss), local rows [b, D] meet the global batch [B, D], and row i's
    positive is column i + label_offset.

    Args:
        image_rows, text_rows: [b, D] features, one dtype.
        logit_scale, logit_bias: 0-d tensors in the compute dtype (see `as_scalar`).
        image_columns, text_columns: [B, D] or None (both or neither).
        label_offset: index of row 0's positive among the columns.

    Returns:
        0-d loss in logit_scale's dtype.
    """
    if image_columns is None:
        logits_per_image = contrastive_logits(image_rows, text_rows, logit_scale, logit_bias)  # [B, B]
        logits_per_text = logits_per_image.T
    else:
        logits_per_image = contrastive_logits(image_rows, text_columns, logit_scale, logit_bias)
        logits_per_text = contrastive_logits(text_rows, image_columns, logit_scale, logit_bias)
    labels = torch.arange(image_rows.shape[0], device=image_rows.device) + label_offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def project_and_normalize(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """normalize(hidden @ weight.T + bias): the projection in the input dtype, the norm in float32.

    Args:
        hidden: [B, H]; weight: [D, H]; bias: [D] or None.

    Returns:
        [B, D] unit rows in hidden's dtype.
    """
    projected = F.linear(hidden, weight, bias)  # [B, D]
    return normalize_rows(projected)


def normalize_rows(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise the rows of [B, D] features; the norm is taken in float32 (or float64)."""
    return F.normalize(features.to(compute_dtype(features)), dim=-1).to(features.dtype)


# --- torch.distributed -----------------------------------------------------------------------------


def check_process_group(rank: int, world_size: int, owner: str) -> None:
    """Check that the default process group exists and agrees with the loss's rank and world_size.

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError: rank or world_size differ from the process group's.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{owner}(world_size={world_size}) needs torch.distributed initialised "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    if (rank, world_size) != (dist.get_rank(), dist.get_world_size()):
        raise ValueError(
            f"{owner} was built with rank={rank}, world_size={world_size} but the process group has "
            f"rank={dist.get_rank()}, world_size={dist.get_world_size()}"
        )


class _GatherWithGrad(torch.autograd.Function):
    """all_gather_into_tensor forward; backward: the sum over ranks of each rank's rows' gradient
    (a reduce-scatter), what torch.distributed.nn.functional.all_gather gives, without per-rank parts."""

    @staticmethod
    def forward(ctx, tensor, rank, world_size):
        from .chunking import all_gather_rows

        ctx.config = (rank, world_size)
        return all_gather_rows(tensor, world_size)

    @staticmethod
    def backward(ctx, grad):
        from .chunking import sum_to_owner

        rank, world_size = ctx.config
        return sum_to_owner(grad.contiguous().clone(), rank, world_size), None, None


def gather_rows(tensor: torch.Tensor, *, rank: int, world_size: int, with_grad: bool,
                keep_local_grad: bool = False) -> torch.Tensor:
    """Every rank's [b, D] tensor as one [world_size * b, D] tensor, in rank order (one
    all_gather_into_tensor: no per-rank parts and no concatenation).

    Every rank must pass the same b (as in open_clip). With `with_grad`, gradients flow back to the
    rank that owns each row (summed over ranks). Without it the gathered copy is detached; with
    `keep_local_grad` this rank's own slot is the input tensor itself, so its rows keep their graph.
    """
    from .chunking import all_gather_rows

    tensor = tensor.contiguous()
    if with_grad:
        return _GatherWithGrad.apply(tensor, rank, world_size)
    gathered = all_gather_rows(tensor.detach(), world_size)
    if keep_local_grad:
        rows = tensor.shape[0]
        return torch.slice_scatter(gathered, tensor, dim=0, start=rank * rows, end=(rank + 1) * rows)
    return gathered
