"""model.grad_checkpointing=none|selective|full, on all or some blocks (model.grad_checkpointing_blocks,
_rest; models/vit.py), and the residual stream in the compute dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from lift_fast.config import ConfigError, load_config
from lift_fast.models import vit
from lift_fast.models.vit import build_model
from lift_fast.plan.memory import on_fake_storage


def _model(policy: str, dtype=torch.float32, **overrides):
    overrides = {"depth": 2, **overrides}
    cfg = load_config(None, ["model.name=vit_tiny_patch16", f"model.grad_checkpointing={policy}",
                             *(f"model.{key}={value}" for key, value in overrides.items())])
    torch.manual_seed(0)
    return build_model(cfg.model, 48, 40).to(dtype).train()


@pytest.mark.parametrize("policy, partial", [("selective", {}), ("full", {}),
                                             ("full", {"depth": 3, "grad_checkpointing_blocks": 2,
                                                       "grad_checkpointing_rest": "selective"}),
                                             ("selective", {"depth": 3, "grad_checkpointing_blocks": 1})])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_each_policy_gives_the_gradients_of_no_checkpointing(policy, partial, pooling):
    images = torch.randn(5, 3, 48, 48, dtype=torch.float64)
    grads = {}
    weights = torch.randn(5, 40, dtype=torch.float64)  # the features are unit rows: weigh them, not square them
    for name, overrides in (("none", {"depth": partial.get("depth", 2)}), (policy, partial)):
        model = _model(name, torch.float64, pooling=pooling, **overrides)
        (model(images) * weights).sum().backward()
        grads[name] = {key: p.grad for key, p in model.named_parameters()}
    assert grads["none"].keys() == grads[policy].keys()
    for key, grad in grads["none"].items():
        torch.testing.assert_close(grads[policy][key], grad, rtol=1e-10, atol=1e-12, msg=key)


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops run while open."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def _backward_ops(policy: str, images: torch.Tensor, **overrides) -> list:
    loss = _model(policy, attention="sdpa", **overrides)(images).sum()
    with _Ops() as ops:
        loss.backward()
    return ops.seen


def test_selective_recomputes_only_what_is_not_a_gemm():
    """Selective keeps GEMM and attention outputs: its backward recomputes norms and GELU but runs no
    more matmuls than the backward without checkpointing, and no attention forward."""
    images = torch.randn(3, 3, 48, 48)
    selective, plain = _backward_ops("selective", images), _backward_ops("none", images)
    assert torch.ops.aten.native_layer_norm.default in selective and torch.ops.aten.gelu.default in selective
    assert torch.ops.aten.native_layer_norm.default not in plain
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default not in selective

    def gemms(ops):
        return sum(op in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default) for op in ops)

    assert gemms(selective) == gemms(plain)
    assert gemms(_backward_ops("full", images)) > gemms(plain)


def test_checkpointing_some_blocks_recomputes_only_those():
    """Full on 1 of 3 blocks recomputes that block's GEMMs once (a third of full's extra), the rest
    selective recompute no GEMM but their norms; the others keep everything."""
    images = torch.randn(3, 3, 48, 48)

    def gemms(policy, **overrides):
        ops = _backward_ops(policy, images, depth=3, **overrides)
        return sum(op in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default) for op in ops), \
            sum(op == torch.ops.aten.native_layer_norm.default for op in ops)

    (plain, _), (full, _) = gemms("none"), gemms("full")
    one, one_norms = gemms("full", grad_checkpointing_blocks=1)
    assert full - plain == 3 * (one - plain) > 0 and one_norms == 2  # block 0's two norms, recomputed
    with_rest, rest_norms = gemms("full", grad_checkpointing_blocks=1, grad_checkpointing_rest="selective")
    assert with_rest == one and rest_norms == 6  # and the two selective blocks' norms
    assert vit.block_policies("full", 3, 1, "selective") == ["full", "selective", "selective"]
    assert vit.block_policies(True, 2) == ["full", "full"] and vit.block_policies("auto", 2, 1) == ["none"] * 2


def test_booleans_and_bad_values():
    assert load_config(None, ["model.grad_checkpointing=true"]).model.grad_checkpointing == "full"
    assert load_config(None, ["model.grad_checkpointing=False"]).model.grad_checkpointing == "none"
    with pytest.raises(ConfigError, match="model.grad_checkpointing"):
        load_config(None, ["model.grad_checkpointing=sometimes"])
    assert vit.checkpoint_policy(True) == "full" and vit.checkpoint_policy("auto") == "none"
    with pytest.raises(ConfigError, match="model.grad_checkpointing_blocks=3: the ViT has 2 blocks"):
        _model("full", grad_checkpointing_blocks=3)
    with pytest.raises(ConfigError, match="model.grad_checkpointing_rest"):
        load_config(None, ["model.grad_checkpointing_rest=full"])


def test_residual_stream_stays_in_bf16_under_cuda_autocast():
    """On fake CUDA tensors under CUDA's autocast, every block hands bf16 to the next (it was float32:
    patch_embed(bf16) + pos_embed(fp32), and LayerNorm's float32 output through the residual adds)."""
    cfg = load_config(None, ["model.name=vit_tiny_patch16", "model.depth=2"])
    dtypes = []
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    try:
        with FakeTensorMode():
            with torch.device("meta"):
                model = build_model(cfg.model, 48, 40)
            model = on_fake_storage(model, "cuda")
            for block in model.visual.blocks:
                block.register_forward_hook(lambda module, args, out: dtypes.append((args[0].dtype, out.dtype)))
            model(torch.empty(2, 3, 48, 48, device="cuda"))
    finally:
        torch.set_autocast_enabled("cuda", False)
    assert dtypes == [(torch.bfloat16, torch.bfloat16)] * 2


def _fp32_residual(model):
    """The model as it was: LayerNorms under autocast's policy, the stream promoted to float32."""
    for module in model.modules():
        if isinstance(module, vit.LayerNorm):
            module.forward = nn.LayerNorm.forward.__get__(module)
    model.visual.blocks[0].register_forward_pre_hook(lambda module, args: (args[0].float(),))
    return model


def test_bf16_residual_costs_no_accuracy_against_float64():
    """Under bf16 autocast (CPU), features and gradients of the bf16 stream are as close to float64 as
    those of the float32 stream it replaces (within 2x its error, flash-attention's rule)."""
    torch.manual_seed(1)
    images = torch.randn(6, 3, 48, 48)
    reference = _model("none", torch.float64)
    features = reference(images.double())
    weights = torch.randn_like(features)  # the features are unit rows: a sum of their squares has no gradient
    (features * weights).sum().backward()
    errors = {}
    for name, make in (("bf16 stream", lambda: _model("none")), ("fp32 stream", lambda: _fp32_residual(_model("none")))):
        model = make()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
        (out.double() * weights).sum().backward()
        pairs = [(p.grad.double().flatten(), q.grad.flatten()) for p, q in zip(model.parameters(), reference.parameters())
                 if q.grad is not None]  # all gradients as one vector (some single ones are ~0 in float64)
        grad_error = (torch.cat([g - r for g, r in pairs]).norm() / torch.cat([r for _, r in pairs]).norm()).item()
        errors[name] = (((out.double() - features).norm() / features.norm()).item(), grad_error)
    (feature_new, grad_new), (feature_old, grad_old) = errors["bf16 stream"], errors["fp32 stream"]
    assert feature_new <= 2 * feature_old + 1e-3, errors
    assert grad_new <= 2 * grad_old + 1e-3, errors
