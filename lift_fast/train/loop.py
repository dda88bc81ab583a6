"""`lift-fast train`: the ViT + LIFT head trained with InfoNCE against fixed caption embeddings.

Builders live with what they build (model in models/, data in data/, optimiser in train/optim.py);
this module wires them and runs the loop. Outputs in the run folder: config.yaml, metrics.jsonl,
checkpoints/step_NNNNNN/. The run folder is written only once every input has been checked (store,
shards, model settings, the checkpoint to resume from), so a refused start leaves nothing behind.
Ctrl-C or SIGTERM saves the last finished step before the run stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from lift_fast.config import Config, ConfigError, check_changes, load_config, load_run_config, save_config
from lift_fast.data.loader import build_loader
from lift_fast.embed.encoder import resolve_model, weights_sha256
from lift_fast.embed.store import EMBED_SETTINGS, check_manifest, read_manifest
from lift_fast.kernels import clip_loss, siglip_loss
from lift_fast.models.vit import build_model
from lift_fast.train.checkpoint import (
    RunFolderError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lift_fast.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# Settings a resumed run may change; any other would not fit the checkpoint or would silently make
# the run a different one than its config.yaml says.
RESUME_SETTINGS = ("train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                   "train.threads", "data.num_workers")


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT) or SIGTERM.

    signum: the signal; step: the newest saved step, the one `--resume auto` continues from;
    checkpoint: its folder (None when the run has none yet).
    """

    def __init__(self, signum: int, step: int = 0, checkpoint: Path | None = None):
        super().__init__(signum, step, checkpoint)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def expected_store(cfg: Config) -> dict:
    """What the run's config asks of an embedding store, in manifest terms.

    The embed settings (EMBED_SETTINGS), and when embed.model resolves to a folder on this machine
    (as the encoder loader resolves it) the sha256 of its weights and that folder: the same weights
    named differently (the bundled alias, a path) make the same rows. Otherwise the name is compared.
    """
    expected = {name: getattr(cfg.embed, name) for name in EMBED_SETTINGS}
    try:
        path, _ = resolve_model(cfg.embed.model)
        expected.update(path=str(path), weights_sha256=weights_sha256(path))
    except FileNotFoundError:  # not on this machine: only the name is known
        pass
    return expected


def check_store(embeddings_dir: str | Path, cfg: Config) -> dict:
    """The store's manifest, after checking it against cfg.embed; raises StoreError/StoreMismatchError."""
    manifest = read_manifest(embeddings_dir)
    check_manifest(manifest, expected_store(cfg), Path(embeddings_dir))
    return manifest


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


def contrastive_loss(cfg: Config, image_features, text_embeddings, logit_scale, logit_bias):
    if cfg.train.loss == "siglip":
        return siglip_loss(image_features, text_embeddings, logit_scale, logit_bias)
    return clip_loss(image_features, text_embeddings, logit_scale)


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, appended and flushed.

    On resume, lines past the checkpoint are dropped so the file reads as one uninterrupted run; a
    cut-off last line (a crash mid-write) is dropped too. Any other unreadable line is a
    RunFolderError naming the file and line.
    """

    def __init__(self, path: Path, resume_step: int):
        if path.exists():
            kept = self._records_up_to(path, resume_step) if resume_step > 0 else []
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = path.open("a", encoding="utf-8")

    @staticmethod
    def _records_up_to(path: Path, resume_step: int) -> list[str]:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise RunFolderError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        lines = text.splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
                if not isinstance(step, int):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                if number == len(lines) and not text.endswith("\n"):
                    log.warning("%s: dropping its cut-off last line (written when the run stopped)", path)
                    continue
                raise RunFolderError(f"{path}: line {number} is not a metrics record (a JSON object with an "
                                     f"integer step): {line[:80]!r}") from None
            if step <= resume_step:
                kept.append(line)
        return kept

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@contextlib.contextmanager
def _sigterm_requests() -> Iterator[list[int]]:
    """While open, SIGTERM appends to the yielded list instead of killing the process (main thread only)."""
    requests: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: requests.append(signum))
    try:
        yield requests
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: Config, data_dir: str | Path, embeddings_dir: str | Path, run_dir: str | Path, *,
          resume: str | None = None, progress: bool = True) -> dict:
    """Train the image tower.

    resume: None (start fresh; refuses a run folder that already has checkpoints), "auto" (continue
    from the newest complete checkpoint, or start fresh) or a checkpoint folder. When resuming, cfg
    may differ from the run's saved config.yaml only in RESUME_SETTINGS (see `run_config`).
    Returns {"step": last step, "loss": its loss, "seconds": time in the loop, "samples_per_second":
    the mean over this call's steps, "skipped": samples skipped (data.on_error=skip), "checkpoint":
    the final checkpoint folder}.
    Raises ConfigError/StoreError/ShardError naming the bad setting, file or key, and RunFolderError
    for a checkpoint that does not fit; all before the run folder is written. On Ctrl-C or SIGTERM it
    saves the last finished step and raises TrainingInterrupted.
    """
    run_dir = Path(run_dir)
    start_ckpt = _resume_point(run_dir, resume)
    if start_ckpt is not None and (saved := _saved_config(run_dir, start_ckpt)) is not None:
        check_changes(load_config(saved), cfg, RESUME_SETTINGS, source=saved, action="resuming a run")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = check_store(embeddings_dir, cfg)

    torch.manual_seed(cfg.train.seed)
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
    _check_batch_size(cfg, loader.dataset.shards, manifest, embeddings_dir)
    # Everything is checked and the checkpoint has loaded: only now is the run folder written.
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    metrics = MetricsLog(run_dir / "metrics.jsonl", step)
    batches = iter(loader)  # starts the worker processes, which must keep the default SIGTERM action
    bar = tqdm(total=cfg.train.steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    started, window_start, window_samples, data_wait, skipped, loss_value = time.perf_counter(), time.perf_counter(), 0, 0.0, 0, float("nan")
    saved_step, run_samples, updating = step, 0, False
    model.train()
    try:
        with _sigterm_requests() as sigterm:
            while step < cfg.train.steps:
                if sigterm:  # checked once per step, between steps, where the state is consistent
                    raise TrainingInterrupted(signal.SIGTERM)
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
                updating = True  # an interrupt from here to the step count may leave half-updated weights
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(cfg.train.logit_scale_max))
                step += 1
                updating = False
                window_samples += images.shape[0]
                run_samples += images.shape[0]
                loss_value = loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)

                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    elapsed = time.perf_counter() - window_start
                    metrics.write({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                                   "logit_scale": model.logit_scale.exp().item(),
                                   "samples_per_second": window_samples / elapsed,
                                   "data_wait_fraction": data_wait / elapsed, "skipped": skipped,
                                   "elapsed_s": time.perf_counter() - started})
                    window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
                    save_checkpoint(run_dir, step, model, optimizer, scheduler, keep=cfg.train.keep_checkpoints)
                    saved_step = step
    except KeyboardInterrupt as err:
        bar.close()
        metrics.close()
        raise _save_on_interrupt(err, run_dir, step if not updating else saved_step, saved_step,
                                 (model, optimizer, scheduler), cfg.train.keep_checkpoints) from None
    bar.close()
    metrics.close()
    final = save_checkpoint(run_dir, step, model, optimizer, scheduler, keep=cfg.train.keep_checkpoints)
    seconds = time.perf_counter() - started
    return {"step": step, "loss": loss_value, "seconds": seconds,
            "samples_per_second": run_samples / seconds if run_samples else 0.0, "skipped": skipped,
            "checkpoint": str(final)}


def _save_on_interrupt(err: KeyboardInterrupt, run_dir: Path, finished: int, saved_step: int, state: tuple,
                       keep: int) -> TrainingInterrupted:
    """Save step `finished` unless it is already the newest checkpoint; the exception to raise.

    finished: the last step whose update completed (saved_step when the interrupt came in the
    middle of an update, whose weights cannot be trusted).
    """
    signum = getattr(err, "signum", signal.SIGINT)
    if finished > saved_step:
        checkpoint = save_checkpoint(run_dir, finished, *state, keep=keep)
        log.warning("interrupted: saved step %d in %s", finished, checkpoint)
        return TrainingInterrupted(signum, finished, checkpoint)
    checkpoint = latest_checkpoint(run_dir)
    return TrainingInterrupted(signum, saved_step if checkpoint is not None else 0, checkpoint)


def _check_batch_size(cfg: Config, shards: list[Path], manifest: dict, embeddings_dir: str | Path) -> None:
    """Refuse a batch larger than the training set: the loader drops partial batches and would yield none."""
    samples = sum(manifest["shards"][shard.stem]["count"] for shard in shards)
    if cfg.train.batch_size > samples:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the {samples} training samples "
                          f"({len(shards)} shard(s), counted in {Path(embeddings_dir) / 'manifest.json'}); "
                          f"use train.batch_size={samples} or less")


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
