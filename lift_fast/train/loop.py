"""`lift-fast train`: the ViT + LIFT head trained with InfoNCE against fixed caption embeddings.

Builders live with what they build (model in models/, data in data/, optimiser in train/optim.py);
this module wires them and runs the loop. Outputs in the run folder: config.yaml, metrics.jsonl,
checkpoints/step_NNNNNN/.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lift_fast.config import Config, save_config
from lift_fast.data.loader import build_loader
from lift_fast.embed.store import check_manifest, read_manifest
from lift_fast.kernels import clip_loss, siglip_loss
from lift_fast.models.vit import build_model
from lift_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lift_fast.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# Settings of the embed stage that decide what a store row means; train and eval refuse a store
# whose manifest differs in any of them from the run's config.
STORE_FIELDS = ("model", "pooling", "prompt", "max_length", "normalize")


def expected_store(cfg: Config) -> dict:
    """What the run's config asks of an embedding store, in manifest terms."""
    return {name: getattr(cfg.embed, name) for name in STORE_FIELDS}


def check_store(embeddings_dir: str | Path, cfg: Config) -> dict:
    """The store's manifest, after checking it against cfg.embed; raises StoreMismatchError."""
    manifest = read_manifest(embeddings_dir)
    check_manifest(manifest, expected_store(cfg), Path(embeddings_dir))
    return manifest


def contrastive_loss(cfg: Config, image_features, text_embeddings, logit_scale, logit_bias):
    if cfg.train.loss == "siglip":
        return siglip_loss(image_features, text_embeddings, logit_scale, logit_bias)
    return clip_loss(image_features, text_embeddings, logit_scale)


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, appended and flushed."""

    def __init__(self, path: Path, resume_step: int):
        # On resume, drop lines past the checkpoint so the file reads as one uninterrupted run.
        if path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def train(cfg: Config, data_dir: str | Path, embeddings_dir: str | Path, run_dir: str | Path, *,
          resume: str | None = None, progress: bool = True) -> dict:
    """Train the image tower; returns {"step", "loss", "seconds", "samples_per_second", "checkpoint"}.

    resume: None (start fresh; refuses a run folder that already has checkpoints), "auto" (continue
    from the newest complete checkpoint, or start fresh) or a checkpoint folder.
    Raises ConfigError/StoreError/ShardError naming the bad setting, file or key.
    """
    run_dir = Path(run_dir)
    start_ckpt = _resume_point(run_dir, resume)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = check_store(embeddings_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    model = build_model(cfg.model, cfg.data.image_size, int(manifest["dim"]), cfg.train.logit_scale_init).to(device)
    logit_bias = torch.nn.Parameter(torch.tensor(-10.0, device=device)) if cfg.train.loss == "siglip" else None
    if logit_bias is not None:
        model.register_parameter("logit_bias", logit_bias)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    step = 0
    if start_ckpt is not None:
        step = load_checkpoint(start_ckpt, model, optimizer, scheduler)["step"]
        log.info("resumed from %s at step %d", start_ckpt, step)
    loader = build_loader(data_dir, embeddings_dir, split="train", batch_size=cfg.train.batch_size,
                          image_size=cfg.data.image_size, backend=cfg.data.backend, seed=cfg.train.seed + step,
                          num_workers=cfg.data.num_workers, crop_scale=cfg.data.crop_scale, hflip=cfg.data.hflip,
                          shuffle_buffer=cfg.data.shuffle_buffer, on_error=cfg.data.on_error)
    metrics = MetricsLog(run_dir / "metrics.jsonl", step)
    batches = iter(loader)
    bar = tqdm(total=cfg.train.steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    started, window_start, window_samples, data_wait, skipped, loss_value = time.perf_counter(), time.perf_counter(), 0, 0.0, 0, float("nan")
    model.train()
    while step < cfg.train.steps:
        wait_start = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - wait_start
        images = batch["images"].to(device, non_blocking=True)
        text_embeddings = batch["text_embeddings"].to(device, non_blocking=True)
        if not manifest["normalized"]:
            text_embeddings = torch.nn.functional.normalize(text_embeddings, dim=-1)
        skipped += batch["skipped"]

        loss = contrastive_loss(cfg, model(images), text_embeddings, model.logit_scale.exp(), logit_bias)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(cfg.train.logit_scale_max))
        step += 1
        window_samples += images.shape[0]
        loss_value = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - window_start
            metrics.write({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                           "logit_scale": model.logit_scale.exp().item(),
                           "samples_per_second": window_samples / elapsed, "data_wait_fraction": data_wait / elapsed,
                           "skipped": skipped, "elapsed_s": time.perf_counter() - started})
            window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
            save_checkpoint(run_dir, step, model, optimizer, scheduler, keep=cfg.train.keep_checkpoints)
    bar.close()
    metrics.close()
    final = save_checkpoint(run_dir, step, model, optimizer, scheduler, keep=cfg.train.keep_checkpoints)
    seconds = time.perf_counter() - started
    return {"step": step, "loss": loss_value, "seconds": seconds, "skipped": skipped, "checkpoint": str(final)}


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
