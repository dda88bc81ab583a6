"""The chunked losses' machinery: Triton slab kernels against their torch twins, fp16, frozen texts,
memory that never holds a B x B matrix, and torch.compile of a train step that calls the loss.

The Triton kernels run under the interpreter here (TRITON_INTERPRET=1, set in conftest.py).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lift_fast.kernels import KERNELS_ENV_VAR, chunking, clip_loss, siglip_loss, slab_ops

clip_module = importlib.import_module("lift_fast.kernels.clip_loss")  # the package's clip_loss is the function

SHAPES = [(1, 1), (7, 130), (130, 7), (65, 129)]  # none a multiple of the 64 x 64 tile


def random_sim(rows, columns, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(rows, columns, generator=generator) * 2 - 1  # cosine similarities in [-1, 1]


def run_clip_stats(sims, scale, use_triton, diag_offset=0):
    """clip_stats over consecutive row slabs `sims` (each [m, N]): row stats [2, sum m], positives, and
    the running column statistics [2, N] after the last slab."""
    rows = sum(sim.shape[0] for sim in sims)
    row_stats, positives = torch.empty(2, rows), torch.empty(rows)
    col_stats = slab_ops.new_column_stats(sims[0].shape[1], row_stats)
    start = 0
    for sim in sims:
        m = sim.shape[0]
        slab_ops.clip_stats(sim, scale, row_stats[:, start:start + m], positives[start:start + m], col_stats,
                            diag_offset=diag_offset + start, use_triton=use_triton)
        start += m
    return row_stats, positives, col_stats


@pytest.mark.parametrize("rows,columns", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_clip_stats_kernel_matches_torch(rows, columns, scale):
    """Two slabs folded into the running column statistics in place, against the torch twin and
    against the statistics of the whole matrix."""
    sim = random_sim(rows + 3, columns + rows + 3, seed=rows * columns)
    scale = torch.tensor(scale)  # the scalars reach the kernels as device tensors
    slabs = [sim[:rows], sim[rows:]]
    expected = run_clip_stats(slabs, scale, use_triton=False, diag_offset=1)
    got = run_clip_stats(slabs, scale, use_triton=True, diag_offset=1)
    for name, a, b in zip(("row stats", "positives", "col stats"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    logits = sim * scale
    torch.testing.assert_close(got[0][0] + got[0][1], torch.logsumexp(logits, dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2][0] + got[2][1].log(), torch.logsumexp(logits, dim=0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], logits.diagonal(1), rtol=0, atol=0)


@pytest.mark.parametrize("rows,columns", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_clip_grad_kernel_matches_torch(rows, columns, out_dtype, transposed):
    """The row pass (scalar row weight, per-column weights) and the text gradient's transposed slabs
    (per-row weights, a scalar column weight, a negative diagonal offset)."""
    sim = random_sim(rows, columns, seed=7 + rows)
    scale = torch.tensor(30.0)
    logits = sim * scale
    row_max, col_max = logits.amax(dim=1), logits.amax(dim=0)
    row_stats = torch.stack([row_max, (logits - row_max[:, None]).exp().sum(dim=1).log()])
    col_stats = torch.stack([col_max, (logits - col_max).exp().sum(dim=0).log()])
    generator = torch.Generator().manual_seed(3)
    if transposed:
        row_coef, col_coef = torch.rand(rows, generator=generator) / rows, torch.tensor(0.01)
        offset = -min(rows - 1, 2)
    else:
        row_coef, col_coef = torch.tensor(0.01), torch.rand(columns, generator=generator) / columns
        offset = max(0, min(columns - rows, 3))  # positives off the main diagonal, as on rank > 0
    outputs = []
    for use_triton in (False, True):
        out = torch.empty(rows, columns, dtype=out_dtype)
        partial = torch.zeros(slab_ops.partials_per_slab(rows, columns, use_triton))
        slab_ops.clip_grad(sim, out, row_stats, col_stats, row_coef, col_coef, partial, scale=scale,
                           diag_offset=offset, use_triton=use_triton)
        outputs.append((out.float(), partial.sum()))
    (expected, expected_partial), (got, got_partial) = outputs
    tolerance = dict(rtol=1e-3, atol=1e-4) if out_dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, expected, **tolerance)
    torch.testing.assert_close(got_partial, expected_partial, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,columns", SHAPES)
@pytest.mark.parametrize("with_grad", [False, True])
def test_siglip_kernel_matches_torch(rows, columns, with_grad):
    sim = random_sim(rows, columns, seed=11 + columns)
    outputs = []
    for use_triton in (False, True):
        out = torch.empty(rows, columns) if with_grad else None
        partial = torch.zeros(slab_ops.partials_per_slab(rows, columns, use_triton, slab_ops.SIGLIP_BLOCK_M), 3)
        slab_ops.siglip_slab(sim, out, partial, scale=torch.tensor(50.0), bias=torch.tensor(-10.0),
                             coef=torch.tensor(1 / rows), diag_offset=-1 if rows > 1 else 0, use_triton=use_triton)
        outputs.append((out, partial.sum(dim=0)))
    (expected, expected_sums), (got, got_sums) = outputs
    torch.testing.assert_close(got_sums, expected_sums, rtol=1e-5, atol=1e-5)
    if with_grad:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def float64_clip(image, text, scale):
    logits = scale * image @ text.T
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def float64_siglip(image, text, scale, bias):
    logits = scale * image @ text.T + bias
    return -F.logsigmoid((2 * torch.eye(image.shape[0], dtype=logits.dtype) - 1) * logits).sum() / image.shape[0]


def loss_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach().double()] + [leaf.grad.double() for leaf in leaves]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("batch", [7, 130])
def test_fp16_triton_within_twice_plain_torch_error(monkeypatch, loss, batch):
    """flash-attention's rule: the kernels' error against float64 is at most twice plain torch's in fp16."""
    monkeypatch.setenv(chunking.SLAB_BYTES_ENV_VAR, str(8 * batch * chunking.BYTES_PER_SIMILARITY))  # slabs of 8 rows
    generator = torch.Generator().manual_seed(batch)
    image = F.normalize(torch.randn(batch, 48, generator=generator, dtype=torch.float64), dim=1)
    text = F.normalize(image + torch.randn(batch, 48, generator=generator, dtype=torch.float64) / 4, dim=1)
    scale, bias = torch.tensor(20.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    if loss == "clip":
        reference, ours = (lambda i, t, s: float64_clip(i, t, s)), (lambda i, t, s: clip_loss(i, t, s))
        args = (image, text, scale)
    else:
        reference, ours = float64_siglip, siglip_loss
        args = (image, text, scale, bias)
    expected = loss_and_grads(reference, *args)
    half = [a.half() if a.dim() else a.float() for a in args]
    plain = loss_and_grads(lambda *t: reference(*(x.float() for x in t)), *half)  # fp16 inputs, torch math
    monkeypatch.setenv(KERNELS_ENV_VAR, "triton")
    got = loss_and_grads(ours, *half)
    for name, g, p, e in zip(("loss", "image", "text", "scale", "bias"), got, plain, expected):
        plain_error = (p - e).abs().max().item()
        assert (g - e).abs().max().item() <= 2 * plain_error + 1e-3 * e.abs().max().item() + 1e-6, name


def test_frozen_texts_get_no_gradient_and_no_text_gemm(monkeypatch):
    calls = []
    real = clip_module.write_matmul
    monkeypatch.setattr(clip_module, "write_matmul", lambda *a: calls.append(a) or real(*a))
    image = F.normalize(torch.randn(40, 16), dim=1).requires_grad_()
    text = F.normalize(torch.randn(40, 16), dim=1)  # frozen: requires_grad False
    clip_loss(image, text, 14.0).backward()
    assert image.grad is not None and text.grad is None
    assert calls == []  # the d text GEMMs (the column pass) were skipped
    text.requires_grad_()
    clip_loss(image, text, 14.0).backward()
    assert text.grad is not None and len(calls) == 1


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_never_holds_a_batch_by_batch_matrix(loss):
    batch, dim = 4096, 8
    image = F.normalize(torch.randn(batch, dim), dim=1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim), dim=1).requires_grad_()
    slab_bytes = 256 * batch * chunking.BYTES_PER_SIMILARITY  # 256 rows (or columns) of 4096: a 16th of the matrix
    with LargestTensor() as mode:
        if loss == "clip":
            value = clip_loss(image, text, 10.0, slab_bytes=slab_bytes)
        else:
            value = siglip_loss(image, text, 10.0, -10.0, slab_bytes=slab_bytes)
        value.backward()
    assert math.isfinite(value.item())
    assert mode.largest <= 256 * batch < batch * batch


def test_compiled_train_step_matches_eager():
    torch.manual_seed(0)
    head = torch.nn.Linear(12, 16)
    hidden = torch.randn(9, 12)
    text = F.normalize(torch.randn(9, 16), dim=1)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(14.0)))

    def step():
        head.zero_grad(set_to_none=True)
        log_scale.grad = None
        features = F.normalize(head(hidden), dim=-1)
        loss = clip_loss(features, text, log_scale.exp()) + siglip_loss(features, text, log_scale.exp(), -10.0)
        loss.backward()
        return loss.detach(), head.weight.grad.clone(), log_scale.grad.clone()

    eager = step()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
