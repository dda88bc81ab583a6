"""ClipLoss and SigLipLoss under torch.distributed (2 gloo processes) against one process on the
global batch.

Each rank holds half of the batch. As DDP averages parameter gradients over ranks, a rank's feature
gradient divided by world_size must equal the global-batch gradient of its rows (for the variants
that gather with gradients), and the mean over ranks of the loss and of the logit_scale/logit_bias
gradients must equal the global-batch ones.
"""

from __future__ import annotations

import datetime
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lift_fast.kernels import KERNELS_ENV_VAR, ClipLoss, SigLipLoss, chunking, fused_projection_clip_loss, start_text_gather

WORLD_SIZE = 2
LOCAL_BATCH = 7
DIM = 16

# name -> (module class, constructor arguments besides rank and world_size)
CASES = {
    "clip_local_with_grad": (ClipLoss, dict(local_loss=True, gather_with_grad=True)),
    "clip_global_with_grad": (ClipLoss, dict(local_loss=False, gather_with_grad=True)),
    "clip_global_no_grad": (ClipLoss, dict(local_loss=False, gather_with_grad=False)),
    "clip_local_no_grad": (ClipLoss, dict(local_loss=True, gather_with_grad=False)),
    "siglip_bidir": (SigLipLoss, dict()),
    "siglip_gather": (SigLipLoss, dict(dist_impl="gather")),
}


# (dtype of the ranks' inputs, LIFT_FAST_KERNELS, slab budget, tolerance against float64):
# float64 runs the torch twins exactly; float32 runs the Triton kernels (interpreted) in slabs of
# two rows, so column statistics are merged across slabs and across ranks.
SETTINGS = {
    "float64-torch": (torch.float64, "torch", None, dict()),
    "float32-triton-slabs": (torch.float32, "triton", 2 * WORLD_SIZE * LOCAL_BATCH * chunking.BYTES_PER_SIMILARITY,
                             dict(rtol=1e-4, atol=1e-6)),
}


@pytest.fixture(params=list(SETTINGS))
def setting(request, monkeypatch):
    dtype, kernels, slab_bytes, tolerance = SETTINGS[request.param]
    monkeypatch.setenv(KERNELS_ENV_VAR, kernels)
    if slab_bytes is not None:  # forked ranks inherit it
        monkeypatch.setenv(chunking.SLAB_BYTES_ENV_VAR, str(slab_bytes))
    return dtype, tolerance


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loss_and_grads(module, image, text, scale, bias):
    leaves = [tensor.clone().requires_grad_() for tensor in (image, text, scale, bias)]
    loss = module(*leaves)
    loss.backward()
    return [loss.detach()] + [leaf.grad for leaf in leaves]


def _worker(rank, port, compute, inputs, results_path):
    """One rank: join the gloo group, save compute(rank, inputs) for the test to read."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        torch.save(compute(rank, inputs), f"{results_path}.rank{rank}")
    finally:
        dist.destroy_process_group()


def _module_results(rank, inputs):
    image, text, scale, bias = inputs
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}
    for name, (module_class, arguments) in CASES.items():
        module = module_class(rank=rank, world_size=WORLD_SIZE, **arguments)
        results[name] = _loss_and_grads(module, image[rows], text[rows], scale, bias)
    return results


def test_two_ranks_match_the_global_batch(tmp_path, setting):
    dtype, tolerance = setting
    generator = torch.Generator().manual_seed(0)
    batch = WORLD_SIZE * LOCAL_BATCH
    image = F.normalize(torch.randn(batch, DIM, generator=generator, dtype=torch.float64), dim=1)
    noise = torch.randn(batch, DIM, generator=generator, dtype=torch.float64)
    text = F.normalize(image + 1.5 * noise / math.sqrt(DIM), dim=1)
    scale, bias = torch.tensor(14.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    inputs = (image, text, scale, bias)

    results_path = tmp_path / "results"
    # fork: the children inherit the imported torch instead of importing it again (seconds each)
    rank_inputs = tuple(tensor.to(dtype) for tensor in inputs)
    mp.start_processes(_worker, args=(_free_port(), _module_results, rank_inputs, str(results_path)), nprocs=WORLD_SIZE,
                       join=True, start_method="fork")
    per_rank = [{name: [value.double() for value in values] for name, values in torch.load(f"{results_path}.rank{rank}").items()}
                for rank in range(WORLD_SIZE)]

    for name, (module_class, _) in CASES.items():
        expected_loss, expected_image, expected_text, expected_scale, expected_bias = (
            _loss_and_grads(module_class(), *inputs))
        losses = torch.stack([results[name][0] for results in per_rank])
        torch.testing.assert_close(losses.mean(), expected_loss, msg=name, **tolerance)
        if name == "clip_local_no_grad":
            continue  # open_clip's gradients here miss the other ranks' terms; only the value is defined
        if name == "clip_global_no_grad":
            # each rank computes the whole global loss but differentiates only its own rows
            feature_grad_factor = 1
            torch.testing.assert_close(losses, expected_loss.expand(WORLD_SIZE), msg=name, **tolerance)
        else:
            feature_grad_factor = WORLD_SIZE
        for rank, results in enumerate(per_rank):
            _, image_grad, text_grad, scale_grad, bias_grad = results[name]
            rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            torch.testing.assert_close(image_grad / feature_grad_factor, expected_image[rows], msg=name, **tolerance)
            torch.testing.assert_close(text_grad / feature_grad_factor, expected_text[rows], msg=name, **tolerance)
        for position, expected_grad in ((3, expected_scale), (4, expected_bias)):
            mean_grad = torch.stack([results[name][position] for results in per_rank]).mean()
            torch.testing.assert_close(mean_grad, expected_grad, msg=name, **(tolerance or dict(atol=1e-12, rtol=1e-9)))


# ---------------------------------------------------------------------- fused projection under DDP

HIDDEN = 12
FUSED_LOSSES = ("clip", "siglip")


def _fused_loss_and_grads(loss_name, hidden, weight, proj_bias, text, scale, bias, **world):
    leaves = [tensor.clone().requires_grad_() for tensor in (hidden, weight, proj_bias, text, scale, bias)]
    loss = fused_projection_clip_loss(*leaves, loss=loss_name, **world)
    loss.backward()
    return [loss.detach()] + [leaf.grad for leaf in leaves]


def _fused_results(rank, inputs):
    hidden, weight, proj_bias, text, scale, bias = inputs
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}
    for loss_name in FUSED_LOSSES:
        results[loss_name] = _fused_loss_and_grads(loss_name, hidden[rows], weight, proj_bias, text[rows], scale,
                                                   bias, rank=rank, world_size=WORLD_SIZE)
    try:  # world_size left at 1 under two processes: a clear error, not a local-batch loss
        fused_projection_clip_loss(hidden[rows], weight, proj_bias, text[rows], scale)
        results["left at 1"] = "no error"
    except ValueError as error:
        results["left at 1"] = str(error)
    return results


def test_fused_projection_on_two_ranks_matches_the_global_batch(tmp_path, setting):
    """fused_projection_clip_loss(rank=, world_size=) is ClipLoss(local_loss=True, gather_with_grad=True)
    (and SigLipLoss) of the projected features: per-row feature gradients / world_size, and the mean
    over ranks of the loss and of the weight, bias, scale gradients (what DDP averages), equal the
    global batch's."""
    dtype, tolerance = setting
    generator = torch.Generator().manual_seed(1)
    batch = WORLD_SIZE * LOCAL_BATCH
    hidden = torch.randn(batch, HIDDEN, generator=generator, dtype=torch.float64)
    weight = torch.randn(DIM, HIDDEN, generator=generator, dtype=torch.float64) / math.sqrt(HIDDEN)
    proj_bias = torch.randn(DIM, generator=generator, dtype=torch.float64) / 10
    text = F.normalize(hidden @ weight.T + torch.randn(batch, DIM, generator=generator, dtype=torch.float64), dim=1)
    scale, bias = torch.tensor(12.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    inputs = (hidden, weight, proj_bias, text, scale, bias)

    results_path = tmp_path / "fused"
    rank_inputs = tuple(tensor.to(dtype) for tensor in inputs)
    mp.start_processes(_worker, args=(_free_port(), _fused_results, rank_inputs, str(results_path)), nprocs=WORLD_SIZE,
                       join=True, start_method="fork")
    per_rank = [torch.load(f"{results_path}.rank{rank}") for rank in range(WORLD_SIZE)]
    for results in per_rank:
        assert "world_size=torch.distributed.get_world_size()" in results["left at 1"]
    for loss_name in FUSED_LOSSES:
        expected = _fused_loss_and_grads(loss_name, *inputs)
        got = [[value.double() for value in results[loss_name]] for results in per_rank]
        for position, what in ((0, "loss"), (2, "weight"), (3, "projection bias"), (5, "scale"), (6, "bias")):
            mean = torch.stack([values[position] for values in got]).mean(dim=0)
            torch.testing.assert_close(mean, expected[position], msg=f"{loss_name} {what}",
                                       **(tolerance or dict(atol=1e-12, rtol=1e-9)))
        for rank, values in enumerate(got):
            rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            for position, what in ((1, "hidden"), (4, "text")):
                torch.testing.assert_close(values[position] / WORLD_SIZE, expected[position][rows],
                                           msg=f"{loss_name} {what} rank {rank}", **tolerance)


# ------------------------------------------------------------------- texts gathered before the forward


class OpOrder(TorchDispatchMode):
    """The names of the ops dispatched, in order (c10d collectives included)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(f"{func.namespace}.{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


def _gathered_results(rank, inputs):
    """Per loss: (loss and gradients with the texts' gather started before the image forward, the same
    on the plain path, the op order of the first). The image forward is a Linear + L2 norm, as LIFT's head."""
    hidden, weight, text, scale, bias = inputs
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    losses = {
        "clip": lambda f, t, **kw: ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                            world_size=WORLD_SIZE)(f, t, scale, **kw),
        "siglip": lambda f, t, **kw: SigLipLoss(rank=rank, world_size=WORLD_SIZE)(f, t, scale, bias, **kw),
        "fused": lambda h, t, **kw: fused_projection_clip_loss(h, leaf_weight, None, t, scale, rank=rank,
                                                               world_size=WORLD_SIZE, **kw),
    }
    results = {}
    for name, loss_fn in losses.items():
        runs, orders = [], []
        for early in (True, False):
            leaf_hidden, leaf_weight = hidden[rows].clone().requires_grad_(), weight.clone().requires_grad_()
            with OpOrder() as order:
                handle = start_text_gather(text[rows]) if early else None
                features = leaf_hidden if name == "fused" else F.normalize(leaf_hidden @ leaf_weight.T, dim=1)
                loss = loss_fn(features, text[rows], gathered_text_features=handle) if early else loss_fn(
                    features, text[rows])
            loss.backward()
            runs.append([loss.detach(), leaf_hidden.grad, leaf_weight.grad])
            orders.append(order.names)
        results[name] = (runs[0], runs[1], orders[0])
    return results


def test_texts_gathered_before_the_forward_give_the_plain_results(tmp_path, setting):
    """start_text_gather before the image forward, the handle passed as gathered_text_features: the same
    losses and gradients, bit for bit, as the loss gathering the texts itself; the all-gather is
    dispatched before the forward's first GEMM, and the loss gathers no texts again."""
    dtype, _ = setting
    generator = torch.Generator().manual_seed(2)
    batch = WORLD_SIZE * LOCAL_BATCH
    hidden = torch.randn(batch, HIDDEN, generator=generator, dtype=torch.float64)
    weight = torch.randn(DIM, HIDDEN, generator=generator, dtype=torch.float64) / math.sqrt(HIDDEN)
    text = F.normalize(hidden @ weight.T + torch.randn(batch, DIM, generator=generator, dtype=torch.float64), dim=1)
    inputs = tuple(t.to(dtype) for t in (hidden, weight, text)) + (torch.tensor(12.0, dtype=dtype),
                                                                    torch.tensor(-4.0, dtype=dtype))
    results_path = tmp_path / "gathered"
    mp.start_processes(_worker, args=(_free_port(), _gathered_results, inputs, str(results_path)), nprocs=WORLD_SIZE,
                       join=True, start_method="fork")
    for rank in range(WORLD_SIZE):
        for name, (early, plain, order) in torch.load(f"{results_path}.rank{rank}").items():
            for what, a, b in zip(("loss", "hidden grad", "weight grad"), early, plain):
                assert torch.equal(a, b), f"rank {rank} {name}: {what}"
            gathers = [i for i, op in enumerate(order) if op.startswith("c10d.") and "allgather" in op]
            gemms = [i for i, op in enumerate(order) if op in ("aten.mm", "aten.addmm", "aten.matmul")]
            assert gathers and gemms and gathers[0] < gemms[0], (name, order[:12])
            if name != "clip":  # clip also gathers its [2, N] column statistics: one gather more
                assert len(gathers) == 1, (name, gathers)
