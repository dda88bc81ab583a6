"""What a train step runs, as torch's profiler sees it: the dtypes of every GEMM and the host syncs.

Two promises of the step are checked with these, on the CPU in tests (tests/test_step_dtypes.py,
tests/test_step_syncs.py) and on CUDA by bench/gpu_checks/train.py:
- one compute dtype: with train.precision=bf16 every matrix product of forward, loss and backward
  takes bf16 inputs (the profiler also sees the ops inside the losses' custom ops);
- no host sync: a step that is not logged calls `aten::_local_scalar_dense` (what .item(), float()
  and bool() of a tensor dispatch to, each a wait for the device) zero times.

`synthetic_parts` builds the trainer's parts as `build.build_parts` does, without a loader, for steps on
synthetic batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

# The ops whose inputs decide a GEMM's dtype (forward and backward), as the profiler names them.
GEMM_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul", "aten::linear",
    "aten::_addmm_activation", "aten::mv", "aten::addmv", "aten::dot", "aten::einsum",
    "aten::conv2d", "aten::convolution", "aten::_convolution", "aten::convolution_backward",
    "aten::mkldnn_convolution", "aten::cudnn_convolution",
    "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_backward", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_efficient_attention_backward", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_cudnn_attention_backward", "aten::_flash_attention_forward",
    "aten::_flash_attention_backward", "aten::_efficient_attention_forward", "aten::_efficient_attention_backward",
})
# The profiler's names of floating-point tensor dtypes (other inputs: Scalar, ScalarList, ...).
FLOAT_DTYPES = frozenset({"float", "double", "c10::BFloat16", "c10::Half", "c10::Float8_e4m3fn", "c10::Float8_e5m2"})
HOST_SYNC_OP = "aten::_local_scalar_dense"
# On the CPU, fused AdamW's kernel reads its step counts with item() (a CPU read, no device to wait
# for); the CUDA kernel reads them on the device. Counted apart on the CPU, never on CUDA.
CPU_ONLY_READS = ("aten::_fused_adamw_",)


def _calls_a_gemm(event) -> bool:
    return any(child.name in GEMM_OPS or _calls_a_gemm(child) for child in event.cpu_children)


def gemm_dtypes(events: Iterable) -> list[tuple[str, tuple[str, ...], tuple]]:
    """(op name, the dtypes of its tensor inputs, their shapes) for every GEMM_OPS event of a
    profile (torch.profiler.profile(record_shapes=True).events()) that computes the product itself:
    an op that calls another GEMM op (linear -> addmm, conv2d -> convolution, and autocast's
    float32 entry that re-dispatches in bf16) is left to the one it calls."""
    found = []
    for event in events:
        if event.name in GEMM_OPS and not _calls_a_gemm(event):
            if getattr(event, "input_dtypes", None) is None:
                raise RuntimeError(f"torch {torch.__version__}'s profiler gives no input dtypes (FunctionEvent."
                                   "input_dtypes); record with record_shapes=True, on a torch that has them")
            tensors = [index for index, dtype in enumerate(event.input_dtypes) if dtype in FLOAT_DTYPES]
            if "attention" in event.name:  # q, k, v, out, grad_out [B, H, N, Dh]; not the float32 logsumexp [B, H, N]
                tensors = [index for index in tensors if len(event.input_shapes[index]) == 4]
            dtypes = tuple(event.input_dtypes[index] for index in tensors)
            shapes = tuple(tuple(event.input_shapes[index]) for index in tensors)
            found.append((event.name, dtypes, shapes))
    return found


def intended_float32(event) -> bool:
    """The one float32 product a bf16 step has on purpose: `aten::dot` inside a loss's backward custom
    op (lift_fast::clip_backward, siglip_backward), the logit scale's gradient (the sum over a slab of
    grad * similarity), a reduction of float32 statistics into one number, not a GEMM of features."""
    return event.name == "aten::dot" and any(name.startswith("lift_fast::") and name.endswith("_backward")
                                             for name in callers(event))


def gemms_not_in(events: Iterable, dtype: str = "c10::BFloat16") -> tuple[int, list[tuple[str, tuple, list[str]]]]:
    """(the number of GEMMs, those with an input not in `dtype` and not `intended_float32`, each as
    (op name, input dtypes, its three innermost callers))."""
    count, wrong = 0, []
    for event in events:
        found = gemm_dtypes([event])
        if not found:
            continue
        count += 1
        if any(name != dtype for name in found[0][1]) and not intended_float32(event):
            wrong.append((event.name, found[0][1], list(callers(event))[:3]))
    return count, wrong


def callers(event) -> Iterable[str]:
    """The names of the ops (and autograd nodes) an event was called from, innermost first."""
    parent = event.cpu_parent
    while parent is not None:
        yield parent.name
        parent = parent.cpu_parent


def host_syncs(events: Iterable, *, device: torch.device | str = "cuda") -> list[list[str]]:
    """The host syncs (`aten::_local_scalar_dense`) of a profile, each as its chain of calling ops,
    innermost first. On a CPU `device`, those inside CPU_ONLY_READS are left out (see there)."""
    skip = CPU_ONLY_READS if torch.device(device).type == "cpu" else ()
    chains = []
    for event in events:
        if event.name == HOST_SYNC_OP:
            chain = [event.name, *callers(event)]
            if not any(name in skip for name in chain):
                chains.append(chain)
    return chains


def synthetic_parts(cfg, ctx, dim: int, batch: int):
    """The trainer's Parts for cfg on ctx (model, wrapped/sharded and compiled as `build.build_parts` does it,
    loss, optimiser, schedule; no loader) and a synthetic batch dict for `loop._train_step`: images
    [batch, 3, S, S] and unit text embeddings [batch, dim] on ctx.device, seeded."""
    from lift_fast.device import peak_tflops, resolve_compile, resolve_precision
    from lift_fast.models.flops import train_flops_per_sample
    from lift_fast.models.vit import build_model
    from lift_fast.train import distributed
    from lift_fast.train.build import Parts, build_loss
    from lift_fast.train.optim import build_optimizer, build_scheduler

    device = ctx.device
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.image_size, dim, cfg.train.logit_scale_init).to(device)
    if cfg.train.loss == "siglip":
        model.register_parameter("logit_bias", torch.nn.Parameter(torch.tensor(-10.0, device=device)))
    precision = resolve_precision(cfg.train.precision, device)
    param_dtype = distributed.sharded_param_dtype(cfg.train.parallel, ctx, precision)
    forward = distributed.wrap_model(model, ctx, cfg.train.parallel, compile=resolve_compile(cfg.train.compile, device),
                                     param_dtype=param_dtype)
    optimizer = build_optimizer(model, cfg.train)
    flops = train_flops_per_sample(model.visual.spec, cfg.data.image_size, dim, batch * ctx.world_size,
                                   head_hidden=cfg.model.head_hidden, pooling=cfg.model.pooling)
    parts = Parts(model, forward, build_loss(cfg, ctx, model), optimizer, build_scheduler(optimizer, cfg.train), None,
                  precision, flops, peak_tflops(device, precision, cfg.train.peak_tflops), param_dtype is not None)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed + 1 + ctx.rank)
    size = cfg.data.image_size
    images = torch.randn(batch, 3, size, size, device=device, generator=generator)
    texts = torch.nn.functional.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=-1)
    data = {"images": images, "text_embeddings": texts, "skipped": 0, "keys": [str(i) for i in range(batch)]}
    return parts, data


def profile_steps(cfg, ctx, parts, progress, data, steps: int, *, read_now: bool = False,
                  run_dir: Path | str = ".") -> list:
    """Run `steps` train steps on `data` under torch.profiler (record_shapes) and return its events.
    read_now=False: none of them is a logged step (the loop's read-back is not part of a step)."""
    from torch.profiler import ProfilerActivity, profile

    from lift_fast.train.loop import _train_step

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            _train_step(cfg, ctx, parts, progress, data, [], {"normalized": True}, Path(run_dir), read_now=read_now)
    return list(prof.events())
