"""Checkpoints: `run/checkpoints/step_000100/` holding `model.safetensors` and `state.pt`.

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash never
leaves a half-written checkpoint under a name that counts. Only folders with a `model.safetensors`
and a `state.pt` count as complete. `state.pt` holds optimizer, scheduler, step and RNG states and
is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lift_fast.train import RunFolderError

PATTERN = re.compile(r"step_(\d+)")


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


def rng_state() -> dict:
    """Torch's CPU (and CUDA) generator states; the trainer draws nothing from numpy or `random`."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer, scheduler, *,
                    extra: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep` complete ones."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "extra": extra or {}}
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Load `model.safetensors` from a checkpoint folder into `model`.

    Raises FileNotFoundError when the file is missing, and RunFolderError (a ValueError) naming the
    file and the tensors when it does not fit the model: missing or unexpected names, or shapes
    that differ (the checkpoint was made with another model or image size).
    """
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights {path} do not exist")
    weights = load_file(str(path))
    expected = model.state_dict()
    # Checked here rather than left to load_state_dict, whose RuntimeError names neither file nor setting.
    reshaped = [f"{name} {list(tensor.shape)} in the file, {list(expected[name].shape)} in the model"
                for name, tensor in weights.items() if name in expected and tensor.shape != expected[name].shape]
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
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
    model.load_state_dict(weights)


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states; returns the saved state (step, extra).

    Raises FileNotFoundError for a missing file and RunFolderError naming the file that does not fit.
    """
    folder = Path(folder)
    load_weights(model, folder)
    state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:
        raise RunFolderError(f"{folder / 'state.pt'}: the optimizer state does not fit this model ({err})") from None
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state
