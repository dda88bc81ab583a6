"""Checkpoints: `run/checkpoints/step_000100/` holding `model.safetensors` and `state.pt`.

A checkpoint is written into a hidden temporary folder (`.tmp_step_000100`), every file in it
fsynced, renamed into place and the parent fsynced (`lift_fast.atomic.publish_dir`), so neither a
crash nor a power loss leaves a half-written or empty checkpoint under a name that counts. Only
folders named `step_N` with a `model.safetensors` and a `state.pt` count as complete. A write that
fails (no space, a file-size limit) raises CheckpointWriteError naming the file; the previous
checkpoints stay as they were. `state.pt` holds optimizer, scheduler, step and RNG states and
is read with `torch.load(weights_only=True)`.

`CheckpointWriter` (train.checkpoint_async, on by default) takes the write off the training step: the
state is copied to host memory (pinned on CUDA, without waiting for the device) and a writer thread
writes it with the same guarantees while training goes on; one write at a time, and a failed write
is raised on the training thread at the next step. The files are those of the synchronous save, so
the format (docs/formats.md) does not depend on it; torch.distributed.checkpoint's async_save was
not used because it writes its own layout (.distcp files and a .metadata), not model.safetensors
and state.pt.

The files hold full tensors whatever the run's train.parallel: an FSDP2-sharded model's weights and
AdamW state are gathered to rank 0 to be saved (a collective: `save_checkpoint` must then run on
every rank) and, on resume, read by rank 0 and broadcast into the shards. So a checkpoint written
under fsdp resumes under ddp or in one process, loads into a plain model, and the other way round.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lift_fast.atomic import publish_dir
from lift_fast.train import RunFolderError
from lift_fast.train.distributed import is_sharded

# Gather a sharded model's full state to rank 0, on the CPU (the other ranks get empty dicts) ...
GATHER_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# ... and load one that rank 0 alone holds, broadcast into every rank's shards.
SCATTER_FULL = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)

log = logging.getLogger(__name__)

PATTERN = re.compile(r"step_(\d+)")
T = TypeVar("T")
# What a save leaves behind when it is killed: its temporary folder, or the replaced one set aside.
LEFTOVERS = (".tmp_step_*", ".old_step_*")


class CheckpointWriteError(RunFolderError, OSError):
    """A checkpoint file could not be written (no space left, a file-size limit, an I/O error): an
    OSError, and a RunFolderError so that the command line prints its message as one line.

    The message names the file and the newest complete checkpoint, which is kept.
    """


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if PATTERN.fullmatch(p.name) and (p / "model.safetensors").is_file()
             and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(PATTERN.fullmatch(p.name).group(1)))


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """The folder checkpoint `step` of a run is (or will be) saved in."""
    return checkpoint_dir(run_dir) / f"step_{step:06d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(folder: str | Path) -> int:
    """The step a checkpoint folder was saved at: from its weights' metadata (a folder of any name),
    else from a `step_N` folder name.

    Raises FileNotFoundError when the folder has no model.safetensors, RunFolderError when neither
    says the step.
    """
    folder = Path(folder)
    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights {path} do not exist")

    def recorded() -> str:
        with safe_open(str(path), framework="pt") as file:
            return (file.metadata() or {}).get("step", "")

    step = _read(path, recorded)
    if step.isdigit():
        return int(step)
    if match := PATTERN.fullmatch(folder.name):
        return int(match.group(1))
    raise RunFolderError(f"{path} records no step in its metadata and {folder.name} is not a step_N folder: "
                         "not a lift-fast checkpoint")


def rng_state() -> dict:
    """Torch's CPU (and CUDA) generator states; the trainer draws nothing from numpy or `random`."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(weights by parameter name, optimizer state in `optimizer.state_dict()`'s form), full tensors.

    For an FSDP2-sharded model this is a collective (every rank must call it): rank 0 gets the
    gathered tensors on the CPU, the other ranks two empty dicts. Otherwise the model's and the
    optimizer's own state dicts (no copies).
    """
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    weights = get_model_state_dict(model, options=GATHER_FULL)
    by_name = get_optimizer_state_dict(model, optimizer, options=GATHER_FULL)
    return weights, _indexed_optimizer_state(by_name) if by_name else {}


def _indexed_optimizer_state(by_name: dict) -> dict:
    """torch.distributed.checkpoint's optimizer state (keyed by parameter name) in the form of
    `optimizer.state_dict()` (keyed by the parameter's position over the groups), which state.pt holds."""
    names = [name for group in by_name["param_groups"] for name in group["params"]]
    position = {name: index for index, name in enumerate(names)}
    return {"state": {position[name]: value for name, value in by_name["state"].items()},
            "param_groups": [{**group, "params": [position[name] for name in group["params"]]}
                             for group in by_name["param_groups"]]}


def _named_optimizer_state(saved: dict, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> dict:
    """The inverse of `_indexed_optimizer_state`, naming positions after `optimizer`'s parameters.

    Raises RunFolderError naming `path` when the saved groups do not hold as many parameters as
    the optimizer's (another model), before any rank starts a collective.
    """
    names = {id(param): name for name, param in model.named_parameters()}
    ordered = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if saved_sizes != sizes:
        raise RunFolderError(f"{path}: the optimizer state does not fit this model (parameter groups of sizes "
                             f"{saved_sizes} in the file, {sizes} in the model)")
    name_of = dict(zip([index for group in saved["param_groups"] for index in group["params"]], ordered, strict=True))
    return {"state": {name_of[index]: value for index, value in saved["state"].items()},
            "param_groups": [{**group, "params": [name_of[index] for index in group["params"]]}
                             for group in saved["param_groups"]]}


class CheckpointWriter:
    """Saves checkpoints with the write off the training step (train.checkpoint_async).

    `save` gathers the state (a collective under fsdp), copies every tensor of it to host memory
    that it keeps from save to save (pinned on CUDA: the copies are queued on the current stream
    and the host does not wait for them; the next step's update comes after them on the stream),
    and hands the copy to a writer thread, which waits for the copies, then writes and publishes
    the checkpoint exactly as the synchronous save does (temporary folder, fsync, rename, fsync of
    the parent, pruning). Training goes on meanwhile. At most one write is in flight: a save waits
    for the one before. A write that failed is raised on the calling thread by the next
    `raise_failure` (the loop calls it every step) or `wait`, as the CheckpointWriteError the
    synchronous save would have raised. The thread is not a daemon: an interpreter that exits
    lets the write finish. background=False: `save` writes before it returns, from the live
    tensors (no copy), as `save_checkpoint` does.
    """

    def __init__(self, background: bool = True):
        self.background = background
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._buffers: list[torch.Tensor] = []  # host copies of the state's tensors, in traversal order

    @property
    def in_flight(self) -> bool:
        """Whether a background write has not finished yet."""
        return self._thread is not None and self._thread.is_alive()

    def save(self, run_dir: str | Path, step: int, model: nn.Module, optimizer, scheduler, *,
             extra: dict | None = None, keep: int = 2, write: bool = True, wait: bool = False) -> Path:
        """Checkpoint `step` of `model`, `optimizer` and `scheduler` (and `extra`, e.g. the loader position)
        into `run_dir`, keeping the newest `keep` complete ones; returns its folder (complete once written).

        In the background unless the writer is synchronous or `wait` (the final save, an interrupt's):
        then it writes from the live tensors and returns once the checkpoint is published. write=False
        writes nothing: the other ranks of a job whose model is FSDP2-sharded call it too, since
        gathering the state takes every rank.
        Raises CheckpointWriteError naming the file for this write when it waits, and for the
        previous background write, which it waits for first, when that one failed.
        """
        self.wait()
        weights, optimizer_state = full_state(model, optimizer)
        final = checkpoint_path(run_dir, step)
        if not write:
            return final
        state = {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                 "rng": rng_state(), "extra": extra or {}}
        if not self.background or wait:  # written from the live tensors: nothing may change them meanwhile
            weights = {name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}
            _write_checkpoint(run_dir, step, weights, state, keep)
            return final
        # the state as of this step, whatever the next steps do to the live tensors (a gathered
        # fsdp state is on the host already, fresh tensors, but its optimizer entries may not be)
        (weights, state), copied = self._host_copy((weights, state))
        self._thread = threading.Thread(target=self._write, args=(run_dir, step, weights, state, keep, copied),
                                        name=f"checkpoint-step-{step}")
        self._thread.start()
        return final

    def raise_failure(self) -> None:
        """Raise the error of a background write that has finished and failed (once); never waits."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self, *, log_failure: bool = False) -> None:
        """Wait for the background write in flight, if any; raise its error, or with `log_failure`
        log it instead (when another error is on its way out already)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        failure, self._failure = self._failure, None
        if failure is not None and log_failure:
            log.error("%s", failure)
        elif failure is not None:
            raise failure

    def _write(self, run_dir, step: int, weights: dict, state: dict, keep: int, copied: torch.cuda.Event | None):
        started = time.perf_counter()
        try:
            if copied is not None:
                copied.synchronize()  # the device-to-host copies queued by `save`
            _write_checkpoint(run_dir, step, weights, state, keep)
        except BaseException as err:  # noqa: BLE001 - raised again on the training thread
            self._failure = err
        else:
            log.info("checkpoint step %d written in the background in %.2f s", step, time.perf_counter() - started)

    def _host_copy(self, tree):
        """`tree` (dicts, lists and tuples of tensors and plain values) with every tensor copied into the
        kept host buffers (pinned for CUDA tensors); returns (the copy, a CUDA event recorded after the
        copies, or None when every copy is done)."""
        used, pending = 0, False

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal used, pending
            tensor = tensor.detach()
            pinned = tensor.is_cuda
            buffer = self._buffers[used] if used < len(self._buffers) else None
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype or \
                    buffer.is_pinned() != pinned:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
                self._buffers[used:used + 1] = [buffer]
            buffer.copy_(tensor, non_blocking=pinned)
            used, pending = used + 1, pending or pinned
            return buffer

        copied = _map_tensors(tree, copy)
        del self._buffers[used:]
        event = None
        if pending:
            event = torch.cuda.Event()
            event.record()
        return copied, event


def _map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """obj with fn applied to every tensor in it, through dicts, lists and tuples (new containers)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {key: _map_tensors(value, fn) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(value, fn) for value in obj)
    return obj


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer, scheduler, *,
                    extra: dict | None = None, keep: int = 2, write: bool = True) -> Path:
    """Write checkpoint `step` atomically, before returning, and delete all but the newest `keep`
    complete ones (`CheckpointWriter(background=False).save`).

    Returns the checkpoint folder. write=False writes nothing: the other ranks of a job whose model
    is FSDP2-sharded call it too, since gathering the state takes every rank (`full_state`).
    """
    return CheckpointWriter(background=False).save(run_dir, step, model, optimizer, scheduler, extra=extra, keep=keep,
                                                   write=write)


def _write_checkpoint(run_dir: str | Path, step: int, weights: dict, state: dict, keep: int) -> None:
    """Write weights (host tensors) and state into a temporary folder, publish it as checkpoint `step`,
    prune all but the newest `keep`. Raises CheckpointWriteError naming the file that failed."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for pattern in LEFTOVERS:  # of a save that was killed (one writer, one write at a time: none is in progress)
        for leftover in root.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = root / f".tmp_step_{step:06d}"
    tmp.mkdir()
    try:
        _write_file(tmp / "model.safetensors", lambda path: save_file(weights, str(path), metadata={"step": str(step)}),
                    run_dir, step)
        _write_file(tmp / "state.pt", lambda path: torch.save(state, path), run_dir, step)
        publish_dir(tmp, checkpoint_path(run_dir, step))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in complete_checkpoints(run_dir)[:-keep]:
        _delete(old)


def _delete(checkpoint: Path) -> None:
    """Delete an old checkpoint folder: renamed to a leftover name first, so that a kill part-way
    through leaves no half-deleted folder under a checkpoint's name (the next save removes it)."""
    doomed = checkpoint.with_name(f".old_{checkpoint.name}.{os.getpid()}")
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _write_file(path: Path, write: Callable[[Path], object], run_dir: str | Path, step: int) -> None:
    """write(path); any failure raised again as CheckpointWriteError naming `path`.

    safetensors and torch.save report a full disk or a file-size limit without the file's name
    (torch.save as "unexpected pos ..."), so the name and what is kept are added here.
    """
    try:
        write(path)
    except Exception as err:
        kept = latest_checkpoint(run_dir)
        raise CheckpointWriteError(
            f"{path}: writing checkpoint step {step} failed ({type(err).__name__}: {err}); "
            f"{f'the newest complete checkpoint {kept} is kept' if kept else 'the run has no complete checkpoint yet'}. "
            "Free space on that file system (or raise its quota or file-size limit) and rerun with --resume auto") from err


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Load `model.safetensors` from a checkpoint folder into `model` (a plain, unsharded one).

    Raises FileNotFoundError when the file is missing, and RunFolderError (a ValueError) naming the
    file and the tensors when it does not fit the model: missing or unexpected names, or shapes
    that differ (the checkpoint was made with another model or image size).
    """
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights {path} do not exist")
    weights = _read(path, lambda: load_file(str(path)))
    _check_weights_fit(model, {name: list(tensor.shape) for name, tensor in weights.items()}, path)
    model.load_state_dict(weights)


def _read(path: Path, read: Callable[[], T]) -> T:
    """read(), with any failure but a missing file raised again as RunFolderError naming `path` and
    the checkpoint before it, to resume from instead.

    safetensors and torch.load name neither the file nor what to do ("incomplete metadata, file not
    fully covered", "failed finding central directory"), and a damaged checkpoint would otherwise stop
    `--resume auto` with a traceback.
    """
    try:
        return read()
    except FileNotFoundError:
        raise
    except Exception as err:
        folder = path.parent
        match = PATTERN.fullmatch(folder.name)
        earlier = [p for p in complete_checkpoints(folder.parent.parent) if p != folder
                   and (match is None or int(PATTERN.fullmatch(p.name).group(1)) < int(match.group(1)))]
        hint = (f"resume from the one before it with --resume {earlier[-1]}, or delete {folder}" if earlier
                else f"delete {folder} (no earlier checkpoint) and start again")
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RunFolderError(f"{path} cannot be read ({type(err).__name__}: {reason}): the checkpoint was damaged "
                             f"after it was saved (cut short, overwritten); {hint}") from err


def _check_weights_fit(model: nn.Module, shapes: dict[str, list[int]], path: Path) -> None:
    """Raise RunFolderError naming `path` unless `shapes` (the file's) are the model's names and shapes.

    Checked here rather than left to load_state_dict, whose RuntimeError names neither file nor setting.
    A sharded model's state dict holds DTensors, whose shapes are the full ones.
    """
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    reshaped = [f"{name} {shape} in the file, {expected[name]} in the model"
                for name, shape in shapes.items() if name in expected and shape != expected[name]]
    missing = [name for name in expected if name not in shapes]
    unexpected = [name for name in shapes if name not in expected]
    problems = []
    if reshaped:
        problems.append(f"shapes differ: {'; '.join(reshaped[:5])}{' ...' if len(reshaped) > 5 else ''}")
    if missing:
        problems.append(f"missing {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}")
    if problems:
        raise RunFolderError(f"{path} does not fit the model built from the run's config ({', '.join(problems)}); "
                             "the checkpoint was made with other model or data settings")


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states; returns the saved state (step, extra).

    For an FSDP2-sharded model every rank must call it: each checks the files against the model,
    rank 0 reads the tensors and broadcasts them into the shards. Raises FileNotFoundError for a
    missing file and RunFolderError naming the file that does not fit (on every rank alike).
    """
    folder = Path(folder)
    if is_sharded(model):
        state = _load_sharded(folder, model, optimizer)
    else:
        load_weights(model, folder)
        state = _read(folder / "state.pt", lambda: torch.load(folder / "state.pt", weights_only=True, map_location="cpu"))
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:
            raise RunFolderError(f"{folder / 'state.pt'}: the optimizer state does not fit this model ({err})") from None
    scheduler.load_state_dict(state["scheduler"])
    _apply_schedule(scheduler)
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def _apply_schedule(scheduler) -> None:
    """Set the next step's learning rate from the schedule being resumed with, not the saved optimizer's.

    The optimizer state holds the rate the old run's schedule chose for the next step; a resume that
    re-stretches the cosine (train.schedule_steps) would run one step at it. LambdaLR's own formula,
    so an unchanged schedule gives the very same floats.
    """
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    rates = [base * factor(scheduler.last_epoch) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs,
                                                                          strict=True)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports


def _load_sharded(folder: Path, model: nn.Module, optimizer) -> dict:
    """Weights and optimizer state of `folder` into an FSDP2-sharded model; returns state.pt's contents.

    Every rank checks the names and shapes (from the safetensors header, without reading the
    tensors) and the optimizer groups, so a checkpoint that does not fit fails on all ranks before
    any collective; rank 0 alone reads the tensors (state.pt is memory-mapped, so the other ranks
    read only its small entries) and broadcasts them into the shards.
    """
    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights {path} do not exist")

    def header_shapes() -> dict[str, list[int]]:
        with safe_open(str(path), framework="pt") as file:
            return {name: list(file.get_slice(name).get_shape()) for name in file.keys()}  # noqa: SIM118 (not a dict)

    _check_weights_fit(model, _read(path, header_shapes), path)
    state = _read(folder / "state.pt",
                  lambda: torch.load(folder / "state.pt", weights_only=True, map_location="cpu", mmap=True))
    optimizer_state = _named_optimizer_state(state["optimizer"], model, optimizer, folder / "state.pt")
    main = dist.get_rank() == 0
    set_model_state_dict(model, load_file(str(path)) if main else {}, options=SCATTER_FULL)
    set_optimizer_state_dict(model, optimizer, optimizer_state if main else {}, options=SCATTER_FULL)
    return state
