"""What the chunked losses share: slab sizing, float32-result GEMMs, and the collectives.

Only torch is imported here; collectives use the default process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Slabs are sized from a byte budget (docs/loss.md, "Slab size"): rows = budget / (N x 8 bytes), a
# similarity costing its float32 value and its gradient (float32 at most; bf16 takes 6 of the 8).
# By default, at least MIN_SLAB_ROWS rows in multiples of ROW_MULTIPLE: GEMMs of [>= 1024, D] x [D, N]
# run on tensor cores near their peak (arithmetic intensity >= ~600 flop/byte in bf16 at D >= 512,
# against ~295 for an H100's ridge), and 32k x 32k takes 4 slabs instead of 512. An explicit budget
# (keyword or LIFT_FAST_SLAB_BYTES) is a memory cap and is honoured as given (multiples of 128 from
# 128 rows up), which is how the tests get many slabs at small sizes.
SLAB_BYTES_ENV_VAR = "LIFT_FAST_SLAB_BYTES"
DEFAULT_SLAB_BYTES = 2**31  # 2 GiB: 8,192 rows at N = 32k, 4,096 at 64k; under 3% of an 80 GB GPU
# Off CUDA (the torch twins, which hold up to four slab-sized float32 temporaries, and no tensor cores
# to feed) the default is 16 MiB and has no row floor: 256 rows at N = 8k.
CPU_SLAB_BYTES = 2**24
BYTES_PER_SIMILARITY = 8
MIN_SLAB_ROWS = 1024
ROW_MULTIPLE = 128


def autocast_off(device: torch.device):
    """A context with autocast disabled on `device`: inside the losses' custom ops every GEMM runs in
    the dtype the inputs were cast to at the call (reference.gemm_dtype), in forward and backward."""
    return torch.autocast(device.type, enabled=False)


def slab_budget(slab_bytes: int | None = None) -> int:
    """The slab budget in bytes a loss call uses: `slab_bytes` if given, else LIFT_FAST_SLAB_BYTES (read at
    every call), else 0, which stands for the default rule (DEFAULT_SLAB_BYTES and the 1,024-row floor).

    Raises:
        ValueError: a budget (argument or variable) that is not a positive integer, named in the message.
    """
    if slab_bytes is None:
        raw = os.environ.get(SLAB_BYTES_ENV_VAR, "").strip()
        if not raw:
            return 0
        try:
            slab_bytes = int(raw)
        except ValueError:
            slab_bytes = -1
        if slab_bytes <= 0:
            raise ValueError(f"{SLAB_BYTES_ENV_VAR}={raw!r} must be a positive number of bytes, e.g. "
                             f"{DEFAULT_SLAB_BYTES} (2 GiB)")
        return slab_bytes
    if isinstance(slab_bytes, bool) or not isinstance(slab_bytes, int) or slab_bytes <= 0:
        raise ValueError(f"slab_bytes={slab_bytes!r} must be a positive int (bytes per slab), or None for "
                         f"{SLAB_BYTES_ENV_VAR} or the default")
    return slab_bytes


def slab_rows(rows: int, columns: int, slab_bytes: int = 0, on_cuda: bool = True) -> int:
    """How many rows of the [rows, columns] similarity matrix to hold at once.

    slab_bytes: a budget from `slab_budget` (0: the default rule, DEFAULT_SLAB_BYTES on CUDA and
    CPU_SLAB_BYTES elsewhere). Returns rows per slab in [1, rows]: budget // (columns *
    BYTES_PER_SIMILARITY), rounded down to a multiple of ROW_MULTIPLE from that many rows up, and
    under the default rule on CUDA at least MIN_SLAB_ROWS (the tensor cores' floor).
    """
    default = DEFAULT_SLAB_BYTES if on_cuda else CPU_SLAB_BYTES
    budget_rows = (slab_bytes or default) // (columns * BYTES_PER_SIMILARITY)
    if budget_rows >= ROW_MULTIPLE:
        budget_rows -= budget_rows % ROW_MULTIPLE
    if not slab_bytes and on_cuda:
        budget_rows = max(budget_rows, MIN_SLAB_ROWS)
    return max(1, min(rows, budget_rows))


def slab_starts(rows: int, step: int) -> range:
    """The first row of every slab of `step` rows over `rows` rows."""
    return range(0, rows, step)


def matmul_f32(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right in float32 (float64 for float64 inputs).

    On CUDA, half-precision inputs run on tensor cores with a float32 result: the product is not
    rounded to bf16, which for similarities at logit scale 100 would move logits by up to 0.4.
    """
    if left.is_cuda and left.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(left, right, out_dtype=torch.float32)
    out_dtype = torch.float64 if left.dtype == torch.float64 else torch.float32
    return (left @ right).to(out_dtype)


def text_gradient_buffer(texts: torch.Tensor, world_size: int) -> torch.Tensor:
    """Where the column pass writes d texts [N, D], each row once: the texts' dtype in one process
    (it is the gradient itself), float32 (float64) under torch.distributed, where every rank's part
    is summed before it is rounded to the texts' dtype."""
    if world_size == 1:
        return torch.empty_like(texts)
    wide = torch.float64 if texts.dtype == torch.float64 else torch.float32
    return torch.empty(texts.shape, device=texts.device, dtype=wide)


def write_matmul(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """out = left @ right in out's dtype: one GEMM with a float32 result on CUDA for half inputs."""
    if out.dtype == left.dtype:
        torch.mm(left, right, out=out)
    elif left.is_cuda and left.dtype in (torch.bfloat16, torch.float16):
        torch.mm(left, right, out_dtype=out.dtype, out=out)
    else:
        out.copy_(left @ right)


def text_gradient(buffer: torch.Tensor | None, text: torch.Tensor, like: torch.Tensor, rank: int,
                  world_size: int) -> torch.Tensor:
    """The backward's d text for this rank: its rows of the [N, D] sum over every rank's loss, in the
    text's dtype; empty (like `like`) when there is no text gradient (frozen texts)."""
    if buffer is None:
        return like.new_empty(0)
    if world_size > 1:
        return sum_to_owner(buffer, rank, world_size).to(text.dtype)
    return buffer


def similarity(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """rows @ columns.T as float32 (float64 for float64 inputs): [m, D] x [N, D] -> [m, N]."""
    return matmul_f32(rows, columns.T)


# ------------------------------------------------------------------------- torch.distributed


def all_gather_rows(tensor: torch.Tensor, world_size: int, async_op: bool = False):
    """[b, ...] of every rank in rank order, as one [world_size * b, ...] tensor (no autograd): one
    all_gather_into_tensor (all_gather_single in torch >= 2.14), no per-rank parts and no
    concatenation. With async_op, (tensor, work): the tensor holds the rows once work.wait() returns
    (on NCCL: once the waiting stream gets there)."""
    import torch.distributed as dist

    out = tensor.new_empty(world_size * tensor.shape[0], *tensor.shape[1:])
    # all_gather_single is torch 2.14's name for all_gather_into_tensor (deprecated there): one op either way
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather_into(out, tensor.contiguous(), async_op=async_op)
    return (out, work) if async_op else out


@dataclass
class GatheredTexts:
    """Every rank's text rows [world_size * b, D] in rank order, gathered or on their way
    (`start_text_gather`). The losses take one as `gathered_text_features=` and wait for it there,
    after the image forward that the gather overlapped."""

    tensor: torch.Tensor
    work: object | None = None

    def wait(self) -> torch.Tensor:
        """The gathered rows; waits for the collective first (once). On NCCL the wait orders the
        current CUDA stream after the gather, without blocking the host."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.tensor


def start_text_gather(text_features: torch.Tensor, world_size: int | None = None) -> GatheredTexts:
    """Start the all-gather of this rank's text rows [b, D] (async) and return its handle.

    Call it as soon as the step's texts are known (LIFT's frozen caption rows: before the image
    forward), then pass the handle to the loss (`clip_loss(..., gathered_text_features=handle)`,
    `ClipLoss(...)(..., gathered_text_features=handle)`): the loss waits for it instead of gathering.
    The rows must be the ones given to the loss as text_features, in its GEMM dtype (cast them first:
    a handle in another dtype is cast in the loss, a copy). world_size: default the process group's.

    Raises:
        RuntimeError: torch.distributed is not initialised.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("start_text_gather needs torch.distributed initialised (init_process_group)")
    world_size = dist.get_world_size() if world_size is None else world_size
    tensor, work = all_gather_rows(text_features.detach(), world_size, async_op=True)
    return GatheredTexts(tensor, work)


def resolve_gathered(gathered, text: torch.Tensor, world_size: int) -> torch.Tensor | None:
    """The gathered texts [world_size * b, D] a loss was given (a tensor or a GatheredTexts, waited
    for here), detached and in text's dtype; None when none was given or world_size is 1.

    Raises:
        TypeError: something else than a tensor, a GatheredTexts or None.
        ValueError: a shape other than [world_size * b, D] or another device, both named.
    """
    if gathered is None:
        return None
    if isinstance(gathered, GatheredTexts):
        gathered = gathered.wait()
    if not isinstance(gathered, torch.Tensor):
        raise TypeError(f"gathered_text_features must be a tensor or a GatheredTexts (start_text_gather), got "
                        f"{type(gathered).__name__}")
    expected = (world_size * text.shape[0], text.shape[1])
    if tuple(gathered.shape) != expected or gathered.device != text.device:
        raise ValueError(f"gathered_text_features {tuple(gathered.shape)} on {gathered.device} must be "
                         f"[world_size * b, D] = {expected} on {text.device}, every rank's text_features in rank order")
    if world_size == 1:
        return None
    return gathered.detach().to(text.dtype).contiguous()


def sum_to_owner(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Sum [N, ...] over ranks and keep this rank's [N / world_size, ...] rows (a reduce-scatter)."""
    import torch.distributed as dist

    rows = tensor.shape[0] // world_size
    if dist.get_backend() == "nccl":
        out = tensor.new_empty(rows, *tensor.shape[1:])
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # torch 2.14's name
        scatter(out, tensor.contiguous())
        return out
    dist.all_reduce(tensor)  # gloo has no reduce-scatter of tensors
    return tensor[rank * rows:(rank + 1) * rows].clone()
