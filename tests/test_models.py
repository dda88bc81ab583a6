"""The image tower: attention backends against a float64 reference, patch dropout, gradient
checkpointing, the FLOP formula against torch's FlopCounterMode, the ViT-B/16 parameter count against
timm's, and timm state-dict names (timm is not installed: its names and counts are written out here).
"""

from __future__ import annotations

import logging

import flash_stand_ins
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lift_fast.config import ConfigError, load_config
from lift_fast.models import attention
from lift_fast.models.flops import vit_flops_per_image
from lift_fast.models.timm_names import from_timm_state_dict, timm_kwargs, to_timm_state_dict
from lift_fast.models.vit import LiftImageEncoder, VisionTransformer, ViTSpec, build_model, vit_spec

# Odd sizes: 40 px with 8 px patches is 25 tokens, width 48 over 3 heads of 16.
SPEC = ViTSpec(width=48, depth=2, heads=3, patch_size=8)
IMAGE = 40
PATCHES = 25


def tower(attention_backend="sdpa", seed=0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(SPEC, IMAGE, attention=attention_backend, **kwargs)


def images(batch=3, seed=1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def set_backend(model: torch.nn.Module, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, attention.Attention):
            module.backend = backend


def output_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's output and the gradients of every parameter and of the input, for a fixed random
    weighting of the output."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(out.dtype)
    (out * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    grads["images"] = x.grad.clone()
    return out.detach(), grads


@pytest.fixture(autouse=True)
def fresh_backend_choice():
    """resolve_backend caches its choice per device and dtype; tests that fake flash-attn need a clean one."""
    attention._resolve_backend.cache_clear()
    attention._CHOSEN_KERNELS.clear()
    yield
    attention._resolve_backend.cache_clear()
    attention._CHOSEN_KERNELS.clear()


# --- attention backends ----------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sdpa_and_math_match_float64_reference(pooling):
    reference = tower("math", pooling=pooling).double()
    ref_out, ref_grads = output_and_grads(reference, images().double())
    results = {backend: output_and_grads(tower(backend, pooling=pooling), images()) for backend in ("sdpa", "math")}
    for backend, (out, grads) in results.items():
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5, msg=f"{backend} output")
        for name, grad in grads.items():
            scale = ref_grads[name].abs().max().item()
            torch.testing.assert_close(grad.double(), ref_grads[name], rtol=1e-4, atol=1e-5 * max(scale, 1.0),
                                       msg=f"{backend} gradient of {name}")
    # flash-attention's rule: the kernel's error against float64 is at most twice that of the plain
    # math path in the same dtype, plus a small atol
    (sdpa_out, sdpa_grads), (math_out, math_grads) = results["sdpa"], results["math"]
    pairs = [("output", sdpa_out, math_out, ref_out)] + [(n, sdpa_grads[n], math_grads[n], ref_grads[n]) for n in ref_grads]
    for name, sdpa_value, math_value, ref_value in pairs:
        sdpa_error = (sdpa_value.double() - ref_value).abs().max().item()
        math_error = (math_value.double() - ref_value).abs().max().item()
        assert sdpa_error <= 2 * math_error + 1e-6 * ref_value.abs().max().item(), (name, sdpa_error, math_error)


@pytest.mark.skipif(attention.flash_import_error() is None, reason="flash-attn is installed here")
def test_flash_without_flash_attn_is_a_clear_config_error():
    cfg = load_config(overrides=["model.attention=flash", "model.depth=1"])
    with pytest.raises(ConfigError) as err:
        build_model(cfg.model, 32, 24)
    message = str(err.value)
    assert "model.attention=flash" in message and "flash-attn does not import" in message
    assert "No module named 'flash_attn'" in message and "model.attention=auto" in message


def test_flash_on_cpu_float32_names_device_and_dtype(monkeypatch):
    monkeypatch.setattr(attention, "flash_kernels", lambda: ({"flash-attn-2": flash_stand_ins.KERNELS["flash-attn-2"]}, ""))
    model = tower("flash")
    with pytest.raises(ConfigError) as err:
        model(images())
    message = str(err.value)
    assert "model.attention=flash cannot run" in message
    assert "CUDA tensors in float16 or bfloat16" in message and "cpu float32" in message


@pytest.mark.parametrize("kernel", ["flash-attn-2", "flash-attn-4"])
def test_flash_path_packs_qkv_as_the_kernels_expect(monkeypatch, kernel):
    """The flash path's layout (packed qkv in, [B, N, H, Dh] out), with stand-ins that keep flash-attn's
    low-level signatures (tests/flash_stand_ins.py: torch's CPU flash kernel), since no GPU or flash-attn
    is here; math is the reference."""
    monkeypatch.setattr(attention, "flash_kernels", lambda: ({kernel: flash_stand_ins.KERNELS[kernel]}, ""))
    monkeypatch.setattr(attention, "_flash_kernel_for", lambda device, dtype: (kernel, ""))
    flash_out, flash_grads = output_and_grads(tower("flash"), images())
    math_out, math_grads = output_and_grads(tower("math"), images())
    torch.testing.assert_close(flash_out, math_out, rtol=1e-5, atol=1e-6)
    for name in flash_grads:
        torch.testing.assert_close(flash_grads[name], math_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_auto_takes_sdpa_here_and_logs_it_once(caplog, monkeypatch):
    installed = {"flash-attn-2": flash_stand_ins.KERNELS["flash-attn-2"]}  # installed, not applicable here
    monkeypatch.setattr(attention, "flash_kernels", lambda: (installed, ""))
    model = tower("auto")
    with caplog.at_level(logging.INFO, logger="lift_fast.models.attention"):
        auto_out = model(images())
        model(images(seed=5))
    choices = [r.getMessage() for r in caplog.records if "model.attention=auto" in r.getMessage()]
    assert len(choices) == 1, choices
    assert choices[0].startswith("model.attention=auto: sdpa for cpu float32") and "CUDA" in choices[0]
    torch.testing.assert_close(auto_out, tower("sdpa")(images()), rtol=0, atol=0)


# --- patch dropout and gradient checkpointing ------------------------------------------------------

def block_inputs(model: VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        model(x)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("pooling,prob,kept", [("mean", 0.5, 12), ("cls", 0.5, 12), ("mean", 0.3, 17), ("mean", 0.99, 1)])
def test_patch_dropout_keeps_a_random_subset_in_training_only(pooling, prob, kept):
    model = tower(pooling=pooling, patch_dropout=prob)
    x = images(batch=4)
    prefix = int(pooling == "cls")
    model.eval()
    (full,) = block_inputs(model, x)
    assert full.shape == (4, prefix + PATCHES, SPEC.width)  # none dropped in eval mode
    model.train()
    torch.manual_seed(3)
    (dropped,) = block_inputs(model, x)
    assert dropped.shape == (4, prefix + kept, SPEC.width)
    if prefix:
        torch.testing.assert_close(dropped[:, 0], full[:, 0], rtol=0, atol=0)  # the class token is never dropped
    chosen = []
    for sample in range(4):  # every kept token is one of the image's own tokens (with its position), no repeats
        distances = torch.cdist(dropped[sample, prefix:], full[sample, prefix:])  # [kept, N]
        assert distances.min(dim=1).values.max() == 0
        indices = distances.argmin(dim=1)
        assert indices.unique().numel() == kept
        chosen.append(frozenset(indices.tolist()))
    if 1 < kept < PATCHES:
        assert len(set(chosen)) > 1  # each image draws its own subset


def test_patch_dropout_out_of_range_is_a_config_error():
    cfg = load_config(overrides=["model.patch_dropout=1.0", "model.depth=1"])
    with pytest.raises(ConfigError, match=r"model.patch_dropout=1.0 must be in \[0, 1\)"):
        build_model(cfg.model, 32, 24)
    with pytest.raises(ConfigError, match="model.patch_dropout"):
        load_config(overrides=["model.patch_dropout=-0.1"])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_grad_checkpointing_gives_the_same_gradients(pooling):
    calls = {"plain": 0, "checkpointed": 0}
    results = {}
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        model = tower("sdpa", pooling=pooling, patch_dropout=0.3, grad_checkpointing=checkpointing).train()

        def count(module, args, name=name):
            calls[name] += 1

        for block in model.blocks:
            block.register_forward_pre_hook(count)
        torch.manual_seed(4)  # the same tokens dropped in both runs
        results[name] = output_and_grads(model, images())
    assert calls == {"plain": SPEC.depth, "checkpointed": 2 * SPEC.depth}  # blocks ran again in backward
    (plain_out, plain_grads), (ckpt_out, ckpt_grads) = results["plain"], results["checkpointed"]
    torch.testing.assert_close(ckpt_out, plain_out, rtol=0, atol=0)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=0, atol=0, msg=name)


def test_auto_attention_compiles_without_graph_breaks():
    model = tower("auto", patch_dropout=0.5, grad_checkpointing=True).train()
    explained = torch._dynamo.explain(model)(images())
    assert explained.graph_break_count == 0, explained.break_reasons


# --- FLOPs ------------------------------------------------------------------------------------------

def counted_flops(model: torch.nn.Module, x: torch.Tensor, backward: bool = False) -> int:
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("pooling,prob", [("mean", 0.0), ("cls", 0.0), ("mean", 0.5), ("cls", 0.3)])
def test_flop_formula_matches_flop_counter(pooling, prob):
    """Exact: the formula counts the matmuls FlopCounterMode counts (math attention; CPU SDPA counts 0)."""
    text_dim, head_hidden, batch = 24, 36, 3
    model = LiftImageEncoder(tower("math", pooling=pooling, patch_dropout=prob), text_dim, head_hidden).train()
    expected = vit_flops_per_image(SPEC, IMAGE, text_dim, head_hidden, patch_dropout=prob, pooling=pooling)
    assert expected["forward"] == sum(expected[k] for k in ("patch_embed", "attention_projections",
                                                            "attention_matmuls", "mlp", "head"))
    assert counted_flops(model, images(batch)) == batch * expected["forward"]
    # backward costs two matmuls per forward matmul, except the patch embedding, which needs no input
    # gradient (images are not trained): so "train" (3x forward) overstates by one patch embedding
    assert counted_flops(model, images(batch), backward=True) == batch * (expected["train"] - expected["patch_embed"])
    eval_flops = vit_flops_per_image(SPEC, IMAGE, text_dim, head_hidden, pooling=pooling)["forward"]
    assert counted_flops(model.eval(), images(batch)) == batch * eval_flops  # no patch dropout in eval


def reference_config(*overrides: str):
    """DESIGN.md's reference tower: ViT-B/16, 224 px, mean pooling, LIFT head 768 -> 4096 -> 4096."""
    return load_config(overrides=["model.name=vit_b16", "model.head_hidden=4096", *overrides])


def test_vit_b16_flops_match_flop_counter():
    flops = vit_flops_per_image(vit_spec("vit_b16"), 224, 4096, 4096)
    assert flops == {"patch_embed": 231_211_008, "attention_projections": 11_098_128_384,
                     "attention_matmuls": 1_416_167_424, "mlp": 22_196_256_768, "head": 39_845_888,
                     "tower": 34_941_763_584, "forward": 34_981_609_472, "train": 104_944_828_416}
    # the quoted "17.6 GFLOPs" of ViT-B/16 counts multiply-adds once, with 197 tokens (a class token)
    assert round(vit_flops_per_image(vit_spec("vit_b16"), 224, 4096, 4096, pooling="cls")["tower"] / 2e9, 1) == 17.6
    torch.manual_seed(0)
    model = build_model(reference_config("model.attention=math").model, 224, 4096).eval()
    with torch.no_grad():
        assert counted_flops(model, torch.randn(1, 3, 224, 224)) == flops["forward"]


# --- parameter count -------------------------------------------------------------------------------

# timm's vit_base_patch16_224 (= torchvision's vit_b_16): 86,567,656 parameters, of which the ImageNet
# classifier is 768 * 1000 + 1000, the class token 768 and its position-embedding row 768.
TIMM_VIT_B16_PARAMS = 86_567_656
VIT_B16_TOWER_PARAMS = TIMM_VIT_B16_PARAMS - (768 * 1000 + 1000) - 768 - 768


def test_vit_b16_reference_parameter_count():
    with torch.device("meta"):  # shapes only: nothing allocated
        model = build_model(reference_config().model, 224, 4096)
    width, patch, depth, patches, hidden, text_dim = 768, 16, 12, 14 * 14, 4096, 4096
    tower_formula = (3 * patch * patch * width + width  # patch embedding (conv weight and bias)
                     + patches * width                    # position embedding, no class token
                     + depth * (12 * width * width + 13 * width)  # qkv, proj, fc1, fc2 and two norms per block
                     + 2 * width)                         # final norm
    head_formula = width * hidden + hidden + hidden * text_dim + text_dim
    tower_params = sum(p.numel() for p in model.visual.parameters())
    assert tower_params == tower_formula == VIT_B16_TOWER_PARAMS == 85_797_120
    assert sum(p.numel() for p in model.head.parameters()) == head_formula == 19_931_136
    assert sum(p.numel() for p in model.parameters()) == tower_params + head_formula + 1  # + logit_scale


# --- timm names ------------------------------------------------------------------------------------

def timm_vit_base_patch16_224_keys() -> list[str]:
    """timm's VisionTransformer state-dict keys for vit_base_patch16_224 made with num_classes=0 (no
    `head`): Identity modules (fc_norm, norm_pre, ls1/ls2, q_norm/k_norm) hold no weights."""
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"]
    return (["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
            + [f"blocks.{i}.{name}" for i in range(12) for name in block] + ["norm.weight", "norm.bias"])


def test_timm_names_of_vit_b16_match_timm():
    with torch.device("meta"):
        cls_model = build_model(reference_config("model.pooling=cls").model, 224, 4096)
        mean_model = build_model(reference_config().model, 224, 4096)
    cls_state = to_timm_state_dict(cls_model)
    assert sorted(cls_state) == sorted(timm_vit_base_patch16_224_keys())
    assert cls_state["pos_embed"].shape == (1, 197, 768) and cls_state["cls_token"].shape == (1, 1, 768)
    assert cls_state["patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert sum(t.numel() for t in cls_state.values()) == TIMM_VIT_B16_PARAMS - (768 * 1000 + 1000)
    mean_state = to_timm_state_dict(mean_model)  # timm: class_token=False, global_pool="avg", fc_norm=False
    assert sorted(mean_state) == sorted(k for k in timm_vit_base_patch16_224_keys() if k != "cls_token")
    assert mean_state["pos_embed"].shape == (1, 196, 768)
    assert timm_kwargs(mean_model) == dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                           mlp_ratio=4.0, num_classes=0, class_token=False, global_pool="avg",
                                           fc_norm=False, no_embed_class=False)
    assert timm_kwargs(cls_model)["class_token"] and timm_kwargs(cls_model)["global_pool"] == "token"


def timm_style_features(model: VisionTransformer, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """timm's forward written out on a timm state dict: concatenate the class token, then add pos_embed
    (no_embed_class=False), blocks, norm, then the class token or the mean of all tokens."""
    tokens = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=SPEC.patch_size)
    tokens = tokens.flatten(2).transpose(1, 2)  # [B, N, W]
    if "cls_token" in state:
        tokens = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), tokens], dim=1)
    tokens = tokens + state["pos_embed"]
    for block in model.blocks:  # block weights carry the same names in both
        tokens = block(tokens)
    tokens = F.layer_norm(tokens, (SPEC.width,), state["norm.weight"], state["norm.bias"], eps=1e-6)
    return tokens[:, 0] if "cls_token" in state else tokens.mean(dim=1)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_timm_round_trip_keeps_weights_and_function(pooling):
    model = LiftImageEncoder(tower("sdpa", pooling=pooling), text_dim=24).eval()
    with torch.no_grad():  # a class token that is not zero, so where it goes matters
        if model.visual.cls_token is not None:
            model.visual.cls_token.normal_()
    state = to_timm_state_dict(model)
    assert not any(key.startswith(("head", "visual.", "logit_scale")) for key in state)
    with torch.no_grad():
        torch.testing.assert_close(timm_style_features(model.visual, state, images()), model.visual(images()))
    back = from_timm_state_dict(state)
    original = model.visual.state_dict()
    assert back.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(back[key], original[key], rtol=0, atol=0, msg=key)


def test_from_timm_folds_the_class_token_position_and_drops_the_classifier():
    timm_model = tower("sdpa", pooling="cls", seed=7).eval()
    state = to_timm_state_dict(timm_model)
    generator = torch.Generator().manual_seed(8)
    state["pos_embed"] = torch.randn(state["pos_embed"].shape, generator=generator)  # row 0 is not zero
    state["cls_token"] = torch.randn(state["cls_token"].shape, generator=generator)
    state["head.weight"], state["head.bias"] = torch.randn(1000, SPEC.width), torch.randn(1000)
    with torch.no_grad():
        expected = timm_style_features(timm_model, state, images())
    ours = tower("sdpa", pooling="cls", seed=9).eval()
    ours.load_state_dict(from_timm_state_dict(state))  # strict: no classifier, nothing missing
    with torch.no_grad():
        torch.testing.assert_close(ours(images()), expected)
    mean_tower = tower("sdpa", pooling="mean", seed=9)
    mean_state = from_timm_state_dict(state, class_token=False)
    mean_tower.load_state_dict(mean_state)
    torch.testing.assert_close(mean_tower.pos_embed.detach(), state["pos_embed"][:, 1:], rtol=0, atol=0)


def test_from_timm_refuses_what_has_no_counterpart():
    state = to_timm_state_dict(tower(pooling="cls"))
    with pytest.raises(ValueError, match="fc_norm.weight, reg_token"):
        from_timm_state_dict({**state, "fc_norm.weight": torch.ones(SPEC.width), "reg_token": torch.zeros(1, 4, SPEC.width)})
    with pytest.raises(ValueError, match="27 rows"):
        from_timm_state_dict({**state, "pos_embed": torch.zeros(1, 27, SPEC.width)})
    mean_state = to_timm_state_dict(tower(pooling="mean"))
    with pytest.raises(ValueError, match="no cls_token"):
        from_timm_state_dict(mean_state, class_token=True)
    no_embed_class = from_timm_state_dict({**mean_state, "cls_token": state["cls_token"]})  # timm no_embed_class
    torch.testing.assert_close(no_embed_class["cls_token"], state["cls_token"], rtol=0, atol=0)
