"""`lift-fast train`: the ViT + LIFT head trained with InfoNCE against fixed caption embeddings, or
(model.text_tower=transformer, the CLIP baseline) jointly with a text tower on the raw captions.

Builders live with what they build (model in models/, data in data/, optimiser in train/optim.py,
process group in train/distributed.py, device switches in lift_fast/device.py, logs in
train/metrics.py); train/build.py puts the parts together and restores them from a checkpoint, and
this module runs the loop over them. Outputs in the run folder:
config.yaml, metrics.jsonl, tensorboard/, checkpoints/step_NNNNNN/. The run folder is written only
once every input has been checked (store, shards, model settings, the checkpoint to resume from),
so a refused start leaves nothing behind. Ctrl-C, SIGTERM or SIGUSR1 saves the last finished step
before the run stops.

Under torchrun every rank runs `train`, as DDP or, with train.parallel=fsdp, FSDP2; rank 0 alone
writes the run folder, the others wait for it (under fsdp, after helping gather the state) at each
checkpoint. docs/training.md has the launch commands and what is logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lift_fast.atomic import write_json
from lift_fast.config import Config, check_changes, load_config, load_run_config, save_config
from lift_fast.device import autocast
from lift_fast.kernels import start_text_gather
from lift_fast.train import NonFiniteLossError, distributed
from lift_fast.train.build import (  # noqa: F401 (Parts, Progress, build_loss, local_batch_size: re-exported)
    STOP_SIGNALS,
    Parts,
    Progress,
    build_loss,
    build_parts,
    local_batch_size,
)
from lift_fast.train.checkpoint import checkpoint_path, checkpoint_step, latest_checkpoint
from lift_fast.train.distributed import Distributed
from lift_fast.train.feed import DeviceFeed
from lift_fast.train.metrics import MetricsLog, RunLog, StepTally, Throughput, utilisation
from lift_fast.train.optim import resumed_schedule
from lift_fast.train.store_check import check_store

log = logging.getLogger(__name__)

# Settings a resumed run may change; any other would not fit the checkpoint or would silently make
# the run a different one than its config.yaml says. train.schedule_steps: a deliberate re-stretch of
# the cosine (optim.resumed_schedule).
RESUME_SETTINGS = ("train.steps", "train.schedule_steps", "train.log_every", "train.checkpoint_every",
                   "train.keep_checkpoints", "train.threads", "data.num_workers", "data.prefetch", "data.backend",
                   "train.precision", "train.compile", "train.tensorboard", "train.max_nonfinite", "train.parallel",
                   "train.checkpoint_async", "train.ddp_bucket_mb", "train.ddp_grad_compress")

__all__ = ["MetricsLog", "TrainingInterrupted", "check_store", "run_config", "train"]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT), SIGTERM or SIGUSR1.

    signum: the signal; step: the newest saved step, the one `--resume auto` continues from;
    checkpoint: its folder (None when the run has none yet).
    """

    def __init__(self, signum: int, step: int = 0, checkpoint: Path | None = None):
        super().__init__(signum, step, checkpoint)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def run_config(run_dir: str | Path, resume: str | None, config_path: str | Path | None = None,
               overrides: Iterable[str] = ()) -> Config:
    """The config `lift-fast train` runs with.

    Fresh: defaults, then the file at config_path, then dotted overrides. Resuming (`resume` finds
    a checkpoint): the run's saved config.yaml, then the file, then the overrides, which may change
    only RESUME_SETTINGS. Raises ConfigError naming each key that may not change (saved vs asked),
    and FileExistsError/FileNotFoundError as `train` does for `resume`.
    """
    checkpoint = _resume_point(Path(run_dir), resume)
    saved = _saved_config(Path(run_dir), checkpoint) if checkpoint is not None else None
    if saved is None:
        return load_config(config_path, overrides)
    return load_run_config(saved, config_path, overrides, allowed=RESUME_SETTINGS, action="resuming a run")


def contrastive_loss(loss_fn: nn.Module, image_features, text_embeddings, logit_scale, logit_bias,
                     gathered_text_features=None):
    """One step's loss: image_features [b, D], text_embeddings [b, D], logit_scale (exponentiated);
    gathered_text_features: every rank's text rows, gathered (or on their way) since the step began."""
    if gathered_text_features is None:
        return loss_fn(image_features, text_embeddings, logit_scale, logit_bias)
    return loss_fn(image_features, text_embeddings, logit_scale, logit_bias,
                   gathered_text_features=gathered_text_features)


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """While open, SIGTERM and SIGUSR1 append to the yielded list instead of killing the process
    (main thread only: elsewhere Python cannot install handlers, and the list stays empty)."""
    requests: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {signum: signal.signal(signum, lambda signum, frame: requests.append(signum)) for signum in STOP_SIGNALS}
    try:
        yield requests
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def train(cfg: Config, data_dir: str | Path, embeddings_dir: str | Path, run_dir: str | Path, *,
          resume: str | None = None, progress: bool = True) -> dict:
    """Train the image tower (and in CLIP mode the text tower), in this process or, under torchrun, as
    one rank of a DDP or FSDP2 job (either in CLIP mode too).

    resume: None (start fresh; refuses a run folder that already has checkpoints), "auto" (continue
    from the newest complete checkpoint, or start fresh) or a checkpoint folder. When resuming, cfg
    may differ from the run's saved config.yaml only in RESUME_SETTINGS (see `run_config`).
    Under torchrun (RANK, WORLD_SIZE, ... set) each rank takes train.batch_size / WORLD_SIZE
    samples a step and the loss is that of the global batch; rank 0 writes the run folder.
    Returns {"step": last step, "loss": its loss (mean over ranks), "seconds": time in the loop,
    "samples_per_second": global samples per second over this call's steps after the first,
    "compile_seconds": the first step's time, "nonfinite_steps": steps skipped for a NaN/inf
    loss over the run, "skipped": samples skipped (data.on_error=skip, all ranks), "checkpoint":
    the final checkpoint folder}.
    Raises ConfigError/StoreError/ShardError naming the bad setting, file or key, and RunFolderError
    for a checkpoint that does not fit; all before the run folder is written. Raises
    NonFiniteLossError after train.max_nonfinite non-finite steps in a row (checked at logged steps:
    see `_read_back`). On Ctrl-C, SIGTERM or
    SIGUSR1 it saves the last finished step and raises TrainingInterrupted.
    """
    run_dir = Path(run_dir)
    batch_size = local_batch_size(cfg, distributed.launch_world_size())
    start_ckpt = _resume_point(run_dir, resume)
    if start_ckpt is not None and (saved := _saved_config(run_dir, start_ckpt)) is not None:
        saved_cfg = load_config(saved)
        check_changes(saved_cfg, cfg, RESUME_SETTINGS, source=saved, action="resuming a run")
        # the cosine keeps the length the run started with, whatever train.steps is now
        cfg = dataclasses.replace(cfg, train=resumed_schedule(saved_cfg.train, cfg.train, checkpoint_step(start_ckpt)))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # The store is checked after joining the process group: rank 0 alone hashes the encoder's weights
    # (or takes the hash from the manifest) and broadcasts it (train/store_check.py).
    ctx = distributed.setup()
    try:
        manifest = check_store(embeddings_dir, cfg)
        return _train(cfg, ctx, data_dir, embeddings_dir, run_dir, manifest, start_ckpt, batch_size, progress)
    finally:
        distributed.teardown(ctx)


def _train(cfg: Config, ctx: Distributed, data_dir, embeddings_dir, run_dir: Path, manifest: dict,
           start_ckpt: Path | None, batch_size: int, show_progress: bool) -> dict:
    parts, progress = build_parts(cfg, ctx, data_dir, embeddings_dir, manifest, start_ckpt, batch_size)
    # Everything is checked and the checkpoint has loaded: only now is the run folder written.
    run_log = None
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        # the store the run trains on, as checked: export and the CLIP_benchmark adapter name the encoder from it
        write_json(run_dir / "store_manifest.json", manifest)
        run_log = RunLog(run_dir, progress.step, tensorboard=cfg.train.tensorboard)
    distributed.barrier(ctx)

    batches = iter(parts.loader)  # starts the worker processes
    feed = DeviceFeed(ctx.device, image_dtype=parts.precision or torch.float32)  # host batch -> device, no host sync
    bar = tqdm(total=cfg.train.steps, initial=progress.step, desc="train", unit="step",
               disable=not show_progress or not ctx.is_main, dynamic_ncols=True)
    speed = Throughput()
    parts.model.train()
    try:
        with _stop_requests() as stop_signals:
            while progress.step < cfg.train.steps:
                parts.checkpoints.raise_failure()  # a background checkpoint write that failed stops the run here
                wait_start = time.perf_counter()
                batch = feed(next(batches))
                speed.data_wait += time.perf_counter() - wait_start
                assert batch["step"] == progress.step, f"loader out of step: batch {batch['step']} at {progress.step}"
                step = progress.step + 1
                last = step == cfg.train.steps
                logged = step % cfg.train.log_every == 0 or last
                checkpoint = bool(cfg.train.checkpoint_every) and step % cfg.train.checkpoint_every == 0 and not last
                # Every rank reads back at the same steps (logged or saved ones), so they stop together.
                stop = _train_step(cfg, ctx, parts, progress, batch, stop_signals, manifest, run_dir,
                                   read_now=logged or checkpoint)
                speed.step_done(len(batch["keys"]) * ctx.world_size)
                bar.update(1)
                if logged or checkpoint:
                    numbers = _read_back(cfg, ctx, parts, progress, run_dir)  # raises at train.max_nonfinite
                if logged:
                    bar.set_postfix(loss=f"{progress.loss_value:.3f}", refresh=False)
                    if run_log is not None:
                        run_log.write(_record(parts, progress, speed, numbers, ctx))
                if checkpoint:
                    _save(ctx, run_dir, parts, progress, progress.step, cfg.train.keep_checkpoints)
                if stop and not last:  # every rank saw the same flag, at this same step
                    raise TrainingInterrupted(stop_signals[0] if stop_signals else signal.SIGTERM)
    except KeyboardInterrupt as err:
        raise _save_on_interrupt(err, ctx, run_dir, parts, progress, cfg.train.keep_checkpoints) from None
    except BaseException:
        parts.checkpoints.wait(log_failure=True)  # a write in flight finishes; its error is logged, this one raised
        raise
    finally:
        # Drop the iterator here, which stops its workers: a traceback that holds this frame would
        # keep them alive until exit, where multiprocessing's SIGTERM (ignored by them) cannot end them.
        batches = None
        bar.close()
        if run_log is not None:
            run_log.close()
    _save(ctx, run_dir, parts, progress, progress.step, cfg.train.keep_checkpoints, wait=True)
    return {"step": progress.step, "loss": progress.loss_value, **speed.summary(),
            "nonfinite_steps": progress.nonfinite, "skipped": progress.skipped,
            "checkpoint": str(checkpoint_path(run_dir, progress.step))}


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the torch RNG for step `step` on rank `rank` (the step's random draws: patch dropout).

    Seeding every step makes those draws a function of (seed, step, rank): a resumed run draws what an
    uninterrupted one would whatever RNG state the checkpoint holds, and the ranks of a job, which
    start from one seed so that their initial weights agree, do not draw the same masks.
    """
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % 2**64
    return mixed >> 1  # torch.manual_seed takes up to 2**63 - 1 here


def _train_step(cfg: Config, ctx: Distributed, parts: Parts, progress: Progress, batch: dict, stop_signals: list[int],
                manifest: dict, run_dir: Path, *, read_now: bool = True) -> bool:
    """One optimiser step on `batch`; updates `progress`. Returns whether any rank asked to stop.

    Nothing here waits for the device: the loss and gradient norm go into `progress.tally` (see
    StepTally), a non-finite one skips the update on the device (fused AdamW's found_inf, as
    GradScaler sets it; the step still counts, so the schedule and the data move on), and the ranks'
    stop flag and skip count arrive a step later (`distributed.Agreement`), or at once when
    `read_now` (a logged or saved step, which reads back anyway). The loop reads the rest back
    (`_read_back`) at logged steps only.
    """
    device, model = ctx.device, parts.model
    if progress.tally is None:
        progress.tally = StepTally(device, cfg.train.max_nonfinite, progress.nonfinite)
        progress.agreement = distributed.Agreement(ctx)
    torch.manual_seed(step_seed(cfg.train.seed, progress.step, ctx.rank))  # patch dropout's draws
    images = batch["images"].to(device, non_blocking=True)  # [b, 3, H, W]; the loop's batch is on the device already
    # One compute dtype for the loss, whatever autocast did: CUDA autocast runs F.normalize in float32,
    # so the features leave the model in float32 there and the loss's GEMMs would be float32 ones.
    compute_dtype = parts.precision or torch.float32
    gathered = None
    if parts.text_tower is None:  # LIFT mode: the store's rows of these samples [b, D], known before the forward
        text_embeddings = batch["text_embeddings"].to(device, non_blocking=True)
        if not manifest["normalized"]:  # in float32: the rows arrive in the store's dtype (float16)
            text_embeddings = torch.nn.functional.normalize(text_embeddings.float(), dim=-1)
        text_embeddings = text_embeddings.to(compute_dtype)
        if ctx.world_size > 1:  # the frozen rows' all-gather runs while the image tower computes (docs/loss.md)
            gathered = start_text_gather(text_embeddings, ctx.world_size)
    with autocast(device, None if parts.sharded_precision else parts.precision):
        image_features = parts.forward(images, project=not cfg.model.fuse_projection)  # [b, D] (hidden [b, H] fused)
        if parts.text_tower is not None:  # CLIP mode: text features [b, D] with gradients, from the raw captions
            text_embeddings = parts.text_tower(batch["tokens"].to(device, non_blocking=True))
    loss = contrastive_loss(parts.loss_fn, image_features.to(compute_dtype), text_embeddings.to(compute_dtype),
                            model.logit_scale.exp(), getattr(model, "logit_bias", None), gathered)
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distributed.reduce_replicated_gradients(model, ctx)
    mean_loss = progress.agreement.reduce(loss, bool(stop_signals), batch["skipped"])
    grad_norm = distributed.clip_grad_norm(model.parameters(), cfg.train.grad_clip) if cfg.train.grad_clip > 0 else None
    tally, found_inf = progress.tally.updated(progress.step + 1, mean_loss, grad_norm)
    progress.updating = True  # an interrupt from here to the step count may leave half-updated weights
    _optimizer_step(parts.optimizer, found_inf)
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(cfg.train.logit_scale_max))
    parts.scheduler.step()
    stop, skipped = progress.agreement.collect(now=read_now)
    progress.skipped += skipped
    progress.tally.values = tally
    progress.step += 1
    progress.updating = False
    return stop


def _optimizer_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """optimizer.step(), skipped where found_inf is 1: on the device for a fused optimizer (its kernel
    reads found_inf and takes back the step count, as under GradScaler), else decided on the host,
    which waits for the device (the one host sync of such a step)."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf
        optimizer.step()
    elif not found_inf.item():
        optimizer.step()


def _read_back(cfg: Config, ctx: Distributed, parts: Parts, progress: Progress, run_dir: Path) -> dict:
    """The one host read of a logged (or saved) step: the tally and the logit scale, in one copy.

    Updates progress.loss_value and progress.nonfinite, warns about the non-finite steps since the
    last read-back, and raises NonFiniteLossError when train.max_nonfinite steps in a row were reached
    at any step since: train.max_nonfinite is checked here, at logged steps, so a run stops at the
    first logged step after the limit (with train.log_every=1, at the limit itself), naming the step
    that reached it. Returns StepTally's fields plus logit_scale (grad_norm None without clipping).
    """
    numbers, (log_scale,) = progress.tally.read(parts.model.logit_scale)
    new = numbers["nonfinite"] - progress.nonfinite
    progress.loss_value, progress.nonfinite = numbers["loss"], numbers["nonfinite"]
    numbers["logit_scale"] = math.exp(log_scale)
    if cfg.train.grad_clip <= 0:
        numbers["grad_norm"] = None
    if new and ctx.is_main:
        log.warning("step %d: %d non-finite step(s) since the last read-back, the first at step %d; their updates "
                    "were skipped (%d in a row now, train.max_nonfinite=%d)", progress.step, new,
                    numbers["first_nonfinite"], numbers["in_a_row"], cfg.train.max_nonfinite)
    if limit := numbers["limit_step"]:
        limit_loss, limit_norm = numbers["limit_loss"], numbers["limit_grad_norm"]
        what = f"loss {limit_loss}" if not math.isfinite(limit_loss) else f"gradient norm {limit_norm}"
        newest = latest_checkpoint(run_dir)
        seen = "" if limit == progress.step else f" (read back at step {progress.step}, the first logged step after it)"
        raise NonFiniteLossError(
            f"step {limit}: {what}, the {cfg.train.max_nonfinite}th non-finite step in a row, which reaches "
            f"train.max_nonfinite={cfg.train.max_nonfinite}; training stopped{seen}. The weights were last updated at "
            f"step {limit - cfg.train.max_nonfinite}{f'; the newest checkpoint is {newest}' if newest else ''}. Lower "
            f"train.lr or raise train.warmup_steps, check the data, or raise train.max_nonfinite to ride out longer "
            f"runs of bad steps.", limit)
    return numbers


def _record(parts: Parts, progress: Progress, speed: Throughput, numbers: dict, ctx: Distributed) -> dict:
    """One metrics.jsonl line from a read-back's numbers: the DESIGN fields, speed (closing its
    window), utilisation, skips."""
    record = {"step": progress.step, "loss": numbers["loss"], "lr": parts.scheduler.get_last_lr()[0],
              "logit_scale": numbers["logit_scale"], **speed.window(), "skipped": progress.skipped,
              "nonfinite_steps": progress.nonfinite, "elapsed_s": time.perf_counter() - speed.started}
    if numbers["grad_norm"] is not None:
        record["grad_norm"] = numbers["grad_norm"]
    record.update(utilisation(record["samples_per_second"], parts.flops_per_sample, parts.peak, ctx.device,
                               ctx.world_size))
    if not speed.compile_reported:  # once, in the first line: the first step's time, and what tflops counts per sample
        record["compile_seconds"] = speed.first_seconds
        record["flops_per_sample"] = parts.flops_per_sample
        speed.compile_reported = True
    return record


def _write_checkpoint(ctx: Distributed, run_dir: Path, parts: Parts, progress: Progress, step: int, keep: int,
                      wait: bool = False) -> Path:
    """Checkpoint step `step` with the run's extra state (non-finite count, loader position): rank 0
    writes, in the background unless `wait` or train.checkpoint_async=false; the others only take
    part in gathering a sharded model's state."""
    return parts.checkpoints.save(run_dir, step, parts.model, parts.optimizer, parts.scheduler,
                                  extra={"nonfinite_steps": progress.nonfinite, "loader": parts.loader.state(step)},
                                  keep=keep, write=ctx.is_main, wait=wait)


def _save(ctx: Distributed, run_dir: Path, parts: Parts, progress: Progress, step: int, keep: int,
          wait: bool = False) -> Path:
    """Rank 0 writes checkpoint `step` (weights, optimiser, schedule, RNG, loader position), in the
    background unless `wait` (the final save); all wait for it to be handed over (`_write_checkpoint`).
    Every rank takes part in gathering a sharded (fsdp) model's state."""
    checkpoint = _write_checkpoint(ctx, run_dir, parts, progress, step, keep, wait)
    distributed.barrier(ctx)
    progress.saved_step = step
    return checkpoint


def _save_on_interrupt(err: KeyboardInterrupt, ctx: Distributed, run_dir: Path, parts: Parts, progress: Progress,
                       keep: int) -> TrainingInterrupted:
    """Save the last finished step (rank 0) unless it is already the newest checkpoint; the exception to raise.

    The last finished step is the one before an update the interrupt cut in half, whose weights
    cannot be trusted. A TrainingInterrupted raised by the loop stopped every rank at the same step,
    so all take part (gathering a sharded model's state, waiting for rank 0's write). A Ctrl-C
    reaches the ranks anywhere, so nobody waits: rank 0 saves what it has, except under fsdp, where
    rank 0 holds only its shards and gathering them needs every rank; the newest complete
    checkpoint is then the one to resume from.
    """
    signum = getattr(err, "signum", signal.SIGINT)
    parts.checkpoints.wait()  # a background write in flight finishes first (and raises if it failed)
    if progress.tally is not None:  # the non-finite count as of the last finished step, for the checkpoint
        progress.nonfinite = progress.tally.read()[0]["nonfinite"]
    finished = progress.finished_step()
    agreed = isinstance(err, TrainingInterrupted)
    sharded = ctx.enabled and distributed.is_sharded(parts.model)
    if finished > progress.saved_step and (agreed or not sharded):
        checkpoint = checkpoint_path(run_dir, finished)
        if ctx.is_main or agreed:
            checkpoint = _write_checkpoint(ctx, run_dir, parts, progress, finished, keep, wait=True)
        if ctx.is_main:
            log.warning("interrupted: saved step %d in %s", finished, checkpoint)
        if agreed:
            distributed.barrier(ctx)
        return TrainingInterrupted(signum, finished, checkpoint)
    checkpoint = latest_checkpoint(run_dir)
    if finished > progress.saved_step and ctx.is_main:
        log.warning("interrupted by Ctrl-C under train.parallel=fsdp: rank 0 cannot gather the sharded state on its "
                    "own, so step %d is not saved; %s", finished,
                    f"--resume auto continues from {checkpoint}" if checkpoint else "the run has no checkpoint yet")
    return TrainingInterrupted(signum, progress.saved_step if checkpoint is not None else 0, checkpoint)


def _saved_config(run_dir: Path, checkpoint: Path) -> Path | None:
    """The config.yaml a checkpoint was trained with: the run folder's, else the checkpoint's own run's."""
    for candidate in (run_dir / "config.yaml", checkpoint.parent.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def _resume_point(run_dir: Path, resume: str | None) -> Path | None:
    latest = latest_checkpoint(run_dir)
    if resume is None:
        if latest is not None:
            raise FileExistsError(f"run folder {run_dir} already has checkpoints (newest {latest.name}); "
                                  "pass --resume auto to continue it, or choose a new --run folder")
        return None
    if resume == "auto":
        return latest
    folder = Path(resume)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no model.safetensors)")
    return folder
