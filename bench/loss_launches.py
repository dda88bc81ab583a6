"""Launches, GEMM calls and bytes of the chunked losses as a GPU would run them, counted on the CPU.

The custom ops' Python implementations (`clip_forward`/`clip_backward`, `siglip_forward`/
`siglip_backward`) run on fake CUDA tensors (torch's FakeTensorMode: shapes and dtypes, no data, no
GPU), with use_triton=True as on a GPU:
  * every Triton launch is counted where every launch passes, `kernel[grid](...)` -> `.run(...)` of
    the kernel's class (JITFunction, or InterpretedFunction under TRITON_INTERPRET=1), and not run;
  * every aten op is counted through a TorchDispatchMode; views and empty allocations launch nothing
    and are left out (as are prim ops such as device queries), the rest are kernel launches on a GPU; GEMMs (mm/addmm/bmm) are counted apart.
So B = N = 32,768 costs a second. The same code counts any version of the package (it calls the ops
with the arguments every version takes; the slab budget comes from LIFT_FAST_SLAB_BYTES).

    python bench/loss_launches.py              # the docs/loss.md table (B = N in 16k..64k, D in 384..4096)
    python bench/loss_launches.py --batch 32768 --dim 512

The table's memory and HBM columns are computed from the slab sizes the loss uses (what it
allocates per slab), not measured: see docs/loss.md, "Slab size".
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GEMMS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "_scaled_mm")
ALLOCATIONS = ("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided")
TABLE_BATCHES = (16384, 32768, 65536)
TABLE_DIMS = (384, 512, 768, 1024, 4096)


class OpCounter(TorchDispatchMode):
    """Counts the torch ops that launch a kernel: every aten op but views and empty allocations."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "aten" and not (func.is_view or name in ALLOCATIONS or name in ("detach", "lift_fresh", "alias")):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def gemms(self) -> int:
        return sum(count for name, count in self.ops.items() if name in GEMMS)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


@contextlib.contextmanager
def counted_triton_launches():
    """Count (and skip) every Triton launch: yields a Counter of kernel name -> launches."""
    launches: Counter = Counter()
    classes = []
    from triton.runtime.jit import JITFunction

    classes.append(JITFunction)
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    saved = [(cls, cls.__dict__.get("run")) for cls in classes]

    def run(self, *args, **kwargs):
        launches[getattr(self, "__name__", None) or self.fn.__name__] += 1

    try:
        for cls in classes:
            cls.run = run
        yield launches
    finally:
        for cls, original in saved:
            if original is None:
                del cls.run
            else:
                cls.run = original


def _phase(function, *args):
    """Run function(*args) counting torch ops and Triton launches; returns (result, counts)."""
    with counted_triton_launches() as triton_launches, OpCounter() as ops:
        result = function(*args)
    counts = {"gemm": ops.gemms, "triton": sum(triton_launches.values()), "torch_ops": ops.total,
              "ops": dict(ops.ops), "kernels": dict(triton_launches)}
    counts["launches"] = counts["torch_ops"] + counts["triton"]
    return result, counts


def count_loss(loss: str, batch: int, dim: int, *, text_grad: bool = True, dtype=torch.bfloat16,
               package: str = "lift_fast_kernels") -> dict:
    """Launches of one forward and one backward of `loss` ("clip" or "siglip") at B = N = batch, one
    process, use_triton=True on fake CUDA tensors of `dtype`, with or without text gradients.

    Returns {"forward": counts, "backward": counts, "gemm": GEMM calls in all, "launches": in all},
    counts being {"gemm", "triton", "torch_ops", "launches", "ops" (name -> calls), "kernels"}.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = importlib.import_module(f"{package}.{'clip_loss' if loss == 'clip' else 'siglip_loss'}")
    with FakeTensorMode():
        image = torch.empty(batch, dim, device="cuda", dtype=dtype)
        text = torch.empty(batch, dim, device="cuda", dtype=dtype)
        scale = torch.empty((), device="cuda", dtype=torch.float32)
        grad_loss = torch.empty((), device="cuda", dtype=torch.float32)
        if loss == "clip":
            (_, row_stats, col_stats, gathered), forward = _phase(
                module.clip_forward._init_fn, image, text, scale, 0, 1, True)
            _, backward = _phase(module.clip_backward._init_fn, grad_loss, image, text, gathered, scale, row_stats,
                                 col_stats, 0, 1, text_grad, True)
        else:
            bias = torch.empty((), device="cuda", dtype=torch.float32)
            (_, gathered), forward = _phase(module.siglip_forward._init_fn, image, text, scale, bias, 0, 1, True)
            _, backward = _phase(module.siglip_backward._init_fn, grad_loss, image, text, gathered, scale, bias, 0, 1,
                                 text_grad, True)
    return {"forward": forward, "backward": backward, "gemm": forward["gemm"] + backward["gemm"],
            "launches": forward["launches"] + backward["launches"]}


def slab_plan(batch: int, dim: int, grad_bytes: int = 2, slab_bytes: int = 0) -> dict:
    """Rows per slab, slabs, and what each slab costs at B = N = batch (bf16 GEMMs unless grad_bytes=4).

    peak_extra: the largest slab-sized memory alive at once (backward: the float32 similarities and
    their gradient in the GEMM dtype; forward: the similarities and the statistics kernel's
    row partials, 2 floats per 64 columns), in bytes. hbm_per_similarity: bytes the slab passes move
    per similarity of one forward + backward with text gradients: GEMM reads of the slab's operands
    ([m, D] rows and the [N, D] texts, every slab, in the GEMM dtype) and writes of the float32
    similarities, the element-wise passes' reads and writes, and the gradient GEMMs' reads.
    """
    from lift_fast_kernels.chunking import slab_rows

    rows = slab_rows(batch, batch, slab_bytes)
    slabs = -(-batch // rows)
    similarities = batch * batch
    operand = grad_bytes  # one element of the GEMM dtype
    # GEMM operand traffic of one pass over row slabs: every slab reads its rows and all N texts
    pass_reads = slabs * (rows + batch) * dim * operand
    forward = pass_reads + similarities * (4 + 4 + 4 / 32)  # sim written, read by the stats kernel, row partials
    # backward, per pass (row pass for d image, column pass for d text): similarity GEMM, the
    # element-wise pass (read float32 sim, write G), the gradient GEMM (read G and the other side's rows)
    backward_pass = pass_reads + similarities * (4 + 4 + operand + operand) + slabs * batch * dim * operand
    peak_forward = rows * batch * (4 + 8 / 64)
    peak_backward = rows * batch * (4 + operand)
    return {"rows": rows, "slabs": slabs, "peak_extra": max(peak_forward, peak_backward),
            "hbm_per_similarity": (forward + 2 * backward_pass) / similarities}


def table(batches=TABLE_BATCHES, dims=TABLE_DIMS) -> list[dict]:
    """The docs/loss.md table: one row per (B = N, D), CLIP with text gradients, bf16."""
    rows = []
    for batch in batches:
        for dim in dims:
            counts = count_loss("clip", batch, dim)
            plan = slab_plan(batch, dim)
            rows.append({"batch": batch, "dim": dim, **plan, "forward": counts["forward"]["launches"],
                         "backward": counts["backward"]["launches"], "gemm": counts["gemm"]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| B = N | D | rows / slab | slabs | launches fwd | launches bwd | GEMM calls | peak extra memory "
             "| HBM bytes / similarity |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['batch']:,} | {row['dim']} | {row['rows']:,} | {row['slabs']} | {row['forward']} | "
                     f"{row['backward']} | {row['gemm']} | {row['peak_extra'] / 2**30:.2f} GiB | "
                     f"{row['hbm_per_similarity']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, action="append", help="B = N (repeatable); default 16k, 32k, 64k")
    parser.add_argument("--dim", type=int, action="append", help="D (repeatable); default 384 .. 4096")
    args = parser.parse_args(argv)
    print(markdown(table(tuple(args.batch or TABLE_BATCHES), tuple(args.dim or TABLE_DIMS))))


if __name__ == "__main__":
    main()
