"""The chunked CLIP loss on the GPU: forward + backward in bf16 against the naive torch loss and Inf-CL,
as TFLOP/s, a fraction of the dense bf16 matmul rate, and peak memory.

First, before any timing, `loss_dtypes_syncs` checks the losses' contract on the device: every
public loss (fp32 features under CUDA autocast(bf16), and bf16 features) runs each GEMM of its
forward and backward in bf16 (torch's profiler sees inside the custom ops) and issues no
aten::_local_scalar_dense (host sync); a violation fails the check, naming the loss and the GEMM.

Sizes: B in {4k, 16k, 32k, 64k} x D in {768, 4096}. The target point, B=32k D=4096 (at least 0.6 of
the matmul rate, memory within 1.2x of inputs + grads), is a check of its own that runs right after a
short fp32 correctness guard; the other seven sizes follow in one sweep that stops when the budget
runs low. At each size:

  lift_fast frozen text  `clip_loss` with text.requires_grad False     counted as 6 B^2 D flops
  lift_fast text grads   `clip_loss` with gradients for both sides     counted as 8 B^2 D
  naive torch            open_clip's loss: [B, B] logits in the features' dtype, F.cross_entropy
                         over rows and columns; text grads; B <= 32k only; "OOM" where it does not fit
  Inf-CL                 (cal_inf_loss(image, text) + cal_inf_loss(text, image)) / 2, as Inf-CLIP
                         trains; text grads; only where `import inf_cl` works (its kernels need CUDA)

Every side with text grads is counted as 8 B^2 D (the loss's work with one recompute of the
similarities; lift_fast's column pass for the text gradient recomputes them once more, 10 B^2 D)
whatever it really computes, so their TFLOP/s compare as speeds.

`loss_slab_sizing` (below) times the byte-budget slabs against e4d546b's D/8-row slabs, and
siglip-kernel and memeff where they import, at B in {16k, 32k, 64k} x D in {512, 768, 4096}, bf16.

Timing: 1 warm-up call, then the best of 3 calls timed with CUDA events. Memory: one more call after
torch.cuda.reset_peak_memory_stats; `peak` is max_memory_allocated over what was allocated before the
call (the inputs), and the memory row's value is the loss's footprint, inputs + peak, over
inputs + grads: 1.0 is the floor. A side that fails to run gets a row with value nan and the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import Context, Row, best_seconds, gpu_check

# Not yet sized from a GPU run: from the FLOP counts at ~350 TFLOP/s (5 calls per side, 64k x 4096
# with text grads is 140 TFLOP a call), plus Triton compilation and an allowance for Inf-CL's fp32 kernels.
GUARD_EST_S, TARGET_EST_S, SWEEP_EST_S = 10, 30, 70

TARGET_SIZE = (32768, 4096)  # the target point
SWEEP_SIZES = ((16384, 4096), (65536, 4096), (4096, 4096),
               (32768, 768), (16384, 768), (65536, 768), (4096, 768))
QUICK_TARGET_SIZE = (256, 64)  # --quick: fp32 on any device, a couple of seconds in all
QUICK_SWEEP_SIZES = ((128, 32),)
GUARD_SIZE = (4096, 768)  # the sweep's smallest size, in fp32

GUARD_TOLERANCE = 1e-4  # relative; plain fp32 both sides (no TF32), so they agree to ~1e-6
LOSS_AGREEMENT = 1e-2  # bf16 sides against lift_fast's loss (naive rounds its logits to bf16)
NAIVE_MAX_BATCH = 32768  # above: 8+ GiB logit matrices and budget spent on a known answer
MATMUL_FRACTION_TARGET = 0.6
MEMORY_RATIO_TARGET = 1.2
SIZE_RESERVE_S = 10.0  # the sweep starts a size only with this much budget left (64k x 4096: ~5 s)
LOGIT_SCALE = 1 / 0.07  # open_clip's initial exp(logit_scale)
WARMUP, REPEATS = 1, 3
GIB = 2**30
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def naive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                    logit_scale: torch.Tensor) -> torch.Tensor:
    """open_clip's ClipLoss at world size 1: [B, B] logits in the features' dtype (bf16 under
    autocast), cross-entropy over the rows and over the columns. Features [B, D]; 0-d scale."""
    logits = logit_scale * image_features @ text_features.T  # [B, B]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def inf_cl_loss() -> tuple[LossFn | None, str]:
    """Inf-CL's symmetric loss, or None and why it is not available."""
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        return None, "not installed (pip install inf_cl)"
    except Exception as error:  # a broken install (e.g. a Triton it was not built for) must not fail the check
        return None, f"import inf_cl failed: {type(error).__name__}: {error}"[:200]

    def loss(image_features, text_features, logit_scale):
        return (cal_inf_loss(image_features, text_features, scale=logit_scale)
                + cal_inf_loss(text_features, image_features, scale=logit_scale)) / 2

    return loss, "cal_inf_loss both ways"


def make_features(ctx: Context, batch: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Unit image and text features [B, D] (leaves, requires_grad) whose pairs have cosine ~0.7,
    so the loss is far from log(B), and the logit scale (0-d float32, requires_grad)."""
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, device=ctx.device, generator=generator), dim=1)
    noise = torch.randn(batch, dim, device=ctx.device, generator=generator) / math.sqrt(dim)
    text = F.normalize(image + noise, dim=1)
    scale = torch.tensor(LOGIT_SCALE, device=ctx.device, requires_grad=True)
    return image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_(), scale


@dataclass(frozen=True)
class Measured:
    seconds: float  # best of REPEATS forward + backward calls
    peak_bytes: float  # max allocated during one call over what was allocated before it; nan off CUDA
    held_bytes: float  # allocated before that call (the inputs); nan off CUDA
    loss: float


def measure(ctx: Context, loss_fn: LossFn, image: torch.Tensor, text: torch.Tensor,
            scale: torch.Tensor) -> Measured:
    """Time forward + backward of `loss_fn(image, text, scale)` (gradients of the inputs that require
    them, not accumulated into .grad), then measure one call's peak memory."""
    wrt = [tensor for tensor in (image, text, scale) if tensor.requires_grad]

    def step() -> torch.Tensor:
        loss = loss_fn(image, text, scale)
        torch.autograd.grad(loss, wrt)
        return loss.detach()

    seconds = best_seconds(ctx, step, warmup=WARMUP, repeats=REPEATS)
    if ctx.device.type != "cuda":
        return Measured(seconds, math.nan, math.nan, float(step()))
    ctx.synchronize()
    held = torch.cuda.memory_allocated(ctx.device)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    loss = step()
    ctx.synchronize()
    return Measured(seconds, torch.cuda.max_memory_allocated(ctx.device) - held, held, float(loss))


def release(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()


def relative_diff(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    return float(torch.linalg.vector_norm(value - reference) / torch.linalg.vector_norm(reference))


def target_note(value: float, target: float, at_most: bool) -> str:
    met = value <= target if at_most else value >= target
    return f"; target {'<=' if at_most else '>='} {target:g}: {'met' if met else 'NOT MET'}"


def side_rows(name: str, measured: Measured, flops: float, flops_rule: str, input_bytes: int,
              grad_bytes: int, matmul: tuple[float, str] | None, targets: bool, note: str = "") -> list[Row]:
    """TFLOP/s, (for lift_fast) the fraction of the matmul rate, and the memory ratio of one side."""
    tflops = flops / measured.seconds / 1e12
    rows = [Row(name, tflops, "TFLOP/s", f"{flops_rule} = {flops:.3g} flop; {measured.seconds * 1e3:.2f} ms, "
                f"best of {REPEATS} after {WARMUP} warm-up; loss {measured.loss:.4f}{note}")]
    if matmul is not None:
        fraction = tflops / matmul[0]
        rows.append(Row(f"{name} / matmul_bf16", fraction, "x", f"of {matmul[0]:.4g} TFLOP/s ({matmul[1]})"
                        + (target_note(fraction, MATMUL_FRACTION_TARGET, at_most=False) if targets else "")))
    footprint = (input_bytes + measured.peak_bytes) / (input_bytes + grad_bytes)
    if math.isnan(footprint):
        memory_note = "CUDA only: no allocator statistics off CUDA"
    else:
        memory_note = (f"peak {measured.peak_bytes / GIB:.3f} GiB over the {measured.held_bytes / GIB:.3f} GiB "
                       f"held before; inputs + grads {(input_bytes + grad_bytes) / GIB:.3f} GiB"
                       + (target_note(footprint, MEMORY_RATIO_TARGET, at_most=True) if targets else ""))
    rows.append(Row(f"{name} memory", footprint, "x inputs+grads", memory_note))
    return rows


def failed_row(name: str, error: Exception) -> Row:
    reason = "OOM" if isinstance(error, torch.cuda.OutOfMemoryError) else "failed"
    return Row(name, math.nan, "TFLOP/s", f"{reason}: {type(error).__name__}: {error}".splitlines()[0][:200])


def measure_size(ctx: Context, batch: int, dim: int, matmul: tuple[float, str], inf_cl: LossFn | None,
                 targets: bool = False) -> list[Row]:
    """All sides at one size; see the module docstring. `targets` adds the issue's targets to the notes."""
    from lift_fast.kernels import clip_loss

    dtype = torch.float32 if ctx.quick else torch.bfloat16
    size = f"B={batch} D={dim} {DTYPE_NAMES[dtype]} {ctx.device.type}"
    image, text, scale = make_features(ctx, batch, dim, dtype)
    feature_bytes = image.numel() * image.element_size()
    cube = batch * batch * dim
    rows: list[Row] = []
    sides = [("lift_fast frozen text", clip_loss, text.detach(), 6, feature_bytes),
             ("lift_fast text grads", clip_loss, text, 8, 2 * feature_bytes)]
    if batch <= NAIVE_MAX_BATCH:
        sides.append(("naive torch", naive_clip_loss, text, 8, 2 * feature_bytes))
    if inf_cl is not None and ctx.device.type == "cuda":
        sides.append(("Inf-CL", inf_cl, text, 8, 2 * feature_bytes))
    reference: Measured | None = None  # lift_fast with text grads, what the baselines are compared with
    for side, loss_fn, side_text, flops_per_cube, grad_bytes in sides:
        name = f"{side} {size}"
        lift_fast = side.startswith("lift_fast")
        # lift_fast must not fail but for memory; a baseline may fail any way, and is reported as failed
        expected = torch.cuda.OutOfMemoryError if lift_fast else Exception
        try:
            measured = measure(ctx, loss_fn, image, side_text, scale)
        except expected as error:
            measured, failure = None, failed_row(name, error)
        if measured is None:  # released here, once the traceback no longer holds the failed call's tensors
            rows.append(failure)
            release(ctx)
            continue
        note = ""
        if not lift_fast and reference is not None:
            agreement = abs(measured.loss - reference.loss) / abs(reference.loss)
            note = f"; rel diff vs lift_fast {agreement:.1e}" + (" MISMATCH" if not agreement <= LOSS_AGREEMENT else "")
        rows += side_rows(name, measured, flops_per_cube * cube, f"{flops_per_cube}*B^2*D", 2 * feature_bytes,
                          grad_bytes, matmul if lift_fast else None, targets, note)
        if side == "lift_fast text grads":
            reference = measured
        elif not lift_fast and reference is not None:
            memory = (f"; peak memory {measured.peak_bytes / reference.peak_bytes:.2f}x lift_fast's"
                      if ctx.device.type == "cuda" else "")
            rows.append(Row(f"lift_fast speedup over {side} {size}", measured.seconds / reference.seconds, "x",
                            f"time ratio, both with text grads{memory}"))
        release(ctx)
    return rows


def matmul_ceiling(ctx: Context) -> tuple[float, str]:
    """The dense bf16 matmul rate in TFLOP/s and where it comes from: matmul_bf16's row if that check
    ran earlier in this run, else measured here the same way."""
    earlier = ctx.earlier_value("matmul_bf16", "TFLOP/s")
    if earlier is not None:
        return earlier, "matmul_bf16 in this run"
    from .ceilings import matmul_bf16

    (row,) = matmul_bf16(ctx)
    return row.value, "matmul_bf16 measured inside this check"


def inf_cl_rows(ctx: Context, inf_cl: LossFn | None, why: str) -> list[Row]:
    """One row saying why Inf-CL was not measured, when it was not."""
    if inf_cl is None:
        return [Row("Inf-CL cal_inf_loss", math.nan, "TFLOP/s", why)]
    if ctx.device.type != "cuda":
        return [Row("Inf-CL cal_inf_loss", math.nan, "TFLOP/s", "not run: its Triton kernels need CUDA")]
    return []


# ------------------------------------------------------------- the dtype and host-sync contract

CONTRACT_EST_S = 20  # 5 losses x 2 settings x forward + backward at B=4096, D=768, and Triton compiles
CONTRACT_SIZE, QUICK_CONTRACT_SIZE = (4096, 768), (64, 32)
GEMM_OPERANDS = {"aten::mm": (0, 1), "aten::matmul": (0, 1), "aten::bmm": (0, 1), "aten::addmm": (1, 2)}
HOST_SYNC = "aten::_local_scalar_dense"  # what float(tensor), .item() and .tolist() dispatch to
BF16_NAME = "c10::BFloat16"  # how torch's profiler names bf16 in input_dtypes


def gemm_operand_dtypes(prof) -> list[tuple[str, str, str]]:
    """(op, left dtype, right dtype) of every mm/addmm/matmul/bmm a torch.profiler run recorded
    (record_shapes=True); it sees inside the losses' custom ops."""
    return [(event.name, *(event.input_dtypes[i] for i in GEMM_OPERANDS[event.name]))
            for event in prof.events() if event.name in GEMM_OPERANDS]


def host_syncs(prof) -> int:
    """How many device-to-host scalar reads a torch.profiler run recorded."""
    return sum(event.name == HOST_SYNC for event in prof.events())


def contract_losses() -> dict[str, Callable]:
    """name -> fn(image [B, D], text [B, D], scale, bias, hidden [B, D], weight [D, D]) per public loss."""
    from lift_fast.kernels import ClipLoss, SigLipLoss, clip_loss, fused_projection_clip_loss, siglip_loss

    return {
        "clip_loss": lambda i, t, s, b, h, w: clip_loss(i, t, s),
        "ClipLoss": lambda i, t, s, b, h, w: ClipLoss()(i, t, s),
        "siglip_loss": lambda i, t, s, b, h, w: siglip_loss(i, t, s, b),
        "SigLipLoss": lambda i, t, s, b, h, w: SigLipLoss()(i, t, s, b),
        "fused_projection_clip_loss": lambda i, t, s, b, h, w: fused_projection_clip_loss(h, w, None, t, s),
        "fused_projection siglip": lambda i, t, s, b, h, w: fused_projection_clip_loss(h, w, None, t, s, b,
                                                                                     loss="siglip"),
    }


@gpu_check("loss_dtypes_syncs", est_seconds=CONTRACT_EST_S, proof=True)
def loss_dtypes_syncs(ctx: Context) -> list[Row]:
    """Before the timings (registered first of this module): every public loss, fp32 features under
    bf16 autocast and bf16 features without, runs every GEMM of forward and backward in bf16 and
    reads nothing back to the host.

    Raises:
        AssertionError: a GEMM in another dtype or an aten::_local_scalar_dense, each one named.
    """
    from torch.profiler import ProfilerActivity, profile

    batch, dim = QUICK_CONTRACT_SIZE if ctx.quick else CONTRACT_SIZE
    image, text, scale = make_features(ctx, batch, dim, torch.float32)
    bias = torch.tensor(-10.0, device=ctx.device, requires_grad=True)
    hidden = torch.randn(batch, dim, device=ctx.device, requires_grad=True)
    weight = (torch.randn(dim, dim, device=ctx.device) / math.sqrt(dim)).requires_grad_()
    settings = {"fp32 under autocast(bf16)": (torch.float32, True), "bf16": (torch.bfloat16, False)}
    problems, gemms = [], 0
    for setting, (dtype, autocast) in settings.items():
        inputs = [tensor.detach().to(dtype).requires_grad_() if tensor.dim() else tensor
                  for tensor in (image, text, scale, bias, hidden, weight)]
        for name, loss_fn in contract_losses().items():
            loss_fn(*inputs).backward()  # warm-up: Triton compiles outside the profiled calls
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as forward:
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = loss_fn(*inputs)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as backward:
                loss.backward()
            for phase, prof in (("forward", forward), ("backward", backward)):
                found = gemm_operand_dtypes(prof)
                gemms += len(found)
                wrong = sorted({gemm for gemm in found if gemm[1:] != (BF16_NAME, BF16_NAME)})
                if not found:
                    problems.append(f"{name} {setting} {phase}: no GEMM recorded")
                if wrong:
                    problems.append(f"{name} {setting} {phase}: GEMMs not in bf16: {wrong}")
                if host_syncs(prof):
                    problems.append(f"{name} {setting} {phase}: {host_syncs(prof)} x {HOST_SYNC}")
    if problems:
        raise AssertionError(f"loss contract broken on {ctx.device.type}: " + "; ".join(problems))
    cases = len(settings) * len(contract_losses())
    return [Row(f"loss GEMM dtypes and host syncs B={batch} D={dim} {ctx.device.type}", cases, "losses ok",
                f"{gemms} GEMMs of forward and backward all bf16; 0 {HOST_SYNC}; "
                f"{', '.join(contract_losses())} x {', '.join(settings)}")]


@gpu_check("clip_loss_guard_fp32", est_seconds=GUARD_EST_S)
def clip_loss_guard_fp32(ctx: Context) -> list[Row]:
    """lift_fast's loss and gradients against the naive loss's, fp32, at the sweep's smallest size.

    Raises:
        AssertionError: a relative difference (loss, d image, d text, d logit_scale) above 1e-4, so that
            a fast wrong answer fails the run instead of topping the table.
    """
    from lift_fast.kernels import clip_loss

    batch, dim = QUICK_TARGET_SIZE if ctx.quick else GUARD_SIZE
    image, text, scale = make_features(ctx, batch, dim, torch.float32)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 in either side would be the difference measured
    try:
        answers = {}
        for side, loss_fn in (("lift_fast", clip_loss), ("naive", naive_clip_loss)):
            loss = loss_fn(image, text, scale)
            answers[side] = (loss.detach(), *torch.autograd.grad(loss, (image, text, scale)))
    finally:
        torch.set_float32_matmul_precision(precision)
    diffs = {part: relative_diff(value, reference) for part, value, reference
             in zip(("loss", "d image", "d text", "d logit_scale"), answers["lift_fast"], answers["naive"])}
    worst = max(diffs.values(), key=lambda diff: math.inf if math.isnan(diff) else diff)
    detail = ", ".join(f"{part} {diff:.1e}" for part, diff in diffs.items())
    if not worst <= GUARD_TOLERANCE:
        raise AssertionError(f"lift_fast clip_loss differs from the naive loss at B={batch} D={dim} fp32 "
                             f"{ctx.device.type}: {detail} (relative, tolerance {GUARD_TOLERANCE:g})")
    return [Row(f"lift_fast vs naive torch B={batch} D={dim} fp32 {ctx.device.type}", worst, "rel diff",
                f"largest of {detail}; tolerance {GUARD_TOLERANCE:g}; loss {float(answers['naive'][0]):.4f}")]


@gpu_check("clip_loss_b32k_d4096", est_seconds=TARGET_EST_S)
def clip_loss_b32k_d4096(ctx: Context) -> list[Row]:
    """The issue's target point: every side at B=32k D=4096 bf16, with the targets in the notes."""
    batch, dim = QUICK_TARGET_SIZE if ctx.quick else TARGET_SIZE
    inf_cl, why = inf_cl_loss()
    rows = measure_size(ctx, batch, dim, matmul_ceiling(ctx), inf_cl, targets=True)
    return rows + inf_cl_rows(ctx, inf_cl, why)


@gpu_check("clip_loss_sweep", est_seconds=SWEEP_EST_S)
def clip_loss_sweep(ctx: Context) -> list[Row]:
    """Every side at the other seven sizes, most telling first; stops when the budget runs low."""
    sizes = QUICK_SWEEP_SIZES if ctx.quick else SWEEP_SIZES
    reserve = 0.0 if ctx.quick else SIZE_RESERVE_S
    matmul = matmul_ceiling(ctx)
    inf_cl, why = inf_cl_loss()
    rows: list[Row] = []
    for index, (batch, dim) in enumerate(sizes):
        if ctx.seconds_left() < reserve:
            left = sizes[index:]
            rows.append(Row("clip_loss sizes not run", len(left), "sizes",
                            ", ".join(f"B={b} D={d}" for b, d in left)
                            + f": {ctx.seconds_left():.0f} s of the budget left"))
            break
        rows += measure_size(ctx, batch, dim, matmul, inf_cl)
    return rows + inf_cl_rows(ctx, inf_cl, why)


# ------------------------------------------------------------- slab sizing: e4d546b's rule against the budget

SLAB_EST_S = 150  # 9 sizes x (2 losses x 2 sizings + 2 peers) x 5 calls; 64k x 4096 is ~100 TFLOP a call
SLAB_SIZES = tuple((batch, dim) for batch in (32768, 16384, 65536) for dim in (512, 768, 4096))
QUICK_SLAB_SIZES = ((128, 32),)


def old_slab_bytes(batch: int, dim: int) -> int:
    """The budget that gives e4d546b's slabs: max(2^20, N·D/8) similarities (D/8 rows once N·D >= 8M)."""
    from lift_fast.kernels.chunking import BYTES_PER_SIMILARITY

    return max(2**20, batch * dim // 8) * BYTES_PER_SIMILARITY


def peer_losses() -> dict[str, tuple[Callable | None, str]]:
    """name -> (fn(image, text, scale, bias) with text grads, or None, and why) for the peers that are
    importable: siglip-kernel's fused_siglip_loss (SigLIP; it takes the log of the scale) and memeff
    (CLIP: its clip_loss(image, text, scale), if it has one)."""
    peers: dict[str, tuple[Callable | None, str]] = {}
    try:
        from siglip_kernel import fused_siglip_loss

        peers["siglip-kernel"] = (lambda i, t, s, b: fused_siglip_loss(i, t, torch.log(s), b),
                                  "fused_siglip_loss(image, text, log scale, bias)")
    except Exception as error:  # not installed, or built for another triton: a row, not a failure
        peers["siglip-kernel"] = (None, f"import siglip_kernel failed: {type(error).__name__}: {error}"[:200])
    try:
        import memeff

        clip = getattr(memeff, "clip_loss", None)
        peers["memeff"] = ((lambda i, t, s, b: clip(i, t, s), "memeff.clip_loss(image, text, scale)") if clip
                           else (None, "memeff has no clip_loss: its API is not wired here"))
    except Exception as error:
        peers["memeff"] = (None, f"import memeff failed: {type(error).__name__}: {error}"[:200])
    return peers


@gpu_check("loss_slab_sizing", est_seconds=SLAB_EST_S)
def loss_slab_sizing(ctx: Context) -> list[Row]:
    """clip_loss and siglip_loss with text grads, bf16, under the byte budget (default slab_bytes) and
    under e4d546b's D/8-row slabs (`old_slab_bytes`), B in {16k, 32k, 64k} x D in {512, 768, 4096},
    beside siglip-kernel and memeff where they import; TFLOP/s as 8 B^2 D a call for every side (so the
    rates compare as speeds), the fraction of the matmul rate, memory over inputs + grads, and the new
    sizing's speedup over the old. Stops when the budget runs low."""
    from lift_fast.kernels import clip_loss, siglip_loss

    sizes = QUICK_SLAB_SIZES if ctx.quick else SLAB_SIZES
    dtype = torch.float32 if ctx.quick else torch.bfloat16
    matmul = matmul_ceiling(ctx)
    peers = peer_losses()
    rows: list[Row] = [Row(f"{name} (peer)", math.nan, "TFLOP/s", why) for name, (fn, why) in peers.items() if fn is None]
    for index, (batch, dim) in enumerate(sizes):
        if ctx.seconds_left() < (0.0 if ctx.quick else SIZE_RESERVE_S):
            rows.append(Row("loss_slab_sizing sizes not run", len(sizes) - index, "sizes",
                            ", ".join(f"B={b} D={d}" for b, d in sizes[index:])))
            break
        size = f"B={batch} D={dim} {DTYPE_NAMES[dtype]} {ctx.device.type}"
        image, text, scale = make_features(ctx, batch, dim, dtype)
        bias = torch.tensor(-10.0, device=ctx.device, requires_grad=True)
        feature_bytes = image.numel() * image.element_size()
        flops = 8 * batch * batch * dim
        losses = {"clip": lambda i, t, s, b, **kw: clip_loss(i, t, s, **kw),
                  "siglip": lambda i, t, s, b, **kw: siglip_loss(i, t, s, b, **kw)}
        for loss_name, loss_fn in losses.items():
            timed = {}
            for sizing, budget in (("budget", None), ("old D/8", old_slab_bytes(batch, dim))):
                name = f"lift_fast {loss_name} {sizing} slabs {size}"
                try:
                    timed[sizing] = measure(ctx, lambda i, t, s: loss_fn(i, t, s, bias, slab_bytes=budget),
                                            image, text, scale)
                except torch.cuda.OutOfMemoryError as error:
                    rows.append(failed_row(name, error))
                    release(ctx)
                    continue
                rows += side_rows(name, timed[sizing], flops, "8*B^2*D", 2 * feature_bytes, 2 * feature_bytes,
                                  matmul, targets=False)
                release(ctx)
            if len(timed) == 2:
                rows.append(Row(f"lift_fast {loss_name} budget over old slabs {size}",
                                timed["old D/8"].seconds / timed["budget"].seconds, "x", "time ratio, text grads"))
        for peer, (peer_fn, why) in peers.items():
            if peer_fn is None or ctx.device.type != "cuda":
                continue
            name = f"{peer} {size}"
            try:
                measured = measure(ctx, lambda i, t, s: peer_fn(i, t, s, bias), image, text, scale)
            except Exception as error:  # a peer may fail any way: a row with the reason
                rows.append(failed_row(name, error))
            else:
                rows += side_rows(name, measured, flops, "8*B^2*D", 2 * feature_bytes, 2 * feature_bytes, matmul,
                                  targets=False, note=f"; {why}")
            release(ctx)
    return rows
