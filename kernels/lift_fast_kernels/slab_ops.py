"""Element-wise work on one slab of similarities: Triton kernels and their plain-torch twins.

The contrastive losses walk the batch in row slabs: sim = rows @ columns.T ([m, N], float32,
from one GEMM), then
  * CLIP forward:  per-row log-sum-exp of scale * sim, each row's positive, and the running
                   per-column (max, sum of exp) over the slabs so far, updated in place,
  * CLIP backward: d loss / d sim from the row and column softmaxes, written in the GEMM dtype
                   (on row slabs for the image gradient, on transposed column slabs for the text's),
  * SigLIP forward and backward: the sum of -logsigmoid(z * (scale * sim + bias)) and its gradient,
plus the partial sums that make d loss / d logit_scale (and / d logit_bias), written into a slice
of one buffer the loss sums once after its slab loop. Per slab: two launches for the CLIP
statistics, one for every other pass; the GEMMs around them are cuBLAS's.

The torch twins compute the same quantities with torch ops; they are the CPU path and the
reference the kernels are tested against. Functions here take and return plain tensors. The kernels
work in float32 (their scalar arguments are float32): float64 slabs always take the torch twins.
Offsets into a slab are int64 in the kernels: a slab may pass 2^31 elements.
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
# _clip_rows_kernel merges the stats kernel's [m, N / BLOCK_N] row partials, 32 rows x 32 blocks a step:
# 40-56 registers (36-48 warps per SM) with triton 3.6 and 3.8 on sm_90a/sm_100a, odd sizes too, where
# 32 x 64 took 153-168 with triton 3.6 (12 warps) and 96-118 with 3.8 (kernel report, 2026-12-08).
# The stats kernel (column-owning, a loop over the slab's rows) kept the 32 x 64 tile: 55-56 registers
# (36 warps), 72-117 at odd sizes (16-28), 128-bit loads of the whole tile.
ROWS_BLOCK_M = 32
ROWS_BLOCK_B = 32
NUM_WARPS = 4
# triton.jit builds interpreted kernels when this is set at import time; only then do they take CPU tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _clip_stats_kernel(
        sim_ptr,  # [M, N] float32 similarities of this slab's rows against all columns
        row_max_ptr,  # [M, NB] out: max of scale * sim over each column block
        row_sum_ptr,  # [M, NB] out: sum of exp(scale * sim - that max) over each column block
        col_max_ptr,  # [N] running max of each column over the slabs so far: read and updated in place
        col_sum_ptr,  # [N] running sum of exp(logit - running max): read and updated in place
        scale_ptr,  # [] float32 logit scale, read on the device (no host sync)
        M, N, stride_sim, NB,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One program owns BLOCK_N columns and walks all M rows of the slab, so it alone reads and
        # writes its columns' running statistics: the merge needs no atomics and no second pass.
        pid_n = tl.program_id(0)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        scale = tl.load(scale_ptr)
        run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_N,), tl.float32)
        for start in range(0, M, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            mask = row_ok[:, None] & col_ok[None, :]
            # int64 offsets: a slab of 8,192 rows x 262,144 columns passes 2^31 elements
            offsets = rows.to(tl.int64)[:, None] * stride_sim + cols[None, :]
            logits = tl.where(mask, tl.load(sim_ptr + offsets, mask=mask, other=0.0) * scale, float("-inf"))
            # every tile holds a valid row and a valid column, so the maxima of valid rows and columns
            # are finite; the -inf maxima outside the slab become 0 (no inf - inf) and are not stored
            row_max = tl.where(row_ok, tl.max(logits, axis=1), 0.0)
            row_sum = tl.sum(tl.exp(logits - row_max[:, None]), axis=1)
            tl.store(row_max_ptr + rows.to(tl.int64) * NB + pid_n, row_max, mask=row_ok)
            tl.store(row_sum_ptr + rows.to(tl.int64) * NB + pid_n, row_sum, mask=row_ok)
            top = tl.where(col_ok, tl.maximum(run_max, tl.max(logits, axis=0)), 0.0)
            run_sum = run_sum * tl.exp(run_max - top) + tl.sum(tl.exp(logits - top[None, :]), axis=0)
            run_max = top
        old_max = tl.load(col_max_ptr + cols, mask=col_ok, other=0.0)
        old_sum = tl.load(col_sum_ptr + cols, mask=col_ok, other=0.0)
        top = tl.maximum(old_max, run_max)  # finite: the running max starts at -inf, this slab's is finite
        total = old_sum * tl.exp(old_max - top) + run_sum * tl.exp(run_max - top)
        tl.store(col_max_ptr + cols, top, mask=col_ok)
        tl.store(col_sum_ptr + cols, total, mask=col_ok)

    @triton.jit
    def _clip_rows_kernel(
        sim_ptr,  # [M, N] float32 similarities of this slab (only the positives are read)
        row_max_ptr, row_sum_ptr,  # [M, NB] the stats kernel's per-column-block row statistics
        out_max_ptr, out_logsum_ptr,  # [M] out: each row's max and log of sum(exp(logit - max))
        positive_ptr,  # [M] out: scale * sim of each row's positive (column row + diag_offset)
        scale_ptr,  # [] float32 logit scale
        diag_offset, M, NB, stride_sim,
        BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_M,), tl.float32)
        for start in range(0, NB, BLOCK_B):
            blocks = start + tl.arange(0, BLOCK_B)
            mask = row_ok[:, None] & (blocks < NB)[None, :]
            offsets = rows.to(tl.int64)[:, None] * NB + blocks[None, :]
            maxima = tl.load(row_max_ptr + offsets, mask=mask, other=float("-inf"))
            sums = tl.load(row_sum_ptr + offsets, mask=mask, other=0.0)
            top = tl.where(row_ok, tl.maximum(run_max, tl.max(maxima, axis=1)), 0.0)
            run_sum = run_sum * tl.exp(run_max - top) + tl.sum(sums * tl.exp(maxima - top[:, None]), axis=1)
            run_max = top
        scale = tl.load(scale_ptr)
        positive = tl.load(sim_ptr + rows.to(tl.int64) * stride_sim + rows + diag_offset, mask=row_ok, other=0.0)
        tl.store(out_max_ptr + rows, run_max, mask=row_ok)
        tl.store(out_logsum_ptr + rows, tl.log(tl.where(row_ok, run_sum, 1.0)), mask=row_ok)
        tl.store(positive_ptr + rows, positive * scale, mask=row_ok)

    @triton.jit
    def _slab_tile(sim_ptr, M, N, stride_sim, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's tile of the [M, N] slab: (rows [BLOCK_M], cols [BLOCK_N], row_ok, col_ok,
        mask [BLOCK_M, BLOCK_N], sim [BLOCK_M, BLOCK_N] with 0 outside the slab)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        sim = tl.load(sim_ptr + rows.to(tl.int64)[:, None] * stride_sim + cols[None, :], mask=mask, other=0.0)
        return rows, cols, row_ok, col_ok, mask, sim

    @triton.jit
    def _clip_grad_kernel(
        sim_ptr,  # [M, N] float32 similarities of this slab (read)
        grad_ptr,  # [M, N] out: d loss / d sim, in the GEMM dtype (may alias nothing else)
        row_max_ptr,  # [M] float32 max of each row's logits
        row_logsum_ptr,  # [M] float32 log of sum(exp(logit - row max)) of each row
        col_max_ptr,  # [N] float32 max of each column's logits (over the global batch)
        col_logsum_ptr,  # [N] float32 log of sum(exp(logit - column max)) of each column
        row_coef_ptr,  # [M] or [] float32 weight of the row-softmax term (element i at i * row_coef_stride)
        col_coef_ptr,  # [N] or [] float32 weight of the column-softmax term
        partial_ptr,  # [MB * NB] out: sum of d loss / d logit * sim over the tile (for d scale)
        scale_ptr,  # [] float32 logit scale
        diag_offset,  # column of row 0's positive (negative in the text gradient's transposed slabs)
        M, N, stride_sim, stride_grad, NB, row_coef_stride, col_coef_stride,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows, cols, row_ok, col_ok, mask, sim = _slab_tile(sim_ptr, M, N, stride_sim, BLOCK_M, BLOCK_N)
        row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
        row_logsum = tl.load(row_logsum_ptr + rows, mask=row_ok, other=0.0)
        col_max = tl.load(col_max_ptr + cols, mask=col_ok, other=0.0)
        col_logsum = tl.load(col_logsum_ptr + cols, mask=col_ok, other=0.0)
        # a coefficient stride of 0 broadcasts a scalar: the row pass weighs rows by grad_loss / 2b and
        # columns by their owner's; the text gradient's transposed slabs swap the two
        row_coef = tl.load(row_coef_ptr + rows * row_coef_stride, mask=row_ok, other=0.0)
        col_coef = tl.load(col_coef_ptr + cols * col_coef_stride, mask=col_ok, other=0.0)
        scale = tl.load(scale_ptr)
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
        grad = tl.where(mask, row_coef[:, None] * row_soft + col_coef[None, :] * col_soft, 0.0)
        tl.store(partial_ptr + pid_m * NB + pid_n, tl.sum(tl.sum(grad * sim, axis=1), axis=0))
        tl.store(grad_ptr + rows.to(tl.int64)[:, None] * stride_grad + cols[None, :],
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
            tl.store(grad_ptr + rows.to(tl.int64)[:, None] * stride_grad + cols[None, :],
                     (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def _grid(rows: int, columns: int, block_m: int = BLOCK_M) -> tuple[int, int]:
    return triton.cdiv(rows, block_m), triton.cdiv(columns, BLOCK_N)


def partials_per_slab(rows: int, columns: int, use_triton: bool, block_m: int = BLOCK_M) -> int:
    """How many partial sums one slab call of `clip_grad` (block_m=BLOCK_M) or `siglip_slab`
    (SIGLIP_BLOCK_M) writes for a [rows, columns] slab: one per Triton program, one on the torch path.
    The losses keep them in one [slabs, partials] buffer and sum it once, after the slab loop."""
    if not use_triton:
        return 1
    grid_m, grid_n = _grid(rows, columns, block_m)
    return grid_m * grid_n


def _device_scalar(value: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 tensor for a kernel's scalar pointer (a no-op for the losses' float32 scalars)."""
    return value.reshape(()).to(torch.float32).contiguous()


def _coef(value: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A coefficient for a kernel pointer and its stride: 0 for a scalar (broadcast), 1 for a vector."""
    return (value.reshape(()), 0) if value.dim() == 0 else (value, 1)


# ------------------------------------------------------------------------------------------ CLIP


def new_column_stats(columns: int, like: torch.Tensor) -> torch.Tensor:
    """The running column statistics `clip_stats` updates: [2, N] of (max = -inf, sum = 0), like's dtype."""
    stats = like.new_zeros(2, columns)
    stats[0] = float("-inf")
    return stats


def clip_stats(sim: torch.Tensor, scale: torch.Tensor, row_out: torch.Tensor, positive_out: torch.Tensor,
               col_stats: torch.Tensor, *, diag_offset: int, use_triton: bool) -> None:
    """Softmax statistics of logits = scale * sim for one slab, written in place (nothing returned).

    Writes row_out [2, m] = (max, log of sum(exp(logit - max))) of each row, positive_out [m] =
    scale * sim[i, i + diag_offset], and folds this slab's rows into the running column statistics
    col_stats [2, N] = (max, sum of exp(logit - max)) (start from `new_column_stats`).
    sim: [m, N] float32 (float64 on the torch path), contiguous rows; scale: 0-d tensor on sim's
    device (never read on the host); outputs in sim's dtype, rows may be slices of larger buffers.
    Triton: two launches (the column-owning stats kernel, then the row merge).
    """
    if not use_triton or sim.dtype != torch.float32:
        logits = sim * scale  # in place below: at most two slab-sized temporaries
        torch.amax(logits, dim=1, out=row_out[0])
        top = torch.maximum(col_stats[0], logits.amax(dim=0))
        col_stats[1].mul_(torch.exp(col_stats[0] - top)).add_((logits - top).exp_().sum(dim=0))
        col_stats[0].copy_(top)
        positive_out.copy_(logits.diagonal(diag_offset))
        torch.log(logits.sub_(row_out[0][:, None]).exp_().sum(dim=1), out=row_out[1])
        return
    m, n = sim.shape
    grid_n = triton.cdiv(n, BLOCK_N)
    row_max = sim.new_empty(m, grid_n)
    row_sum = sim.new_empty(m, grid_n)
    scale = _device_scalar(scale)
    _clip_stats_kernel[(grid_n,)](sim, row_max, row_sum, col_stats[0], col_stats[1], scale, m, n, sim.stride(0),
                                  grid_n, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    _clip_rows_kernel[(triton.cdiv(m, ROWS_BLOCK_M),)](sim, row_max, row_sum, row_out[0], row_out[1], positive_out,
                                                       scale, diag_offset, m, grid_n, sim.stride(0),
                                                       BLOCK_M=ROWS_BLOCK_M, BLOCK_B=ROWS_BLOCK_B,
                                                       num_warps=NUM_WARPS)


def clip_grad(sim: torch.Tensor, out: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
              row_coef: torch.Tensor, col_coef: torch.Tensor, partial_out: torch.Tensor, *, scale: torch.Tensor,
              diag_offset: int, use_triton: bool) -> None:
    """Write d loss / d sim of a CLIP slab into `out` [m, N] and sum(d loss / d logit * sim) into
    partial_out (`partials_per_slab(m, N, use_triton)` elements whose sum is the slab's).

    d loss / d logit[i, j] = row_coef[i] * (softmax_row[i, j] - 1[j = i + diag_offset])
                           + col_coef[j] * (softmax_col[i, j] - 1[j = i + diag_offset]).
    sim: [m, N] float32; row_stats [2, m] and col_stats [2, N] hold (max, log of sum(exp(logit - max)))
    of the rows and (global) columns; row_coef [m] or 0-d, col_coef [N] or 0-d; scale: 0-d, on the
    device; out [m, N] in the GEMM dtype. The text gradient calls this on transposed slabs (texts as
    rows), with the statistics and coefficients swapped and a negative diag_offset.
    Triton: one launch.
    """
    if not use_triton or sim.dtype != torch.float32:
        logits = sim * scale  # in place below: at most two slab-sized temporaries
        row_soft = (logits - row_stats[0][:, None]).sub_(row_stats[1][:, None]).exp_()
        col_soft = logits.sub_(col_stats[0][None, :]).sub_(col_stats[1][None, :]).exp_()
        row_soft.diagonal(diag_offset).sub_(1)
        col_soft.diagonal(diag_offset).sub_(1)
        row_weight = row_coef[:, None] if row_coef.dim() else row_coef
        grad = row_soft.mul_(row_weight).add_(col_soft.mul_(col_coef))
        torch.dot(grad.flatten(), sim.flatten(), out=partial_out[0])
        torch.mul(grad, scale, out=out) if out.dtype == grad.dtype else out.copy_(grad.mul_(scale))
        return
    grid_m, grid_n = _grid(*sim.shape)
    row_coef, row_coef_stride = _coef(row_coef)
    col_coef, col_coef_stride = _coef(col_coef)
    _clip_grad_kernel[(grid_m, grid_n)](sim, out, row_stats[0], row_stats[1], col_stats[0], col_stats[1], row_coef,
                                        col_coef, partial_out, _device_scalar(scale), diag_offset, sim.shape[0],
                                        sim.shape[1], sim.stride(0), out.stride(0), grid_n, row_coef_stride,
                                        col_coef_stride, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)


# ---------------------------------------------------------------------------------------- SigLIP


def siglip_slab(sim: torch.Tensor, out: torch.Tensor | None, partial_out: torch.Tensor, *, scale: torch.Tensor,
                bias: torch.Tensor, coef: torch.Tensor, diag_offset: int, use_triton: bool) -> None:
    """SigLIP on one slab: writes into partial_out [partials_per_slab(m, N, use_triton, SIGLIP_BLOCK_M), 3]
    sums whose total is (sum of -logsigmoid(z * logit), sum of g * sim, sum of g), with
    g = coef * d(-logsigmoid(z * logit))/d logit, and g * scale into `out` unless it is None (then the
    last two sums are left as they are).

    z is +1 where j = i + diag_offset and -1 elsewhere; logit = scale * sim + bias. scale, bias and
    coef are 0-d tensors on the device (coef is unused without `out`). Triton: one launch.
    """
    if not use_triton or sim.dtype != torch.float32:
        # margin = sign * logit with sign -1 off the positives: negate everything, flip the positives back
        neg_margin = sim * scale + bias  # = -margin off the diagonal
        neg_margin.diagonal(diag_offset).neg_()
        torch.sum(torch.nn.functional.softplus(neg_margin), dim=(0, 1), out=partial_out[0, 0])
        if out is None:
            return
        # d/d logit = -coef * sign * sigmoid(-margin): +coef * sigmoid(-margin) off the positives
        grad = neg_margin.sigmoid_().mul_(coef)
        grad.diagonal(diag_offset).neg_()
        torch.dot(grad.flatten(), sim.flatten(), out=partial_out[0, 1])
        torch.sum(grad, dim=(0, 1), out=partial_out[0, 2])
        torch.mul(grad, scale, out=out) if out.dtype == grad.dtype else out.copy_(grad.mul_(scale))
        return
    grid_m, grid_n = _grid(*sim.shape, SIGLIP_BLOCK_M)
    with_grad = out is not None
    target = out if with_grad else sim
    _siglip_kernel[(grid_m, grid_n)](sim, target, partial_out, _device_scalar(scale), _device_scalar(bias),
                                     _device_scalar(coef), diag_offset, sim.shape[0], sim.shape[1], sim.stride(0),
                                     target.stride(0), grid_n, WITH_GRAD=with_grad, BLOCK_M=SIGLIP_BLOCK_M,
                                     BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)


# ------------------------------------------------------------------------- ahead-of-time compilation

# What the host functions above can write into `out`: the GEMM dtypes of the losses.
GRAD_DTYPES = ("fp32", "bf16", "fp16")
# Integer arguments a real launch at a 16-multiple batch gets as multiples of 16 (triton specialises
# them, as it does 16-byte aligned pointers): the slab's rows, columns and row strides. At odd sizes
# nothing is specialised (row slices of odd-width statistics are not even 16-byte aligned).
ALIGNED_INTS = ("M", "N", "stride_sim", "stride_grad")
# (the coefficient strides are 0 or 1 and the statistics' column-block counts N / 64: never specialised)


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
        tile = dict(BLOCK_N=BLOCK_N) if "BLOCK_N" in kernel.arg_names else dict(BLOCK_B=ROWS_BLOCK_B)
        constexprs = dict(constexprs, BLOCK_M=block_m, **tile)
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

    launches = [*launch(_clip_stats_kernel, "stats"), *launch(_clip_rows_kernel, "row merge", block_m=ROWS_BLOCK_M),
                *launch(_siglip_kernel, "WITH_GRAD=False", block_m=SIGLIP_BLOCK_M, WITH_GRAD=False)]
    for dtype in GRAD_DTYPES:
        launches += launch(_clip_grad_kernel, f"grad {dtype}", dtype)
        launches += launch(_siglip_kernel, f"WITH_GRAD=True grad {dtype}", dtype, SIGLIP_BLOCK_M, WITH_GRAD=True)
    return launches
