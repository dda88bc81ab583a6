"""Element-wise work on one slab of similarities: Triton kernels and their plain-torch twins.

The contrastive losses walk the batch in row slabs: sim = rows @ columns.T ([m, N], float32,
from one GEMM), then
  * CLIP forward:  per-row log-sum-exp of scale * sim and per-column partial log-sum-exp stats,
  * CLIP backward: d loss / d sim from the row and column softmaxes, written in the GEMM dtype,
  * SigLIP forward and backward: the sum of -logsigmoid(z * (scale * sim + bias)) and its gradient,
plus the partial sums that make d loss / d logit_scale (and / d logit_bias). Each kernel reads
the slab once and writes at most one slab-sized output; the GEMMs around them are cuBLAS's.

The torch twins compute the same quantities with torch ops; they are the CPU path and the
reference the kernels are tested against. Functions here take and return plain tensors. The kernels
work in float32 (their scalar arguments are float32): float64 slabs always take the torch twins.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is a Linux dependency; elsewhere only the torch twins exist
    triton = None

# Tiles of the element-wise kernels, chosen from the kernel report (bench/kernel_report.py, triton 3.8
# and 3.6, sm_90a/sm_100a, 16-multiple and odd sizes; compiled, not yet timed on a GPU). The kernels
# are memory-bound (one read of the slab, at most one write), so what counts is bytes in flight:
# resident warps (goal >= 16 per SM by registers) and 128-bit loads of the float32 slab.
# CLIP kernels, BLOCK_M=32, BLOCK_N=64, 4 warps: 16 floats per thread as four 128-bit loads;
# _clip_grad_kernel at 63-72 registers (28-32 warps per SM), 96 at odd sizes (20), where 64x64 took
# 121-128 (16). Row blocks of 32 keep the column partial statistics at 1/32 of the slab.
BLOCK_M = 32
BLOCK_N = 64
# _siglip_kernel, SIGLIP_BLOCK_M=16 (x BLOCK_N, 4 warps): WITH_GRAD at 47-48 registers (40 warps), 70-95
# at odd sizes (20-28); at 32 rows it took 80-86 (20-24) but 158-164 at odd sizes with triton 3.6
# (12 warps), and the 64x64 tile before 79-185 (8 warps on sm_100a).
SIGLIP_BLOCK_M = 16
NUM_WARPS = 4
# triton.jit builds interpreted kernels when this is set at import time; only then do they take CPU tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _slab_tile(sim_ptr, M, N, stride_sim, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's tile of the [M, N] slab: (rows [BLOCK_M], cols [BLOCK_N], row_ok, col_ok,
        mask [BLOCK_M, BLOCK_N], sim [BLOCK_M, BLOCK_N] with 0 outside the slab)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        sim = tl.load(sim_ptr + rows[:, None] * stride_sim + cols[None, :], mask=mask, other=0.0)
        return rows, cols, row_ok, col_ok, mask, sim

    @triton.jit
    def _clip_stats_kernel(
        sim_ptr,  # [M, N] float32 similarities of this slab's rows against all columns
        row_max_ptr,  # [M, NB] out: max of scale * sim over each column block
        row_sum_ptr,  # [M, NB] out: sum of exp(scale * sim - row max) over each column block
        col_max_ptr,  # [MB, N] out: max over each row block
        col_sum_ptr,  # [MB, N] out: sum of exp over each row block
        scale_ptr,  # [] float32 logit scale, read on the device (no host sync)
        M, N, stride_sim, NB,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows, cols, row_ok, col_ok, mask, sim = _slab_tile(sim_ptr, M, N, stride_sim, BLOCK_M, BLOCK_N)
        scale = tl.load(scale_ptr)
        logits = tl.where(mask, sim * scale, float("-inf"))
        # Every program holds at least one valid row and one valid column, so the maxima of valid
        # rows and columns are finite; the -inf maxima of rows/columns outside the slab become 0
        # (no inf - inf) and are not stored.
        row_max = tl.where(row_ok, tl.max(logits, axis=1), 0.0)
        row_sum = tl.sum(tl.exp(logits - row_max[:, None]), axis=1)
        tl.store(row_max_ptr + rows * NB + pid_n, row_max, mask=row_ok)
        tl.store(row_sum_ptr + rows * NB + pid_n, row_sum, mask=row_ok)
        col_max = tl.where(col_ok, tl.max(logits, axis=0), 0.0)
        col_sum = tl.sum(tl.exp(logits - col_max[None, :]), axis=0)
        tl.store(col_max_ptr + pid_m * N + cols, col_max, mask=col_ok)
        tl.store(col_sum_ptr + pid_m * N + cols, col_sum, mask=col_ok)

    @triton.jit
    def _clip_grad_kernel(
        sim_ptr,  # [M, N] float32 similarities of this slab (read)
        grad_ptr,  # [M, N] out: d loss / d sim, in the GEMM dtype (may alias nothing else)
        row_max_ptr,  # [M] float32 max of each row's logits
        row_logsum_ptr,  # [M] float32 log of sum(exp(logit - row max)) of each row
        col_max_ptr,  # [N] float32 max of each column's logits (over the global batch)
        col_logsum_ptr,  # [N] float32 log of sum(exp(logit - column max)) of each column
        col_coef_ptr,  # [N] float32 weight of the column-softmax term of each column
        partial_ptr,  # [MB * NB] out: sum of d loss / d logit * sim over the tile (for d scale)
        scale_ptr,  # [] float32 logit scale
        row_coef_ptr,  # [] float32 weight of the row-softmax term (grad_loss / 2b)
        diag_offset,  # column of row 0's positive
        M, N, stride_sim, stride_grad, NB,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows, cols, row_ok, col_ok, mask, sim = _slab_tile(sim_ptr, M, N, stride_sim, BLOCK_M, BLOCK_N)
        row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
        row_logsum = tl.load(row_logsum_ptr + rows, mask=row_ok, other=0.0)
        col_max = tl.load(col_max_ptr + cols, mask=col_ok, other=0.0)
        col_logsum = tl.load(col_logsum_ptr + cols, mask=col_ok, other=0.0)
        col_coef = tl.load(col_coef_ptr + cols, mask=col_ok, other=0.0)
        scale = tl.load(scale_ptr)
        row_coef = tl.load(row_coef_ptr)
        logits = sim * scale
        # d loss / d logit = row_coef * (softmax_row - onehot) + col_coef * (softmax_col - onehot);
        # the one-hot is taken off each softmax before they are added, as cross-entropy does, so
        # the near-1 positives cancel at their own magnitude.
        positive = cols[None, :] == rows[:, None] + diag_offset
        # (logit - max) - logsum, not logit - lse: the subtraction of the max is exact, so the
        # softmax keeps float32's relative precision even where the log-sum-exp is large
        row_soft = tl.exp((logits - row_max[:, None]) - row_logsum[:, None])
        col_soft = tl.exp((logits - col_max[None, :]) - col_logsum[None, :])
        row_soft = tl.where(positive, row_soft - 1.0, row_soft)
        col_soft = tl.where(positive, col_soft - 1.0, col_soft)
        grad = tl.where(mask, row_coef * row_soft + col_coef[None, :] * col_soft, 0.0)
        tl.store(partial_ptr + pid_m * NB + pid_n, tl.sum(tl.sum(grad * sim, axis=1), axis=0))
        tl.store(grad_ptr + rows[:, None] * stride_grad + cols[None, :],
                 (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _siglip_kernel(
        sim_ptr,  # [M, N] float32 similarities of this slab (read)
        grad_ptr,  # [M, N] out: d loss / d sim in the GEMM dtype (only when WITH_GRAD)
        partial_ptr,  # [MB * NB, 3] out: sum of loss terms, of d/d logit * sim, of d/d logit
        scale_ptr, bias_ptr,  # [] float32 logit scale and bias
        coef_ptr,  # [] float32 weight of every loss term in the gradient (grad_loss / b)
        diag_offset,  # column of row 0's positive
        M, N, stride_sim, stride_grad, NB,
        WITH_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows, cols, _, _, mask, sim = _slab_tile(sim_ptr, M, N, stride_sim, BLOCK_M, BLOCK_N)
        scale = tl.load(scale_ptr)
        bias = tl.load(bias_ptr)
        sign = tl.where(cols[None, :] == rows[:, None] + diag_offset, 1.0, -1.0)
        margin = sign * (sim * scale + bias)
        # -logsigmoid(t) = softplus(-t) = max(-t, 0) + log(1 + exp(-|t|)), stable for any t; the one
        # exp(-|t|) also gives the gradient's sigmoid (fewer live values: see the kernel report)
        small = tl.exp(-tl.abs(margin))
        loss = tl.where(mask, tl.maximum(-margin, 0.0) + tl.log(1.0 + small), 0.0)
        base = (pid_m * NB + pid_n) * 3
        tl.store(partial_ptr + base, tl.sum(tl.sum(loss, axis=1), axis=0))
        if WITH_GRAD:
            # d/d logit of coef * softplus(-margin) = -coef * sign * sigmoid(-margin), with
            # sigmoid(-t) from exp(-|t|) so that no exp overflows
            coef = tl.load(coef_ptr)
            sigmoid_neg = tl.where(margin >= 0, small, 1.0) / (1.0 + small)
            grad = tl.where(mask, -coef * sign * sigmoid_neg, 0.0)
            tl.store(partial_ptr + base + 1, tl.sum(tl.sum(grad * sim, axis=1), axis=0))
            tl.store(partial_ptr + base + 2, tl.sum(tl.sum(grad, axis=1), axis=0))
            tl.store(grad_ptr + rows[:, None] * stride_grad + cols[None, :],
                     (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def _grid(sim: torch.Tensor, block_m: int = BLOCK_M) -> tuple[int, int]:
    return triton.cdiv(sim.shape[0], block_m), triton.cdiv(sim.shape[1], BLOCK_N)


def _device_scalar(value: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 tensor for a kernel's scalar pointer (a no-op for the losses' float32 scalars)."""
    return value.reshape(()).to(torch.float32).contiguous()


def merge_stats(maxima: torch.Tensor, sums: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-block (max, sum of exp(x - max)) pairs along `dim` into one pair."""
    top = maxima.amax(dim=dim, keepdim=True)
    total = (sums * torch.exp(maxima - top)).sum(dim=dim, keepdim=True)
    return top.squeeze(dim), total.squeeze(dim)


# ------------------------------------------------------------------------------------------ CLIP


def clip_stats(sim: torch.Tensor, scale: torch.Tensor, use_triton: bool) -> tuple[torch.Tensor, ...]:
    """Softmax statistics of logits = scale * sim: per row (max [m], log of sum(exp(logit - max)) [m])
    and per column over this slab's rows (max [N], sum(exp(logit - max)) [N], to be merged).

    sim: [m, N] float32, contiguous rows; scale: 0-d tensor on sim's device (never read on the host).
    All results are in sim's dtype.
    """
    if not use_triton or sim.dtype != torch.float32:
        logits = sim * scale  # in-place below: at most two slab-sized temporaries
        row_max, col_max = logits.amax(dim=1), logits.amax(dim=0)
        col_sum = (logits - col_max[None, :]).exp_().sum(dim=0)
        row_logsum = logits.sub_(row_max[:, None]).exp_().sum(dim=1).log_()
        return row_max, row_logsum, col_max, col_sum
    m, n = sim.shape
    grid_m, grid_n = _grid(sim)
    row_max = sim.new_empty(m, grid_n)
    row_sum = sim.new_empty(m, grid_n)
    col_max = sim.new_empty(grid_m, n)
    col_sum = sim.new_empty(grid_m, n)
    _clip_stats_kernel[(grid_m, grid_n)](sim, row_max, row_sum, col_max, col_sum, _device_scalar(scale),
                                         m, n, sim.stride(0), grid_n, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                         num_warps=NUM_WARPS)
    row_max, row_sum = merge_stats(row_max, row_sum, dim=1)
    return (row_max, torch.log(row_sum), *merge_stats(col_max, col_sum, dim=0))


def clip_grad(sim: torch.Tensor, out: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
              col_coef: torch.Tensor, *, scale: torch.Tensor, row_coef: torch.Tensor, diag_offset: int,
              use_triton: bool) -> torch.Tensor:
    """Write d loss / d sim of a CLIP slab into `out` [m, N]; return sum(d loss / d logit * sim) (0-d).

    d loss / d logit[i, j] = row_coef * (softmax_row[i, j] - 1[j = i + diag_offset])
                           + col_coef[j] * (softmax_col[i, j] - 1[j = i + diag_offset]).
    sim: [m, N] float32; row_stats [2, m] and col_stats [2, N] hold (max, log of sum(exp(logit - max)))
    of the rows and (global) columns; col_coef [N] float32; scale, row_coef: 0-d tensors on the
    device; out [m, N] in the GEMM dtype.
    """
    if not use_triton or sim.dtype != torch.float32:
        logits = sim * scale  # in-place below: at most two slab-sized temporaries
        row_soft = (logits - row_stats[0][:, None]).sub_(row_stats[1][:, None]).exp_()
        col_soft = logits.sub_(col_stats[0][None, :]).sub_(col_stats[1][None, :]).exp_()
        positives = row_soft.diagonal(diag_offset)
        positives -= 1
        col_soft.diagonal(diag_offset).sub_(1)
        grad = row_soft.mul_(row_coef).add_(col_soft.mul_(col_coef[None, :]))
        partial = torch.dot(grad.flatten(), sim.flatten())
        out.copy_(grad.mul_(scale))
        return partial
    grid_m, grid_n = _grid(sim)
    partial = sim.new_empty(grid_m * grid_n)
    row_max, row_logsum = row_stats.contiguous()
    _clip_grad_kernel[(grid_m, grid_n)](sim, out, row_max, row_logsum, col_stats[0], col_stats[1], col_coef,
                                        partial, _device_scalar(scale), _device_scalar(row_coef), diag_offset,
                                        sim.shape[0], sim.shape[1], sim.stride(0), out.stride(0), grid_n,
                                        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    return partial.sum()


# ---------------------------------------------------------------------------------------- SigLIP


def siglip_slab(sim: torch.Tensor, out: torch.Tensor | None, *, scale: torch.Tensor, bias: torch.Tensor,
                coef: torch.Tensor, diag_offset: int, use_triton: bool) -> torch.Tensor:
    """SigLIP on one slab: returns [3] float32 = (sum of -logsigmoid(z * logit), sum of g * sim, sum of g)
    with g = coef * d(-logsigmoid(z * logit))/d logit; writes g * scale into `out` unless it is None.

    z is +1 where j = i + diag_offset and -1 elsewhere; logit = scale * sim + bias. scale, bias and
    coef are 0-d tensors on the device (coef is unused without `out`).
    """
    if not use_triton or sim.dtype != torch.float32:
        # margin = sign * logit with sign -1 off the positives: negate everything, flip the positives back
        neg_margin = sim * scale + bias  # = -margin off the diagonal
        neg_margin.diagonal(diag_offset).neg_()
        loss = torch.nn.functional.softplus(neg_margin).sum()
        if out is None:
            return torch.stack([loss, loss.new_zeros(()), loss.new_zeros(())])
        # d/d logit = -coef * sign * sigmoid(-margin): +coef * sigmoid(-margin) off the positives
        grad = neg_margin.sigmoid_().mul_(coef)
        grad.diagonal(diag_offset).neg_()
        sums = torch.stack([loss, torch.dot(grad.flatten(), sim.flatten()), grad.sum()])
        out.copy_(grad.mul_(scale))
        return sums
    grid_m, grid_n = _grid(sim, SIGLIP_BLOCK_M)
    partial = sim.new_zeros(grid_m * grid_n, 3)
    with_grad = out is not None
    _siglip_kernel[(grid_m, grid_n)](sim, out if with_grad else sim, partial, _device_scalar(scale),
                                     _device_scalar(bias), _device_scalar(coef), diag_offset, sim.shape[0],
                                     sim.shape[1], sim.stride(0), (out if with_grad else sim).stride(0), grid_n,
                                     WITH_GRAD=with_grad, BLOCK_M=SIGLIP_BLOCK_M, BLOCK_N=BLOCK_N,
                                     num_warps=NUM_WARPS)
    return partial.sum(dim=0)


# ------------------------------------------------------------------------- ahead-of-time compilation

# What the host functions above can write into `out`: the GEMM dtypes of the losses.
GRAD_DTYPES = ("fp32", "bf16", "fp16")
# Integer arguments a real launch at a 16-multiple batch gets as multiples of 16 (triton specialises
# them, as it does 16-byte aligned pointers): the slab's rows, columns and row strides. At odd sizes
# nothing is specialised (row slices of odd-width statistics are not even 16-byte aligned).
ALIGNED_INTS = ("M", "N", "stride_sim", "stride_grad")


def kernel_launches() -> list[dict]:
    """Every kernel configuration the host functions above can launch, for compiling them ahead of
    time (bench/kernel_report.py): one dict per (kernel, constexprs, grad dtype, sizes) with
    name, config (a short label), kernel, signature {argument: triton type}, constexprs, num_warps,
    sizes ("aligned": 16-multiple sizes, or "odd") and aligned (the arguments such a launch
    specialises as 16-divisible).

    Raises:
        RuntimeError: triton is not installed.
    """
    if triton is None:
        raise RuntimeError("kernel_launches() needs triton installed")

    def launch(kernel, config, grad_dtype="fp32", block_m=BLOCK_M, **constexprs):
        constexprs = dict(constexprs, BLOCK_M=block_m, BLOCK_N=BLOCK_N)
        signature = {}
        for arg in kernel.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                signature[arg] = f"*{grad_dtype}" if arg == "grad_ptr" else "*fp32"
            else:
                signature[arg] = "i32"
        aligned = [arg for arg in kernel.arg_names if arg.endswith("_ptr") or arg in ALIGNED_INTS]
        common = dict(name=kernel.__name__, kernel=kernel, signature=signature, constexprs=constexprs,
                      num_warps=NUM_WARPS)
        return [dict(common, config=config, sizes="aligned", aligned=aligned),
                dict(common, config=f"{config}, odd sizes", sizes="odd", aligned=[])]

    launches = [*launch(_clip_stats_kernel, "stats"),
                *launch(_siglip_kernel, "WITH_GRAD=False", block_m=SIGLIP_BLOCK_M, WITH_GRAD=False)]
    for dtype in GRAD_DTYPES:
        launches += launch(_clip_grad_kernel, f"grad {dtype}", dtype)
        launches += launch(_siglip_kernel, f"WITH_GRAD=True grad {dtype}", dtype, SIGLIP_BLOCK_M, WITH_GRAD=True)
    return launches
