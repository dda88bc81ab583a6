"""What the chunked losses share: slab sizing, float32-result GEMMs, and the collectives.

Only torch is imported here; collectives use the default process group.
"""

from __future__ import annotations

import torch

# A slab holds at most max(MIN_SLAB_ELEMENTS, N * D // SLAB_DIVISOR) similarities, so its float32
# bytes stay below half a bf16 feature matrix: memory O(N D) whatever B is. Not tuned on a GPU yet;
# the GEMM of a 512-row slab against 32k columns is large enough for tensor cores to run near peak.
MIN_SLAB_ELEMENTS = 2**20
SLAB_DIVISOR = 8


def autocast_off(device: torch.device):
    """A context with autocast disabled on `device`: inside the losses' custom ops every GEMM runs in
    the dtype the inputs were cast to at the call (reference.gemm_dtype), in forward and backward."""
    return torch.autocast(device.type, enabled=False)


def slab_rows(rows: int, columns: int, dim: int) -> int:
    """How many rows of the [rows, columns] similarity matrix to hold at once."""
    budget = max(MIN_SLAB_ELEMENTS, columns * dim // SLAB_DIVISOR)
    return max(1, min(rows, budget // columns))


def matmul_f32(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right in float32 (float64 for float64 inputs).

    On CUDA, half-precision inputs run on tensor cores with a float32 result: the product is not
    rounded to bf16, which for similarities at logit scale 100 would move logits by up to 0.4.
    """
    if left.is_cuda and left.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(left, right, out_dtype=torch.float32)
    out_dtype = torch.float64 if left.dtype == torch.float64 else torch.float32
    return (left @ right).to(out_dtype)


def accumulate_matmul(accumulator: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """accumulator += left @ right, in place and without a product-sized temporary where possible.

    accumulator is float32 (float64) while left/right may be half precision (a float32 sum of
    bf16 products loses nothing to repeated rounding).
    """
    if accumulator.dtype == left.dtype:
        accumulator.addmm_(left, right)
    elif left.is_cuda and left.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(accumulator, left, right, accumulator.dtype, out=accumulator)  # cuBLAS: C += A B
    else:
        accumulator += (left @ right).to(accumulator.dtype)


def text_gradient(accumulated: torch.Tensor | None, text: torch.Tensor, like: torch.Tensor, rank: int,
                  world_size: int) -> torch.Tensor:
    """The backward's d text for this rank: its rows of the [N, D] sum over every rank's loss, in the
    text's dtype; empty (like `like`) when no text gradient was accumulated (frozen texts)."""
    if accumulated is None:
        return like.new_empty(0)
    if world_size > 1:
        return sum_to_owner(accumulated, rank, world_size).to(text.dtype)
    return accumulated.to(text.dtype)


def similarity(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """rows @ columns.T as float32 (float64 for float64 inputs): [m, D] x [N, D] -> [m, N]."""
    return matmul_f32(rows, columns.T)


# ------------------------------------------------------------------------- torch.distributed


def all_gather_rows(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """[b, ...] of every rank, concatenated in rank order (no autograd)."""
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def sum_to_owner(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Sum [N, ...] over ranks and keep this rank's [N / world_size, ...] rows (a reduce-scatter)."""
    import torch.distributed as dist

    rows = tensor.shape[0] // world_size
    if dist.get_backend() == "nccl":
        out = tensor.new_empty(rows, *tensor.shape[1:])
        dist.reduce_scatter_tensor(out, tensor.contiguous())
        return out
    dist.all_reduce(tensor)  # gloo has no reduce-scatter of tensors
    return tensor[rank * rows:(rank + 1) * rows].clone()
