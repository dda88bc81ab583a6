"""Run `lift-fast` with a fault injected: the process SIGKILLs itself at a chosen point of training.

    python tests/fault_driver.py KILL -- train --data D --embeddings E --run R [--resume auto] key=value ...

KILL is one of
  before:STEP     right before the optimizer update of step STEP (1-based; forward and backward done)
  after:STEP      right after it (the weights in memory are updated, the step is neither counted nor saved)
  save:STEP:FILE  while checkpoint STEP writes FILE (model.safetensors or state.pt) into its temporary
                  folder: half of the file's bytes are written, then the kill
  none            no fault (the plain command)

Steps are counted from the checkpoint `--resume auto` continues from, read from the run folder as
the command would. SIGKILL leaves no chance to clean up, as a power cut or the OOM killer would.
Used by tests/test_faults.py; lift_fast is imported from the environment the test runs in.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def first_step(argv: list[str]) -> int:
    """The step the command starts from: that of the newest complete checkpoint under --resume auto."""
    from lift_fast.train.checkpoint import checkpoint_step, latest_checkpoint

    if "--resume" not in argv:
        return 0
    latest = latest_checkpoint(Path(argv[argv.index("--run") + 1]))
    return checkpoint_step(latest) if latest is not None else 0


def inject_update_kill(when: str, step: int, start: int) -> None:
    """SIGKILL before or after the optimizer update of step `step`, through torch's global step hooks."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    updates = {"count": start}

    def pre(optimizer, args, kwargs):
        updates["count"] += 1
        if when == "before" and updates["count"] == step:
            kill()

    def post(optimizer, args, kwargs):
        if when == "after" and updates["count"] == step:
            kill()

    register_optimizer_step_pre_hook(pre)
    register_optimizer_step_post_hook(post)


def inject_save_kill(step: int, file: str) -> None:
    """SIGKILL half-way through writing `file` of checkpoint `step`."""
    import torch
    from safetensors.torch import save as safetensors_bytes

    from lift_fast.train import checkpoint

    def half_then_kill(path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        kill()

    if file == "model.safetensors":
        real = checkpoint.save_file

        def save_file(tensors, filename, metadata=None):
            if metadata and int(metadata["step"]) == step:
                half_then_kill(filename, safetensors_bytes(tensors, metadata))
            return real(tensors, filename, metadata=metadata)

        checkpoint.save_file = save_file
    elif file == "state.pt":
        real_save = torch.save

        def save(obj, path, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("step") == step and Path(path).name == "state.pt":
                import io

                buffer = io.BytesIO()
                real_save(obj, buffer)
                half_then_kill(path, buffer.getvalue())
            return real_save(obj, path, *args, **kwargs)

        checkpoint.torch.save = save
    else:
        raise SystemExit(f"fault_driver: save kill of {file!r}: expected model.safetensors or state.pt")


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        raise SystemExit(__doc__)
    fault, argv = sys.argv[1], sys.argv[3:]
    kind, _, rest = fault.partition(":")
    if kind in ("before", "after"):
        inject_update_kill(kind, int(rest), first_step(argv))
    elif kind == "save":
        step, _, file = rest.partition(":")
        inject_save_kill(int(step), file)
    elif kind != "none":
        raise SystemExit(f"fault_driver: unknown fault {fault!r}")
    from lift_fast.cli import main as lift_fast_main

    return lift_fast_main(argv)


if __name__ == "__main__":
    sys.exit(main())
