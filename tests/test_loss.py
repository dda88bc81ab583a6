"""lift_fast.kernels losses against float64 references written here from the plain formulas.

Forward and every gradient (image, text, logit_scale, logit_bias) over odd shapes and fp32/bf16.
bf16 follows flash-attention's rule: the error against float64 is at most twice that of the plain
open_clip formula run in bf16, plus a small atol.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lift_fast.kernels import (
    KERNELS_ENV_VAR,
    ClipLoss,
    SigLipLoss,
    chunking,
    clip_loss,
    fused_projection_clip_loss,
    siglip_loss,
)

BATCH_SIZES = (1, 7, 130)
DIMS = (16, 100)
FP32_TOLERANCE = dict(rtol=2e-5, atol=1e-6)


@pytest.fixture(autouse=True, params=["torch", "triton"])
def kernels(request, monkeypatch):
    """Every test runs on the torch path and on the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv(KERNELS_ENV_VAR, request.param)
    return request.param


@pytest.fixture(autouse=True, params=["one slab", "many slabs"])
def slabs(request, monkeypatch):
    """The whole batch in one slab, or slabs of a few rows (odd sizes: 130 rows in slabs of 12, and
    the text gradient's 130 columns in slabs of 12) through a tiny LIFT_FAST_SLAB_BYTES."""
    if request.param == "many slabs":
        monkeypatch.setenv(chunking.SLAB_BYTES_ENV_VAR, str(12 * 130 * chunking.BYTES_PER_SIMILARITY))
    return request.param


# --- float64 references ----------------------------------------------------------------------------


def reference_clip(image, text, scale, bias):
    """Mean over pairs of (logsumexp over the row - positive), averaged over both directions."""
    logits = scale * (image @ text.T) + bias
    positives = logits.diagonal()
    image_to_text = (torch.logsumexp(logits, dim=1) - positives).mean()
    text_to_image = (torch.logsumexp(logits, dim=0) - positives).mean()
    return (image_to_text + text_to_image) / 2


def reference_siglip(image, text, scale, bias):
    """sum_ij log(1 + exp(-z_ij * logit_ij)) / B with z = +1 on the diagonal, -1 off it."""
    logits = scale * (image @ text.T) + bias
    batch = image.shape[0]
    z = 2 * torch.eye(batch, dtype=logits.dtype) - 1
    return torch.log1p(torch.exp(-z * logits)).sum() / batch


def open_clip_style(loss, image, text, scale, bias):
    """The loss as open_clip writes it, run in the features' own dtype: the bf16 baseline."""
    logits = scale * image @ text.T + bias
    batch = image.shape[0]
    if loss == "clip":
        labels = torch.arange(batch)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    z = 2 * torch.eye(batch, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / batch


REFERENCES = {"clip": reference_clip, "siglip": reference_siglip}
LOSSES = {"clip": clip_loss, "siglip": siglip_loss}


def make_pairs(batch, dim, seed, dtype=torch.float64):
    """Unit image rows and text rows that are noisy copies of them, as a trained pair would be."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=1)
    noise = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    text = F.normalize(image + 1.5 * noise / math.sqrt(dim), dim=1)
    scale = 10 + 10 * torch.rand((), generator=generator, dtype=torch.float64)
    bias = -10 + torch.rand((), generator=generator, dtype=torch.float64)
    return image.to(dtype), text.to(dtype), scale, bias


def loss_and_grads(fn, image, text, scale, bias):
    """Run fn on leaf copies; return the loss and the gradients of image, text, scale, bias."""
    leaves = [tensor.detach().clone().requires_grad_() for tensor in (image, text, scale, bias)]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def max_error(value, reference):
    return (value.double() - reference).abs().max().item()


# --- forward and gradients against float64 ---------------------------------------------------------


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_fp32_matches_float64_reference(loss, batch, dim):
    image, text, scale, bias = make_pairs(batch, dim, seed=batch * 1000 + dim, dtype=torch.float32)
    scale, bias = scale.float(), bias.float()
    expected, expected_grads = loss_and_grads(
        REFERENCES[loss], image.double(), text.double(), scale.double(), bias.double())
    value, grads = loss_and_grads(LOSSES[loss], image, text, scale, bias)

    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), expected, **FP32_TOLERANCE)
    for name, grad, expected_grad in zip(("image", "text", "scale", "bias"), grads, expected_grads):
        assert grad is not None, f"no gradient reached {name}"
        assert grad.dtype == torch.float32, name
        # relative to the largest entry: the CLIP bias gradient is 0 up to float32 rounding
        atol = 1e-5 * expected_grad.abs().max().item() + 1e-7
        assert max_error(grad, expected_grad) <= atol, name


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_bf16_error_at_most_twice_plain_torch(loss, batch, dim):
    image, text, scale, bias = make_pairs(batch, dim, seed=batch * 1000 + dim + 1, dtype=torch.bfloat16)
    # the reference sees the bf16-rounded inputs, so only the computation's error is measured
    expected, expected_grads = loss_and_grads(REFERENCES[loss], image.double(), text.double(), scale, bias)
    value, grads = loss_and_grads(LOSSES[loss], image, text, scale.float(), bias.float())
    plain, plain_grads = loss_and_grads(
        lambda *args: open_clip_style(loss, *args), image, text, scale.float(), bias.float())

    assert value.dtype == torch.float32
    assert grads[0].dtype == torch.bfloat16
    atol = 1e-3 * (1 + expected.abs().item())
    assert max_error(value, expected) <= 2 * max_error(plain, expected) + atol
    for name, grad, plain_grad, expected_grad in zip(
            ("image", "text", "scale", "bias"), grads, plain_grads, expected_grads):
        atol = 1e-3 * max(expected_grad.abs().max().item(), 1e-3)
        error, plain_error = max_error(grad, expected_grad), max_error(plain_grad, expected_grad)
        assert error <= 2 * plain_error + atol, f"{name}: {error} vs plain bf16 {plain_error}"


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_scale_100_with_identical_rows_is_finite(loss):
    batch, dim = 33, 16
    row = F.normalize(torch.randn(1, dim, dtype=torch.float64), dim=1)
    image = text = row.expand(batch, dim).contiguous()
    scale, bias = torch.tensor(100.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    expected, _ = loss_and_grads(REFERENCES[loss], image, text, scale, bias)
    for dtype in (torch.float32, torch.bfloat16):
        value, grads = loss_and_grads(LOSSES[loss], image.to(dtype), text.to(dtype), scale.float(),
                                      bias.float())
        assert torch.isfinite(value)
        assert all(torch.isfinite(grad).all() for grad in grads)
        torch.testing.assert_close(value.double(), expected, rtol=1e-2, atol=1e-2)
    if loss == "clip":
        # every logit is equal, so each softmax is uniform over the batch
        torch.testing.assert_close(expected.item(), math.log(batch))


def test_clip_loss_of_one_pair_is_zero():
    image, text, scale, _ = make_pairs(1, 16, seed=3, dtype=torch.float32)
    assert clip_loss(image, text, scale.float()).item() == 0.0


def test_float_scale_and_frozen_text_features():
    image, text, _, _ = make_pairs(7, 16, seed=4, dtype=torch.float32)
    image.requires_grad_()
    loss = clip_loss(image, text, 14.0)
    loss.backward()
    assert image.grad is not None and text.grad is None
    expected = reference_clip(image.detach().double(), text.double(), 14.0, 0.0)
    torch.testing.assert_close(loss.double(), expected, **FP32_TOLERANCE)


def test_mixed_feature_dtypes_are_promoted():
    image, text, scale, bias = make_pairs(7, 16, seed=5)
    value = siglip_loss(image.bfloat16(), text.half(), scale.float(), bias.float())
    expected = reference_siglip(image.bfloat16().double(), text.half().double(), scale, bias)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)


def test_float64_inputs_give_float64_loss():
    image, text, scale, bias = make_pairs(7, 16, seed=6)
    value = clip_loss(image, text, scale, bias)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, reference_clip(image, text, scale, bias), rtol=1e-12, atol=0)


# --- modules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_modules_equal_functional(batch):
    image, text, scale, bias = make_pairs(batch, 16, seed=7 + batch, dtype=torch.float32)
    scale, bias = scale.float(), bias.float()
    assert torch.equal(ClipLoss()(image, text, scale), clip_loss(image, text, scale))
    assert torch.equal(ClipLoss()(image, text, scale, bias), clip_loss(image, text, scale, bias))
    assert torch.equal(SigLipLoss()(image, text, scale, bias), siglip_loss(image, text, scale, bias))
    clip_dict = ClipLoss(cache_labels=True)(image, text, scale, output_dict=True)
    siglip_dict = SigLipLoss(dist_impl="gather")(image, text, scale, bias, output_dict=True)
    assert list(clip_dict) == ["contrastive_loss"] and list(siglip_dict) == ["contrastive_loss"]
    assert torch.equal(clip_dict["contrastive_loss"], clip_loss(image, text, scale))
    assert torch.equal(siglip_dict["contrastive_loss"], siglip_loss(image, text, scale, bias))


def test_module_arguments_are_checked():
    with pytest.raises(NotImplementedError, match="Horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        ClipLoss(rank=2, world_size=2)
    image, text, scale, bias = make_pairs(4, 16, seed=8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        ClipLoss(local_loss=True, gather_with_grad=True, rank=0, world_size=2)(image, text, scale)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        SigLipLoss(rank=1, world_size=2)(image, text, scale, bias)


# --- fused projection ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_fused_projection_matches_composition(loss, with_bias):
    batch, hidden, dim = 7, 12, 16
    generator = torch.Generator().manual_seed(9)
    image_hidden = torch.randn(batch, hidden, generator=generator, dtype=torch.float64)
    weight = torch.randn(dim, hidden, generator=generator, dtype=torch.float64) / math.sqrt(hidden)
    bias = torch.randn(dim, generator=generator, dtype=torch.float64) if with_bias else None
    text = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    scale, logit_bias = torch.tensor(14.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)

    def composition(image_hidden, weight, bias, text, scale, logit_bias):
        projected = image_hidden @ weight.T + (0 if bias is None else bias)
        image_features = projected / projected.norm(dim=1, keepdim=True)
        text_features = text / text.norm(dim=1, keepdim=True)
        return REFERENCES[loss](image_features, text_features, scale, logit_bias)

    inputs = [image_hidden, weight, bias, text, scale, logit_bias]
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    expected = composition(*leaves)
    expected_grads = torch.autograd.grad(expected, [t for t in leaves if t is not None])
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    value = fused_projection_clip_loss(*leaves, loss=loss)
    grads = torch.autograd.grad(value, [t for t in leaves if t is not None])

    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_fused_projection_checks_shapes_and_loss_name():
    image_hidden, weight, bias, text = torch.randn(7, 12), torch.randn(16, 12), torch.randn(16), torch.randn(7, 16)
    with pytest.raises(ValueError, match="'infonce'"):
        fused_projection_clip_loss(image_hidden, weight, bias, text, 10.0, loss="infonce")
    with pytest.raises(ValueError, match=r"\(7, 12\).*\(16, 11\)"):
        fused_projection_clip_loss(image_hidden, weight[:, :11], bias, text, 10.0)
    with pytest.raises(ValueError, match=r"bias \(15,\)"):
        fused_projection_clip_loss(image_hidden, weight, bias[:15], text, 10.0)
    with pytest.raises(ValueError, match=r"text_features \(7, 15\)"):
        fused_projection_clip_loss(image_hidden, weight, bias, text[:, :15], 10.0)
    with pytest.raises(ValueError, match=r"rank=2, world_size=2"):
        fused_projection_clip_loss(image_hidden, weight, bias, text, 10.0, rank=2, world_size=2)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        fused_projection_clip_loss(image_hidden, weight, bias, text, 10.0, rank=0, world_size=2)


# --- input checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_mismatched_shapes_name_both(loss):
    image, text = torch.randn(7, 16), torch.randn(6, 16)
    with pytest.raises(ValueError, match=r"\(7, 16\).*\(6, 16\)"):
        LOSSES[loss](image, text, 10.0, -10.0)
    with pytest.raises(ValueError, match=r"\(7, 16\).*\(7, 15\)"):
        LOSSES[loss](image, torch.randn(7, 15), 10.0, -10.0)
    with pytest.raises(ValueError, match=r"2-D.*\(16,\)"):
        LOSSES[loss](image[0], text[0], 10.0, -10.0)
    with pytest.raises(ValueError, match="B=0"):
        LOSSES[loss](image[:0], text[:0], 10.0, -10.0)
    with pytest.raises(TypeError, match="floating-point"):
        LOSSES[loss](image.long(), text[:7].long(), 10.0, -10.0)
    with pytest.raises(ValueError, match=r"logit_scale.*\(2,\)"):
        LOSSES[loss](image, torch.randn(7, 16), torch.ones(2), -10.0)


# --- LIFT_FAST_KERNELS -----------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["auto", "torch", "TORCH", ""])
def test_env_var_plain_choices_run_torch(monkeypatch, choice):
    image, text, scale, bias = make_pairs(7, 16, seed=10, dtype=torch.float32)
    monkeypatch.setenv(KERNELS_ENV_VAR, "torch")
    expected = clip_loss(image, text, scale.float())
    monkeypatch.setenv(KERNELS_ENV_VAR, choice)
    assert torch.equal(clip_loss(image, text, scale.float()), expected)


def test_env_var_is_read_at_call_time(monkeypatch):
    image, text, scale, bias = make_pairs(7, 16, seed=11, dtype=torch.float32)
    module = ClipLoss()
    module(image, text, scale.float())
    monkeypatch.setenv(KERNELS_ENV_VAR, "triton")
    calls = [
        lambda: clip_loss(image, text, scale),
        lambda: siglip_loss(image, text, scale, bias),
        lambda: module(image, text, scale),
        lambda: SigLipLoss()(image, text, scale, bias),
        lambda: fused_projection_clip_loss(image, torch.eye(16), None, text, scale),
    ]
    monkeypatch.setattr("lift_fast.kernels.slab_ops.INTERPRETED", False)  # as on a CPU box without the interpreter
    for call in calls:
        with pytest.raises(RuntimeError, match="needs the Triton interpreter"):
            call()
    monkeypatch.setenv(KERNELS_ENV_VAR, "cuda")
    for call in calls:
        with pytest.raises(ValueError, match=f"{KERNELS_ENV_VAR}='cuda'.*auto, triton, torch"):
            call()
