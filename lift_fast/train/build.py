"""The parts a training run is built from: model (image tower, and the CLIP baseline's text tower),
loss, optimiser, schedule, loader and the state restored from a checkpoint (`build_parts`).

train/loop.py runs the loop over them. model.text_tower=transformer (the CLIP baseline) attaches the
text tower (models/text_tower.py) to the image model as its `text` submodule, so that one module's
weights are saved, restored and optimised (same AdamW groups); under DDP the tower gets a
DistributedDataParallel of its own and is compiled like the image tower (train/distributed.py
`wrap_towers`), under fsdp it is sharded (`shard_model`); the loader then tokenises each
batch's raw captions with the tower's tokenizer (batch["tokens"]).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lift_fast.config import Config, ConfigError
from lift_fast.data.loader import Loader, build_loader
from lift_fast.device import peak_tflops, resolve_compile, resolve_precision
from lift_fast.kernels import ClipLoss, SigLipLoss, fused_projection_clip_loss
from lift_fast.models.flops import train_flops_per_sample
from lift_fast.models.vit import build_model
from lift_fast.plan.choose import choose_checkpointing
from lift_fast.train import distributed
from lift_fast.train.checkpoint import CheckpointWriter, load_checkpoint
from lift_fast.train.distributed import Distributed
from lift_fast.train.metrics import StepTally
from lift_fast.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# Signals that stop training after the current step, saving it: SIGTERM (preemption, scancel, the
# end of a SLURM time limit) and SIGUSR1 (SLURM's --signal=USR1@SECONDS warning ahead of it).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def build_loss(cfg: Config, ctx: Distributed, model: nn.Module | None = None) -> nn.Module:
    """The contrastive loss of train.loss. Under torch.distributed each rank's value is its part of
    the global-batch loss (local rows against all ranks' texts), so the mean over ranks is the
    global-batch loss and DDP's gradient average is its gradient. With model.fuse_projection, a
    FusedProjectionLoss over `model`'s last head Linear (ConfigError under train.parallel=fsdp)."""
    if cfg.model.fuse_projection:
        if cfg.train.parallel == "fsdp" and ctx.enabled:
            raise ConfigError("model.fuse_projection=true cannot run under train.parallel=fsdp: the fused loss reads the "
                              "head's last Linear weight outside the model's forward, where FSDP2 holds only this rank's "
                              "shard of it; use train.parallel=ddp or model.fuse_projection=false")
        return FusedProjectionLoss(model.head.fc2, cfg.train.loss, ctx.rank, ctx.world_size)
    if cfg.train.loss == "siglip":
        return SigLipLoss(rank=ctx.rank, world_size=ctx.world_size)
    return ClipLoss(local_loss=True, gather_with_grad=True, rank=ctx.rank, world_size=ctx.world_size)


class FusedProjectionLoss(nn.Module):
    """model.fuse_projection: the head's last Linear, the L2 norm and train.loss in one call
    (lift_fast.kernels.fused_projection_clip_loss) on the hidden states [b, H] the model returns with
    project=False, so no [b, D] image features are kept between forward and backward.

    The Linear's weights, cast to the hidden states' dtype (the compute dtype), take part in the
    loss; their gradients reach the fp32 master weights through the cast (and DDP all-reduces them
    as it does the logit scale's, used outside forward too).
    """

    def __init__(self, last: nn.Linear, loss: str, rank: int, world_size: int):
        super().__init__()
        self.last = [last]  # a list, not a submodule: the weights are the model's, saved and optimised there
        self.loss, self.rank, self.world_size = loss, rank, world_size

    def forward(self, image_hidden, text_embeddings, logit_scale, logit_bias=None, gathered_text_features=None):
        """image_hidden [b, H], text_embeddings [b, D] -> the 0-d loss (this rank's part under torch.distributed);
        gathered_text_features: every rank's text rows already gathered (a tensor or a start_text_gather handle)."""
        last, dtype = self.last[0], image_hidden.dtype
        bias = None if last.bias is None else last.bias.to(dtype)
        return fused_projection_clip_loss(image_hidden, last.weight.to(dtype), bias, text_embeddings, logit_scale,
                                          logit_bias, loss=self.loss, rank=self.rank, world_size=self.world_size,
                                          gathered_text_features=gathered_text_features)


def local_batch_size(cfg: Config, world_size: int) -> int:
    """train.batch_size (global) split over the ranks; ConfigError naming it when it does not split evenly."""
    batch_size = cfg.train.batch_size
    if batch_size % world_size:
        lower, higher = batch_size // world_size * world_size, (batch_size // world_size + 1) * world_size
        choices = f"{lower} or {higher}" if lower else f"{higher}"
        raise ConfigError(f"train.batch_size={batch_size} is the global batch and does not split evenly over the "
                          f"{world_size} ranks of this job (WORLD_SIZE={world_size}); use a multiple of "
                          f"{world_size}, e.g. train.batch_size={choices}")
    return batch_size // world_size


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn of the loader's workers: SIGTERM and SIGUSR1 are for the main process.

    SLURM and torchrun signal every process of the job, loader workers included; a worker killed by
    SIGTERM would make the loader raise in the main process while it saves. The main process stops
    the workers when it is done (or they see it gone and exit).
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@dataclass
class Parts:
    """What a run trains with, built by `build_parts`."""

    model: nn.Module  # the plain module: weights, logit_scale, optional logit_bias
    forward: nn.Module  # what the step calls: model wrapped (DDP) or sharded (FSDP2) and compiled as configured
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Loader
    precision: torch.dtype | None  # compute dtype (bf16), None for plain fp32
    flops_per_sample: int
    peak: float | None  # dense peak TFLOP/s of one device, when known
    sharded_precision: bool = False  # FSDP2 gathers the weights in `precision`, so the step runs without autocast
    text_tower: nn.Module | None = None  # CLIP mode: model.text (in its own DDP, compiled, as configured), on batch["tokens"]
    checkpoints: CheckpointWriter = field(default_factory=CheckpointWriter)  # background writes (train.checkpoint_async)


@dataclass
class Progress:
    """What the loop changes as it goes; a checkpoint saves step, nonfinite and the loader position."""

    step: int
    nonfinite: int = 0  # steps skipped for a NaN/inf loss or gradient, over the run, as of the last read-back
    skipped: int = 0  # samples skipped by the loader (data.on_error=skip), all ranks
    loss_value: float = float("nan")  # the loss (mean over ranks) of the last read-back's step
    saved_step: int = 0  # the newest checkpoint's step
    updating: bool = False  # inside optimizer.step(): the weights are neither the old nor the new ones
    tally: StepTally | None = None  # the step's numbers on the device, read back at logged steps (`_read_back`)
    agreement: distributed.Agreement | None = None  # the ranks' stop flag and skip count, read a step later

    def finished_step(self) -> int:
        """The last step whose update completed: what an interrupt may save."""
        return self.saved_step if self.updating else self.step


def build_parts(cfg: Config, ctx: Distributed, data_dir, embeddings_dir, manifest: dict, start_ckpt: Path | None,
                batch_size: int) -> tuple[Parts, Progress]:
    """Model (and text tower in CLIP mode), optimiser, schedule and loader on ctx.device, restored from
    `start_ckpt` when resuming; the Progress to start from. manifest: the checked store's (its dim is
    the joint width). Raises ConfigError for settings CLIP mode cannot run with
    (model.fuse_projection), and what the builders and load_checkpoint raise."""
    device = ctx.device
    precision = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)
    dim = int(manifest["dim"])
    # model.grad_checkpointing=auto becomes a checkpointing (policy, blocks) for this device here (the planner on CUDA)
    cfg = dataclasses.replace(cfg, model=choose_checkpointing(cfg, device, dim, ctx.world_size))
    model = build_model(cfg.model, cfg.data.image_size, dim, cfg.train.logit_scale_init).to(device)
    if cfg.model.init and start_ckpt is None:  # a resumed run takes the checkpoint's weights instead
        from lift_fast.models.pretrained import init_tower

        init_tower(model, cfg.model.init)
    if cfg.train.loss == "siglip":
        model.register_parameter("logit_bias", nn.Parameter(torch.tensor(-10.0, device=device)))
    tokenizer = attach_text_tower(model, cfg, ctx, dim) if cfg.model.text_tower == "transformer" else None
    # Sharded (fsdp) before the optimiser is built over the shards and the checkpoint loads into them.
    param_dtype = distributed.sharded_param_dtype(cfg.train.parallel, ctx, precision)
    forward, text_forward = distributed.wrap_towers(model, ctx, cfg.train.parallel,
                                                    compile=resolve_compile(cfg.train.compile, device),
                                                    param_dtype=param_dtype, bucket_mb=cfg.train.ddp_bucket_mb,
                                                    grad_compress=cfg.train.ddp_grad_compress)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    progress, state = Progress(step=0), None
    if start_ckpt is not None:
        state = load_checkpoint(start_ckpt, model, optimizer, scheduler)
        progress = Progress(step=state["step"], nonfinite=state["extra"].get("nonfinite_steps", 0),
                            saved_step=state["step"])
        log.info("resumed from %s at step %d", start_ckpt, progress.step)
    loader = build_loader(data_dir, embeddings_dir, split="train", batch_size=batch_size,
                          image_size=cfg.data.image_size, backend=cfg.data.backend, seed=cfg.train.seed,
                          rank=ctx.rank, world_size=ctx.world_size, num_workers=cfg.data.num_workers,
                          crop_scale=cfg.data.crop_scale, hflip=cfg.data.hflip, shuffle_window=cfg.data.shuffle_window,
                          start_step=progress.step, on_error=cfg.data.on_error, pin_memory=device.type == "cuda",
                          worker_init_fn=ignore_stop_signals, prefetch=cfg.data.prefetch, tokenizer=tokenizer,
                          caption_weights=cfg.data.caption_weights,
                          # uint8 images and store-dtype rows: the loop's DeviceFeed moves and prepares them
                          raw=True)
    _check_batch_size(cfg, loader)
    if state is not None:
        _check_loader_position(state["extra"].get("loader"), loader.state(progress.step), start_ckpt)
    flops = train_flops_per_sample(model.visual.spec, cfg.data.image_size, dim, batch_size * ctx.world_size,
                                   head_hidden=cfg.model.head_hidden, patch_dropout=cfg.model.patch_dropout,
                                   pooling=cfg.model.pooling, text=model.text.spec if tokenizer is not None else None)
    log.info("training FLOPs per sample: %.4g (%s)", flops,
             "image and text towers, CLIP mode" if tokenizer is not None else "image tower and head, LIFT mode")
    return Parts(model, forward, build_loss(cfg, ctx, model), optimizer, scheduler, loader, precision, flops,
                 peak_tflops(device, precision, cfg.train.peak_tflops), param_dtype is not None,
                 text_forward, CheckpointWriter(cfg.train.checkpoint_async)), progress


def attach_text_tower(model: nn.Module, cfg: Config, ctx: Distributed, dim: int):
    """model.text_tower=transformer: build the CLIP text tower for the joint width `dim` (seeded after
    the image tower, so LIFT mode's initial weights are unchanged) as `model.text`; returns its tokenizer.
    Raises ConfigError naming the setting CLIP mode cannot train with."""
    from lift_fast.models.text_tower import build_text_tower

    if cfg.model.fuse_projection:
        raise ConfigError("model.fuse_projection=true is for LIFT mode (frozen text embeddings); with "
                          "model.text_tower=transformer use model.fuse_projection=false")
    tower, tokenizer = build_text_tower(cfg.model, dim)
    model.text = tower.to(ctx.device)
    return tokenizer


def _check_batch_size(cfg: Config, loader: Loader) -> None:
    """Refuse a batch larger than the training set: an epoch would have no step."""
    samples, shards = loader.stream.samples, loader.shards
    if cfg.train.batch_size > samples:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the {samples} training samples "
                          f"({len(shards)} shard(s) in {shards[0].parent}); use train.batch_size={samples} or less")


def _check_loader_position(saved: dict | None, current: dict, checkpoint: Path) -> None:
    """Warn when the checkpoint's loader position was saved for another stream (other data, batch or
    shuffle window): the run goes on from the same step, but its samples are not the ones an
    uninterrupted run would have seen."""
    if saved is None:
        log.warning("%s holds no loader position (an older checkpoint): the data stream restarts at step %d of the "
                    "current stream", checkpoint, current["step"])
        return
    differ = [f"{name} {saved.get(name)} -> {value}" for name, value in current.items()
              if name != "step" and saved.get(name) != value]
    if differ:
        log.warning("%s: the data stream differs from the one it was saved with (%s); resuming at step %d of the new "
                    "stream, so the samples are not the ones an uninterrupted run would have seen",
                    checkpoint, ", ".join(differ), current["step"])
