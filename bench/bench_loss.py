"""Contrastive losses, forward + backward: lift_fast.kernels' chunked CLIP and SigLIP losses against
the naive losses that materialise the [B, B] logits (open_clip's formulation), at B=8192, D=512.

Besides time, each side records
  peak_bytes:  growth of the process's peak resident memory during one forward + backward, measured
               in a fresh subprocess per side (so neither side's peak hides the other's);
  saved_bytes: the bytes autograd keeps for the backward pass (saved_tensors_hooks).
The foundation's target: peak memory at most 0.1x the naive loss's, time no worse.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lift_fast.kernels import clip_loss, siglip_loss

BATCH, DIM = 8192, 512


def naive_clip_loss(image_features, text_features, logit_scale, logit_bias=None):
    """open_clip's ClipLoss: full logits, cross-entropy over rows and over columns."""
    logits = logit_scale * image_features @ text_features.T  # [B, B]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def naive_siglip_loss(image_features, text_features, logit_scale, logit_bias):
    """open_clip's SigLipLoss: full logits, -logsigmoid of the signed logits."""
    logits = logit_scale * image_features @ text_features.T + logit_bias  # [B, B]
    signs = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


LOSSES = {
    "clip": {"baseline": naive_clip_loss, "lift_fast": clip_loss},
    "siglip": {"baseline": naive_siglip_loss, "lift_fast": siglip_loss},
}


def make_inputs(batch=BATCH, dim=DIM):
    generator = torch.Generator().manual_seed(0)
    image_features = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    text_features = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    scale, bias = torch.tensor(1 / 0.07), torch.tensor(-10.0)
    return tuple(t.requires_grad_() for t in (image_features, text_features, scale, bias))


def forward_backward(loss_fn, image_features, text_features, logit_scale, logit_bias):
    """One loss evaluation and the gradients of features and scale (no accumulation into .grad)."""
    loss = loss_fn(image_features, text_features, logit_scale, logit_bias)
    return torch.autograd.grad(loss, (image_features, text_features, logit_scale))


def saved_bytes(loss_fn, *inputs: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward pass."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(*inputs)
    return sum(storages.values())


# VmHWM (the peak RSS of this process's memory map) rather than getrusage's ru_maxrss, which a
# child started from a large parent (pytest holding the other side's tensors) inherits.
PEAK_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {bench_dir!r})
from bench_loss import LOSSES, forward_backward, make_inputs
torch.set_num_threads({threads})
forward_backward(LOSSES[{loss!r}][{side!r}], *make_inputs(256, 512))  # code pages and thread pools in first
inputs = make_inputs()
def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
before = status_kib("VmRSS")
forward_backward(LOSSES[{loss!r}][{side!r}], *inputs)
print(json.dumps({{"peak_bytes": max(0, status_kib("VmHWM") - before) * 1024}}))
"""


def peak_bytes(loss: str, side: str) -> int:
    """Peak resident-memory growth of one forward + backward, in a fresh interpreter."""
    from pathlib import Path

    script = PEAK_SCRIPT.format(bench_dir=str(Path(__file__).parent), threads=torch.get_num_threads(),
                                loss=loss, side=side)
    # A fixed mmap threshold: every block over 1 MiB is mapped and unmapped on its own, so resident
    # memory follows the live tensors instead of glibc's heap growth (the same for both sides).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


@pytest.fixture(scope="module")
def loss_inputs():
    return make_inputs()


@pytest.mark.parametrize("side", ["baseline", "lift_fast"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_loss_forward_backward(paired_benchmark, loss, side, loss_inputs):
    loss_fn = LOSSES[loss][side]
    # A speedup only counts if the answer is the same.
    torch.testing.assert_close(loss_fn(*loss_inputs), LOSSES[loss]["baseline"](*loss_inputs), rtol=1e-4, atol=1e-4)
    pair = f"{loss} loss fwd+bwd B={BATCH} D={DIM} fp32 cpu"
    paired_benchmark(pair, forward_backward, loss_fn, *loss_inputs, rounds=3, warmup_rounds=1)
    paired_benchmark.record(peak_bytes=peak_bytes(loss, side), saved_bytes=saved_bytes(loss_fn, *loss_inputs))
