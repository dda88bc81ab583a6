"""Flash attention under torch.compile saves what its backward needs (out and the softmax's lse) and
never runs its forward again: counted in a compiled forward + backward of the image tower, with
flash-attn's own low-level signatures stood in for by torch's CPU flash kernel (tests/flash_stand_ins.py)
and by the plain-torch reference, and gradients compared with SDPA's (float64 and float32)."""

from __future__ import annotations

import sys
import types

import flash_stand_ins
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

from lift_fast.models import attention
from lift_fast.models.vit import VisionTransformer, ViTSpec

DEPTH = 2
IMAGE = 40  # 8 px patches: 25 tokens


@pytest.fixture(autouse=True)
def fresh_backend_choice():
    attention._resolve_backend.cache_clear()
    flash_stand_ins.CALLS.clear()
    yield
    attention._resolve_backend.cache_clear()
    torch._dynamo.reset()


def use_kernel(monkeypatch, kernel: attention.FlashKernel) -> None:
    """model.attention=flash runs `kernel`, as resolve_backend leaves it on a GPU."""
    monkeypatch.setattr(attention, "flash_kernels", lambda: ({"flash-attn-2": kernel}, ""))
    monkeypatch.setattr(attention, "_flash_kernel_for", lambda device, dtype: ("flash-attn-2", ""))
    monkeypatch.setitem(attention._CHOSEN_KERNELS, "flash-attn-2", kernel)


def counted(kernel: attention.FlashKernel) -> attention.FlashKernel:
    def forward(*args):
        flash_stand_ins.CALLS["forward"] += 1
        return kernel.forward(*args)

    def backward(*args):
        flash_stand_ins.CALLS["backward"] += 1
        return kernel.backward(*args)

    return attention.FlashKernel(forward, backward)


def tower(backend: str, width: int, heads: int, dtype) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTSpec(width=width, depth=DEPTH, heads=heads, patch_size=8), IMAGE,
                             attention=backend).to(dtype)


def loss_and_grads(model, images) -> tuple[torch.Tensor, list[torch.Tensor]]:
    weights = torch.randn(images.shape[0], model.width, generator=torch.Generator().manual_seed(3), dtype=images.dtype)
    loss = (model(images) * weights).sum()
    return loss.detach(), torch.autograd.grad(loss, [images, *model.parameters()])


def recording_backend(graphs: dict):
    """AOTAutograd with inductor's partitioner (min-cut rematerialisation: it recomputes what it deems
    cheap rather than saving it) and no code generation: the forward and backward graphs as run."""

    def compiler(kind):
        def compile_graph(graph_module, example_inputs):
            graphs[kind].append(graph_module)
            return make_boxed_func(graph_module.forward)

        return compile_graph

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                        partition_fn=min_cut_rematerialization_partition)


def op_calls(graph_modules, name: str) -> int:
    return sum(str(node.target) == name for graph in graph_modules for node in graph.graph.nodes
               if node.op == "call_function")


@pytest.mark.parametrize("kernel, width, heads, dtype, tolerance", [
    ("reference", 30, 3, torch.float64, dict(rtol=1e-9, atol=1e-10)),  # head dim 10: odd for a kernel
    ("flash-attn-2", 48, 3, torch.float32, dict(rtol=2e-4, atol=2e-5)),
    ("flash-attn-2", 30, 3, torch.float64, dict(rtol=1e-9, atol=1e-10)),  # head dim 10: padded to 16 for FA2
    ("flash-attn-4", 48, 3, torch.float32, dict(rtol=2e-4, atol=2e-5)),
])
def test_compiled_flash_runs_each_forward_once_and_matches_sdpa(monkeypatch, kernel, width, heads, dtype, tolerance):
    chosen = counted(attention.REFERENCE_KERNEL) if kernel == "reference" else flash_stand_ins.KERNELS[kernel]
    use_kernel(monkeypatch, chosen)
    images = torch.randn(3, 3, IMAGE, IMAGE, dtype=dtype, generator=torch.Generator().manual_seed(1),
                         requires_grad=True)
    expected_loss, expected_grads = loss_and_grads(tower("sdpa", width, heads, dtype), images)

    graphs = {"forward": [], "backward": []}
    model = tower("flash", width, heads, dtype)
    compiled = torch.compile(model, backend=recording_backend(graphs), fullgraph=True)
    loss, grads = loss_and_grads(compiled, images)

    # one attention forward per block, in the forward graph only; the backward reads its out and lse
    assert flash_stand_ins.CALLS == {"forward": DEPTH, "backward": DEPTH}
    assert op_calls(graphs["forward"], "lift_fast.flash_attention.default") == DEPTH
    assert op_calls(graphs["backward"], "lift_fast.flash_attention.default") == 0
    assert op_calls(graphs["backward"], "lift_fast.flash_attention_backward.default") == DEPTH
    torch.testing.assert_close(loss, expected_loss, **tolerance)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, **tolerance)


def test_eager_flash_runs_each_forward_once(monkeypatch):
    use_kernel(monkeypatch, flash_stand_ins.KERNELS["flash-attn-4"])
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    loss_and_grads(tower("flash", 48, 3, torch.float32), images.requires_grad_())
    assert flash_stand_ins.CALLS == {"forward": DEPTH, "backward": DEPTH}


def test_the_backward_reads_the_saved_lse(monkeypatch):
    """A wrong lse gives a wrong gradient: the backward takes the softmax from the saved lse, not from
    a forward run again (which would be right whatever the lse)."""
    shifted = attention.FlashKernel(lambda q, k, v: (lambda out, lse: (out, lse + 0.5))(*attention.REFERENCE_KERNEL
                                                                                        .forward(q, k, v)),
                                    attention.REFERENCE_KERNEL.backward)
    use_kernel(monkeypatch, shifted)
    qkv = torch.randn(2, 7, 3, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                      requires_grad=True)
    out = attention.run_flash("flash-attn-2", qkv)
    (grad,) = torch.autograd.grad(out.sum(), qkv)
    use_kernel(monkeypatch, attention.REFERENCE_KERNEL)
    (right,) = torch.autograd.grad(attention.run_flash("flash-attn-2", qkv).sum(), qkv)
    assert not torch.allclose(grad, right)


@pytest.mark.parametrize("version, usable", [("2.6.3", False), ("2.7.0", True), ("2.8.3", True)])
def test_flash_attn_2_by_version(monkeypatch, version, usable):
    """flash-attn 2.7 made the low-level functions torch ops taking window_size_left/right (their signature
    reads (*args, **kwargs)): the version decides, and an older one is named with what to install."""
    package, interface = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.flash_attn_interface")
    package.__version__ = version
    interface._flash_attn_forward, interface._flash_attn_backward = flash_stand_ins.fa2_forward, flash_stand_ins.fa2_backward
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", interface)
    kernels, missing = attention.flash_kernels.__wrapped__()
    assert ("flash-attn-2" in kernels) == usable
    assert "flash-attn-4 (flash_attn.cute)" in missing
    assert (f"flash-attn {version} is older than 2.7" in missing and "flash-attn>=2.7" in missing) == (not usable)
