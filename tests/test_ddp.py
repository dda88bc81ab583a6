"""DistributedDataParallel as train.ddp_* sets it up, on two gloo ranks (tests/two_ranks.py): gradients
as views of the all-reduce buckets of train.ddp_bucket_mb, the global-batch average as before, the
bf16 compression hook, and CLIP mode's text tower in a DDP of its own (and compiled) whose gradients
are reduced like the image tower's. The whole trainer on two ranks with these defaults is
tests/test_train_distributed.py and tests/test_clip_mode.py."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.distributed as dist
from torch import nn
from two_ranks import WORLD_SIZE, fork_ranks

from lift_fast.config import ConfigError, load_config
from lift_fast.models.text_tower import build_text_tower
from lift_fast.models.vit import build_model
from lift_fast.train import distributed
from lift_fast.train.distributed import Distributed
from lift_fast.train.loop import train

CLIP = ["model.text_tower=transformer", "model.text_width=32", "model.text_layers=1", "model.text_heads=2",
        "model.text_context=12", "model.depth=2", "model.head_hidden=16"]
DIM, IMAGE = 24, 32


def towers(text: bool) -> nn.Module:
    cfg = load_config(overrides=CLIP)
    torch.manual_seed(0)
    model = build_model(cfg.model, IMAGE, DIM)
    if text:
        model.text = build_text_tower(cfg.model, DIM)[0]
    return model


def batch(rank: int, size: int = 3):
    generator = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(size, 3, IMAGE, IMAGE, generator=generator),
            torch.randint(1, 50, (size, 12), generator=generator), torch.randn(size, DIM, generator=generator))


def loss_of(image_forward, text_forward, logit_scale, images, tokens, targets):
    features = image_forward(images)
    loss = ((features - targets) ** 2).sum() * logit_scale.exp()
    if text_forward is not None:
        loss = loss + (text_forward(tokens) * features).sum()
    return loss


def local_grads(text: bool, rank: int) -> dict[str, torch.Tensor]:
    """This rank's gradients of a plain replica (no DDP), for its own batch."""
    model = towers(text)
    loss_of(model, getattr(model, "text", None), model.logit_scale, *batch(rank)).backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def mean_over_ranks(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mean = {}
    for name, grad in grads.items():
        gathered = [torch.empty_like(grad) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, grad)
        mean[name] = torch.stack(gathered).mean(0)
    return mean


def _rank_main(rank: int, text: bool, compress: str, compile: bool) -> None:
    # torch.compile as wrap_towers calls it, with AOTAutograd but no code generation (inductor on two
    # CPU ranks takes minutes); DDPOptimizer splits the graphs at the buckets as it does for inductor
    distributed.torch.compile = functools.partial(torch.compile, backend="aot_eager")  # in this forked rank only
    ctx = distributed.setup()
    try:
        local = local_grads(text, rank)
        expected = mean_over_ranks(local)
        magnitude = mean_over_ranks({name: grad.abs() for name, grad in local.items()})
        model = towers(text)
        # small buckets, several per tower; compiled, DDPOptimizer wants none smaller than DDP's first (1 MB)
        bucket_mb = 1.0 if compile else 0.05
        image_forward, text_forward = distributed.wrap_towers(model, ctx, compile=compile, bucket_mb=bucket_mb,
                                                              grad_compress=compress)
        image_ddp = image_forward._orig_mod if compile else image_forward
        assert isinstance(image_ddp, nn.parallel.DistributedDataParallel) and image_ddp.gradient_as_bucket_view
        assert image_ddp.bucket_bytes_cap == int(bucket_mb * 1024 * 1024)
        if text:
            text_ddp = text_forward._orig_mod if compile else text_forward
            assert isinstance(text_ddp, nn.parallel.DistributedDataParallel) and text_ddp.module is model.text
            # the image wrapper leaves the text tower to its own DDP: no gradient is reduced twice
            assert {name for name, _ in model.text.named_parameters(prefix="text")} <= \
                set(image_ddp.parameters_to_ignore)
        else:
            assert text_forward is None
        for _ in range(2):  # twice: the second backward fills the bucket views the first one left
            model.zero_grad(set_to_none=True)
            loss_of(image_forward, text_forward, model.logit_scale, *batch(rank)).backward()
        grads = {name: param.grad for name, param in model.named_parameters()}
        assert grads.keys() == expected.keys()
        if compress == "bf16":  # rounded to bf16 on the wire: each rank's part, then the sum (bf16's eps: 2 ** -7)
            for name, grad in grads.items():
                bound = 2 ** -8 * magnitude[name] + 2 ** -8 * expected[name].abs() + 1e-12
                assert ((grad - expected[name]).abs() <= bound).all(), name
                assert torch.equal(grad, grad.to(torch.bfloat16).float()), name
            assert any(not torch.equal(grad, expected[name]) for name, grad in grads.items())
        else:
            for name, grad in grads.items():
                torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, name=name: f"{name}: {m}")
        # gradients are views of the buckets: a few storages for all the reduced parameters
        storages = {param.grad.untyped_storage().data_ptr() for name, param in model.named_parameters()
                    if name != "logit_scale"}
        reduced = sum(1 for name, _ in model.named_parameters() if name != "logit_scale")
        assert len(storages) < reduced / 2, (len(storages), reduced)
    finally:
        distributed.teardown(ctx)


@pytest.mark.parametrize("text, compress, compile", [
    (False, "none", False), (True, "none", False), (True, "bf16", False),
    pytest.param(True, "none", True, marks=pytest.mark.slow),  # about a minute: dynamo in two CPU ranks
])
def test_ddp_buckets_compression_and_the_text_tower_on_two_ranks(text, compress, compile):
    fork_ranks(_rank_main, text, compress, compile)


def test_an_unknown_compression_is_refused():
    with pytest.raises(ConfigError, match="train.ddp_grad_compress='fp8'"):
        distributed.data_parallel(nn.Linear(2, 2), Distributed(world_size=2), grad_compress="fp8")
    with pytest.raises(ConfigError, match="train.ddp_grad_compress"):
        load_config(overrides=["train.ddp_grad_compress=fp8"])


def test_one_process_compiles_the_text_tower_too():
    model = towers(text=True)
    image_forward, text_forward = distributed.wrap_towers(model, Distributed(), compile=True)
    assert image_forward._orig_mod is model and text_forward._orig_mod is model.text


def _rank_train(rank: int, overrides: list[str], data, store, run) -> None:
    train(load_config(overrides=overrides), data, store, run, progress=False)


def test_the_trainer_takes_the_ddp_settings(synth_data, stores, tmp_path):
    """train.ddp_grad_compress=bf16 and train.ddp_bucket_mb through `lift-fast train` on two ranks: the
    run follows one process to bf16's rounding of the averaged gradient (its norm as logged), and
    not to float32's: the hook is on."""
    overrides = ["data.image_size=32", "model.depth=1", "train.steps=3", "train.batch_size=8", "train.lr=3e-3",
                 "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=0", "train.tensorboard=false",
                 "data.num_workers=0", "data.shuffle_window=2", "data.backend=pil"]
    single = tmp_path / "single"
    train(load_config(overrides=overrides), synth_data / "train", stores / "train", single, progress=False)
    run = tmp_path / "ddp"
    fork_ranks(_rank_train, overrides + ["train.ddp_grad_compress=bf16", "train.ddp_bucket_mb=1"],
               synth_data / "train", stores / "train", run)
    norms, expected = (_logged(folder, "grad_norm") for folder in (run, single))
    assert norms == pytest.approx(expected, rel=1e-2) and norms[0] != pytest.approx(expected[0], rel=1e-6)
    assert _logged(run, "loss") == pytest.approx(_logged(single, "loss"), rel=1e-2)


def _logged(run, name: str) -> list[float]:
    return [json.loads(line)[name] for line in (run / "metrics.jsonl").read_text().splitlines()]
