"""Launches, GEMM calls and bytes of the chunked losses as a GPU would run them, counted on the CPU.

The custom ops' Python implementations (`clip_forward`/`clip_backward`, `siglip_forward`/
`siglip_backward`) run on fake CUDA tensors (torch's FakeTensorMode: shapes and dtypes, no data, no
GPU), with use_triton=True as on a GPU:
  * every Triton launch is counted where every launch passes, `kernel[grid](...)` -> `.run(...)` of
    the kernel's class (JITFunction, or InterpretedFunction under TRITON_INTERPRET=1), and not run;
  * every aten op is counted through a TorchDispatchMode; views and empty allocations launch nothing
    and are left out (as are prim ops such as device queries), the rest are kernel launches on a GPU;
    GEMMs (mm/addmm/bmm) are counted apart.
So B = N = 32,768 costs a second. The same code counts any version of the package (it calls the ops
with the arguments every version takes; the slab budget comes from LIFT_FAST_SLAB_BYTES).

    python bench/loss_launches.py              # the docs/loss.md table (B = N in 16k..64k, D in 384..4096)
    python bench/loss_launches.py --batch 32768 --dim 512

The table's memory columns are measured on the same fake tensors (`LiveBytes`: every tensor an op
makes, alive until its object is freed); its HBM column is a traffic model (`slab_plan`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import weakref
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


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors torch ops allocate, alive at once: now and at the peak, split into slab
    tensors (2-D, neither [., D] rows nor [2, .] statistics: similarities, their gradient, row partials)
    and the rest (gradients, statistics, buffers). A tensor counts from the op that makes it until the
    tensor object is freed (weakref); views allocate nothing."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.live = {"slab": 0, "other": 0}
        self.peak = {"slab": 0, "other": 0, "all": 0}

    def _kind(self, tensor: torch.Tensor) -> str:
        shape = tuple(tensor.shape)
        return "slab" if len(shape) == 2 and shape[1] != self.dim and shape[0] != 2 else "other"

    def _release(self, kind: str, size: int) -> None:
        self.live[kind] -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.namespace != "aten":
            return out
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and func.overloadpacket.__name__ not in ("detach", "alias"):
                kind, size = self._kind(tensor), tensor.numel() * tensor.element_size()
                if any(arg is tensor for arg in (*args, *(kwargs or {}).values())):
                    continue  # an in-place op or an out= argument: nothing new
                self.live[kind] += size
                weakref.finalize(tensor, self._release, kind, size)
        for kind in ("slab", "other"):
            self.peak[kind] = max(self.peak[kind], self.live[kind])
        self.peak["all"] = max(self.peak["all"], self.live["slab"] + self.live["other"])
        return out


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
               package: str = "lift_fast_kernels", use_triton: bool = True, slab_bytes: int | None = None) -> dict:
    """Launches of one forward and one backward of `loss` ("clip" or "siglip") at B = N = batch, one
    process, on fake CUDA tensors of `dtype` (use_triton=False: the torch twins' ops), with or without
    text gradients. slab_bytes: the budget handed to the ops (None: the default).

    Returns {"forward": counts, "backward": counts, "gemm": GEMM calls in all, "launches": in all},
    counts being {"gemm", "triton", "torch_ops", "launches", "ops" (name -> calls), "kernels"}.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = importlib.import_module(f"{package}.{'clip_loss' if loss == 'clip' else 'siglip_loss'}")
    budget = {} if slab_bytes is None else {"slab_bytes": slab_bytes}  # e4d546b's ops take none
    with FakeTensorMode():
        image = torch.empty(batch, dim, device="cuda", dtype=dtype)
        text = torch.empty(batch, dim, device="cuda", dtype=dtype)
        scale = torch.empty((), device="cuda", dtype=torch.float32)
        grad_loss = torch.empty((), device="cuda", dtype=torch.float32)
        if loss == "clip":
            (_, row_stats, col_stats, gathered), forward = _phase(
                lambda *args: module.clip_forward._init_fn(*args, **budget), image, text, scale, 0, 1, use_triton)
            _, backward = _phase(lambda *args: module.clip_backward._init_fn(*args, **budget), grad_loss, image,
                                 text, gathered, scale, row_stats, col_stats, 0, 1, text_grad, use_triton)
        else:
            bias = torch.empty((), device="cuda", dtype=torch.float32)
            (_, gathered), forward = _phase(lambda *args: module.siglip_forward._init_fn(*args, **budget), image,
                                            text, scale, bias, 0, 1, use_triton)
            _, backward = _phase(lambda *args: module.siglip_backward._init_fn(*args, **budget), grad_loss, image,
                                 text, gathered, scale, bias, 0, 1, text_grad, use_triton)
    return {"forward": forward, "backward": backward, "gemm": forward["gemm"] + backward["gemm"],
            "launches": forward["launches"] + backward["launches"]}


def memory(loss: str, batch: int, dim: int, *, text_grad: bool = True, dtype=torch.bfloat16,
           package: str = "lift_fast_kernels") -> dict:
    """Peak bytes one forward + backward allocates beyond its inputs (B = N = batch, fake CUDA tensors,
    Triton launches skipped), as `LiveBytes` splits them, and the inputs and gradients for scale:
    {"slab": peak of slab tensors, "other": peak of the rest (the gradients included), "all",
    "inputs_and_grads": image, text and their gradients in `dtype`}."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = importlib.import_module(f"{package}.{'clip_loss' if loss == 'clip' else 'siglip_loss'}")
    with FakeTensorMode():
        image = torch.empty(batch, dim, device="cuda", dtype=dtype)
        text = torch.empty(batch, dim, device="cuda", dtype=dtype)
        scale = torch.empty((), device="cuda", dtype=torch.float32)
        grad_loss = torch.empty((), device="cuda", dtype=torch.float32)
        gc.collect()
        with counted_triton_launches(), LiveBytes(dim) as live:
            if loss == "clip":
                _, row_stats, col_stats, gathered = module.clip_forward._init_fn(image, text, scale, 0, 1, True)
                grads = module.clip_backward._init_fn(grad_loss, image, text, gathered, scale, row_stats, col_stats,
                                                      0, 1, text_grad, True)
            else:
                bias = torch.empty((), device="cuda", dtype=torch.float32)
                _, gathered = module.siglip_forward._init_fn(image, text, scale, bias, 0, 1, True)
                grads = module.siglip_backward._init_fn(grad_loss, image, text, gathered, scale, bias, 0, 1,
                                                        text_grad, True)
        del grads
    size = batch * dim * torch.finfo(dtype).bits // 8
    return {**live.peak, "inputs_and_grads": (4 if text_grad else 3) * size}


def slab_plan(batch: int, dim: int, operand_bytes: int = 2, slab_bytes: int = 0) -> dict:
    """Rows per slab, slabs, and the HBM bytes the slab passes move per similarity of one forward +
    backward with text gradients at B = N = batch (bf16 GEMMs unless operand_bytes=4): GEMM reads of
    the slab's operands (every slab reads its [m, D] rows and all [N, D] of the other side) and writes
    of the float32 similarities, the element-wise passes' reads and writes, the gradient GEMMs' reads
    of G and writes of their [m, D] rows; the forward pass, the row pass (d image) and the column pass
    (d texts). A model of the traffic, not a measurement (L2 reuse makes the GEMM reads smaller)."""
    from lift_fast_kernels.chunking import slab_rows

    rows = slab_rows(batch, batch, slab_bytes)
    slabs = -(-batch // rows)
    similarities = batch * batch
    operands = slabs * (rows + batch) * dim * operand_bytes  # one pass's similarity-GEMM reads
    forward = operands + similarities * (4 + 4 + 4 / 32)  # sim written, read by the stats kernel, row partials
    # per backward pass: similarity GEMM; element-wise (read float32 sim, write G); gradient GEMM (read G,
    # the other side's rows per slab, write the rows' gradient)
    backward_pass = (operands + similarities * (4 + 4 + 2 * operand_bytes)
                     + slabs * batch * dim * operand_bytes + batch * dim * operand_bytes)
    return {"rows": rows, "slabs": slabs, "hbm_per_similarity": (forward + 2 * backward_pass) / similarities}


def table(batches=TABLE_BATCHES, dims=TABLE_DIMS) -> list[dict]:
    """The docs/loss.md table: one row per (B = N, D), CLIP with text gradients, bf16."""
    rows = []
    for batch in batches:
        for dim in dims:
            counts = count_loss("clip", batch, dim)
            plan = slab_plan(batch, dim)
            peak = memory("clip", batch, dim)
            rows.append({"batch": batch, "dim": dim, **plan, "peak_extra": peak["slab"],
                         "other_ratio": (peak["inputs_and_grads"] / 2 + peak["other"]) / peak["inputs_and_grads"],
                         "forward": counts["forward"]["launches"],
                         "backward": counts["backward"]["launches"], "gemm": counts["gemm"]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| B = N | D | rows / slab | slabs | launches fwd | launches bwd | GEMM calls | peak slab memory "
             "| rest / (inputs + grads) | HBM bytes / similarity |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['batch']:,} | {row['dim']} | {row['rows']:,} | {row['slabs']} | {row['forward']} | "
                     f"{row['backward']} | {row['gemm']} | {row['peak_extra'] / 2**30:.2f} GiB | "
                     f"{row['other_ratio']:.3f} | {row['hbm_per_similarity']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, action="append", help="B = N (repeatable); default 16k, 32k, 64k")
    parser.add_argument("--dim", type=int, action="append", help="D (repeatable); default 384 .. 4096")
    args = parser.parse_args(argv)
    print(markdown(table(tuple(args.batch or TABLE_BATCHES), tuple(args.dim or TABLE_DIMS))))


if __name__ == "__main__":
    main()
