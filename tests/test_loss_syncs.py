"""No host syncs in the losses, and a trace without graph breaks (docs/loss.md, "Device scalars").

A read of a device value on the host (float(tensor), .item(), .tolist(), a Python branch on a
tensor) is an `aten::_local_scalar_dense` in torch's profiler; on a GPU each one stalls the CPU
until the queue drains. The forward and backward of every public loss must issue none, on the
torch path and on the Triton path (the kernels run under the interpreter here, TRITON_INTERPRET=1 from
conftest.py; it hands numpy copies to the kernels and reads no scalar, so what is counted is the
losses' own code). The kernels take the scale, bias and grad_loss coefficients as pointers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from lift_fast.kernels import KERNELS_ENV_VAR, ClipLoss, SigLipLoss, clip_loss, fused_projection_clip_loss, siglip_loss, slab_ops

BATCH, DIM, HIDDEN = 7, 16, 24
SYNC = "aten::_local_scalar_dense"

LOSSES = {
    "clip_loss": lambda x, t, s, b, w: clip_loss(x, t, s, b),
    "siglip_loss": lambda x, t, s, b, w: siglip_loss(x, t, s, b),
    "ClipLoss": lambda x, t, s, b, w: ClipLoss()(x, t, s),
    "SigLipLoss": lambda x, t, s, b, w: SigLipLoss()(x, t, s, b),
    "fused clip": lambda x, t, s, b, w: fused_projection_clip_loss(x, w, None, t, s),
    "fused siglip": lambda x, t, s, b, w: fused_projection_clip_loss(x, w, None, t, s, b, loss="siglip"),
}


def inputs(name, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = HIDDEN if name.startswith("fused") else DIM
    first = torch.randn(BATCH, width, generator=generator)
    first = first if name.startswith("fused") else F.normalize(first, dim=1)
    text = F.normalize(torch.randn(BATCH, DIM, generator=generator), dim=1)
    weight = torch.randn(DIM, HIDDEN, generator=generator) / HIDDEN**0.5
    # the scale and bias as the parameters a model learns: device tensors, never read on the host
    log_scale, bias = torch.tensor(2.3, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    return first.requires_grad_(), text.requires_grad_(), log_scale, bias, weight.requires_grad_()


def count_syncs(name):
    first, text, log_scale, bias, weight = inputs(name)
    with profile(activities=[ProfilerActivity.CPU]) as forward:
        loss = LOSSES[name](first, text, log_scale.exp(), bias, weight)
    with profile(activities=[ProfilerActivity.CPU]) as backward:
        loss.backward()
    assert log_scale.grad is not None and first.grad is not None
    return tuple(sum(event.name == SYNC for event in prof.events()) for prof in (forward, backward))


def test_the_counter_sees_a_sync():
    """The check can fail: a float() of a tensor is counted."""
    scale = torch.tensor(3.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        float(scale * 2)
    assert sum(event.name == SYNC for event in prof.events()) == 1


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_no_host_sync_in_forward_or_backward(monkeypatch, name, kernels):
    monkeypatch.setenv(KERNELS_ENV_VAR, kernels)
    assert count_syncs(name) == (0, 0)


def test_kernel_scalars_are_pointers():
    """What reaches the kernels: the scale, the bias and the gradient weights as device pointers."""
    scalars = {"scale_ptr", "bias_ptr", "coef_ptr", "row_coef_ptr"}
    for launch in slab_ops.kernel_launches():
        signature = launch["signature"]
        assert not [arg for arg, kind in signature.items() if kind.startswith("fp")], launch["name"]
        assert scalars & set(signature), launch["name"]
        assert all(signature[arg].startswith("*") for arg in scalars & set(signature))


@pytest.mark.parametrize("name", list(LOSSES))
def test_public_losses_trace_without_graph_breaks(monkeypatch, name):
    monkeypatch.setenv(KERNELS_ENV_VAR, "torch")
    torch._dynamo.reset()
    first, text, log_scale, bias, weight = inputs(name)
    fn = LOSSES[name]
    explanation = torch._dynamo.explain(lambda *args: fn(*args))(first, text, log_scale.exp(), bias, weight)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
