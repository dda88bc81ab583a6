"""One GEMM dtype per loss call, forward and backward, whatever autocast does (docs/loss.md).

torch's profiler (record_shapes=True) sees inside the custom ops, so the input dtypes of every
aten::mm / addmm / matmul / bmm of forward and of backward are checked for each public loss: fp32
features under an outer autocast(bf16), and bf16 features without one, run their GEMMs in bf16;
fp32 features without autocast run them in fp32. The dtypes are device-independent; on CUDA
bench/gpu_checks/loss.py checks the same with CUDA autocast.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from lift_fast.kernels.reference import gemm_dtype
from torch.profiler import ProfilerActivity, profile

from lift_fast.kernels import ClipLoss, SigLipLoss, clip_loss, fused_projection_clip_loss, siglip_loss

GEMMS = {"aten::mm": (0, 1), "aten::matmul": (0, 1), "aten::bmm": (0, 1), "aten::addmm": (1, 2)}
PROFILER_NAMES = {torch.bfloat16: "c10::BFloat16", torch.float32: "float", torch.float16: "c10::Half"}
BATCH, DIM, HIDDEN = 9, 24, 40


def gemm_input_dtypes(prof) -> list[tuple[str, ...]]:
    """(name, left dtype, right dtype) of every GEMM the profiler recorded."""
    found = []
    for event in prof.events():
        operands = GEMMS.get(event.name)
        if operands is not None:
            found.append((event.name, *(event.input_dtypes[i] for i in operands)))
    return found


def public_losses():
    """name -> fn(image [B, D] or hidden [B, H], text [B, D], scale, bias, weight) for every public loss."""
    return {
        "clip_loss": lambda x, t, s, b, w: clip_loss(x, t, s),
        "siglip_loss": lambda x, t, s, b, w: siglip_loss(x, t, s, b),
        "ClipLoss": lambda x, t, s, b, w: ClipLoss()(x, t, s),
        "SigLipLoss": lambda x, t, s, b, w: SigLipLoss()(x, t, s, b),
        "fused clip": lambda x, t, s, b, w: fused_projection_clip_loss(x, w, None, t, s),
        "fused siglip": lambda x, t, s, b, w: fused_projection_clip_loss(x, w, None, t, s, b, loss="siglip"),
    }


def leaves(name, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = HIDDEN if name.startswith("fused") else DIM
    first = torch.randn(BATCH, width, generator=generator)
    if not name.startswith("fused"):
        first = F.normalize(first, dim=1)
    text = F.normalize(torch.randn(BATCH, DIM, generator=generator), dim=1)
    weight = torch.randn(DIM, HIDDEN, generator=generator) / HIDDEN**0.5
    tensors = [first.to(dtype), text.to(dtype), torch.tensor(10.0), torch.tensor(-2.0), weight.to(dtype)]
    return [t.requires_grad_() for t in tensors]


def profiled_gemms(name, dtype, autocast):
    """GEMM (name, dtypes) of the forward and of the backward of one public loss."""
    tensors = leaves(name, dtype)
    outer = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as forward:
        with outer:
            loss = public_losses()[name](*tensors)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as backward:
        loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in tensors[:3])
    return gemm_input_dtypes(forward), gemm_input_dtypes(backward)


@pytest.mark.parametrize("name", list(public_losses()))
@pytest.mark.parametrize("features,autocast,expected", [
    (torch.float32, True, torch.bfloat16),  # an outer autocast decides the GEMM dtype
    (torch.bfloat16, False, torch.bfloat16),
    (torch.float32, False, torch.float32),
], ids=["fp32-under-autocast-bf16", "bf16", "fp32"])
def test_every_gemm_of_forward_and_backward_runs_in_one_dtype(monkeypatch, name, features, autocast, expected):
    monkeypatch.setenv("LIFT_FAST_KERNELS", "torch")
    forward, backward = profiled_gemms(name, features, autocast)
    assert forward and backward, "no GEMM recorded: the profiler did not see inside the loss"
    want = PROFILER_NAMES[expected]
    for phase, gemms in (("forward", forward), ("backward", backward)):
        wrong = [gemm for gemm in gemms if gemm[1:] != (want, want)]
        assert not wrong, f"{name} {phase}: GEMMs not in {want}: {wrong}"


def test_gemm_dtype_rule():
    fp32, bf16, f64 = (torch.zeros(2, 2, dtype=d) for d in (torch.float32, torch.bfloat16, torch.float64))
    assert gemm_dtype(fp32, bf16) == torch.float32  # promotion without autocast
    assert gemm_dtype(bf16, bf16) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm_dtype(fp32, fp32) == torch.bfloat16
        assert gemm_dtype(f64, f64) == torch.float64  # autocast leaves float64 alone
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert gemm_dtype(fp32, fp32) == torch.float32


def test_autocast_loss_equals_loss_of_bf16_features():
    """Under autocast the loss is the loss of the features cast to bf16, gradients included."""
    image, text, scale, _, _ = leaves("clip_loss", torch.float32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = clip_loss(image, text, scale)
    under.backward()
    cast = [t.detach().to(torch.bfloat16).requires_grad_() for t in (image, text)]
    plain = clip_loss(*cast, scale.detach())
    plain.backward()
    torch.testing.assert_close(under, plain, rtol=0, atol=0)
    torch.testing.assert_close(image.grad, cast[0].grad.float(), rtol=0, atol=0)
