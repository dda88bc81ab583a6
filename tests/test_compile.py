"""A compiled step without graph breaks: the model forward plus the loss under torch.compile
(fullgraph), and the flash-attn kernels behind torch.library custom ops (registration, fake,
autograd) so that they trace too. flash-attn is not installed here: attention.REFERENCE_KERNEL, the
flash contract (out and the softmax's lse from the forward, a backward from them) in plain torch, is
put where the op finds the chosen kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lift_fast.config import load_config
from lift_fast.kernels import ClipLoss, SigLipLoss
from lift_fast.models import attention
from lift_fast.models.vit import build_model

DIM = 16


def reference_attention(qkv: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
    return (weights @ v).transpose(1, 2)


@pytest.fixture
def flash(monkeypatch):
    """model.attention=flash with the reference kernel as the chosen one (as resolve_backend leaves it on a GPU)."""
    attention._resolve_backend.cache_clear()
    monkeypatch.setattr(attention, "flash_kernels", lambda: ({"flash-attn-2": attention.REFERENCE_KERNEL}, ""))
    monkeypatch.setattr(attention, "_flash_kernel_for", lambda device, dtype: ("flash-attn-2", ""))
    monkeypatch.setitem(attention._CHOSEN_KERNELS, "flash-attn-2", attention.REFERENCE_KERNEL)
    yield "flash-attn-2"
    attention._resolve_backend.cache_clear()


def qkv_input(dtype=torch.float64, seed=0) -> torch.Tensor:
    # odd sizes: 7 tokens, 3 heads of 5
    return torch.randn(2, 7, 3, 3, 5, dtype=dtype, generator=torch.Generator().manual_seed(seed), requires_grad=True)


def test_flash_op_is_registered_with_a_fake_and_autograd(flash):
    assert torch.ops.lift_fast.flash_attention.default is not None
    assert torch.ops.lift_fast.flash_attention_backward.default is not None
    # schema, fake tensor, autograd registration and AOT dispatch, as torch.library checks them
    torch.library.opcheck(attention.flash_attention, (qkv_input(torch.float32), flash))
    with torch._subclasses.FakeTensorMode():
        fake = torch.empty(4, 9, 3, 2, 8, dtype=torch.bfloat16)
        out, lse = attention.flash_attention(fake, flash)
    assert out.shape == (4, 9, 2, 8) and out.dtype == torch.bfloat16
    assert lse.shape == (4, 2, 9) and lse.dtype == torch.float32


def test_flash_op_forward_and_gradient_match_float64_reference(flash):
    qkv = qkv_input()
    out = attention.run_flash(flash, qkv)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    expected = reference_attention(qkv)
    (expected_grad,) = torch.autograd.grad(expected, qkv, grad_out)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert torch.autograd.gradcheck(lambda x: attention.run_flash(flash, x), (qkv_input(seed=2),))


def test_the_op_is_what_a_compiled_model_calls(flash):
    """Under torch.compile the graph holds the custom op, not the kernel's Python (which, for the real
    flash-attn, would not trace)."""
    cfg = load_config(overrides=["model.attention=flash", "model.depth=1", "model.head_hidden=8"])
    model = build_model(cfg.model, 32, DIM)
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(model, backend=record, fullgraph=True)
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(compiled(images), model(images))
    targets = {str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}
    assert "lift_fast.flash_attention.default" in targets


def _model_and_loss(loss_name: str, attention_backend: str, patch_dropout: float = 0.25):
    cfg = load_config(overrides=[f"model.attention={attention_backend}", "model.depth=1", "model.head_hidden=8",
                                 f"model.patch_dropout={patch_dropout}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 32, DIM).train()
    loss_fn = SigLipLoss() if loss_name == "siglip" else ClipLoss()
    bias = torch.tensor(-10.0, requires_grad=True) if loss_name == "siglip" else None

    def forward_and_loss(images, texts):
        args = (model.logit_scale.exp(),) + ((bias,) if bias is not None else ())
        return loss_fn(model(images), texts, *args)

    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = F.normalize(torch.randn(6, DIM, generator=torch.Generator().manual_seed(2)), dim=-1)
    return model, forward_and_loss, (images, texts)


@pytest.mark.parametrize("attention_backend", ["sdpa", "flash"])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_model_forward_and_loss_trace_without_graph_breaks(request, loss_name, attention_backend):
    if attention_backend == "flash":
        request.getfixturevalue("flash")
    _, forward_and_loss, inputs = _model_and_loss(loss_name, attention_backend)
    # One eager call first: LIFT_FAST_KERNELS=auto logs its choice on the first loss call of a
    # process, and a logging call breaks a graph (kernels/lift_fast_kernels/reference.py loss_implementation).
    forward_and_loss(*inputs)
    explained = torch._dynamo.explain(forward_and_loss)(*inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow
def test_model_forward_and_loss_compile_with_inductor_on_cpu(flash):
    """fullgraph=True with inductor (C++ on the CPU; about 3 minutes on 2 shared cores, so CLIP only:
    SigLIP traces the same way above): the compiled loss and gradients are the eager ones. No patch
    dropout here: inductor draws its random numbers its own way, so the masks would differ."""
    model, forward_and_loss, inputs = _model_and_loss("clip", "flash", patch_dropout=0.0)
    eager = forward_and_loss(*inputs)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(forward_and_loss, fullgraph=True)  # inductor
    value = compiled(*inputs)
    grads = torch.autograd.grad(value, list(model.parameters()))
    torch.testing.assert_close(value, eager, rtol=1e-4, atol=1e-5)
    for grad, expected in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-5)
