"""Fault injection for training (issue 14, docs/reliability.md): processes SIGKILLed at random steps
and in the middle of a checkpoint write, and checkpoint writes that fail for lack of space, each
followed by `--resume auto`; every run must end bitwise equal to an uninterrupted one.

Each run is a `lift-fast train` subprocess (through tests/fault_driver.py, which injects the fault),
a 12-step tiny model checkpointed every 2 steps. Slow: 12 subprocesses of a few seconds (mostly
importing torch).
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lift_fast.config import load_config
from lift_fast.models.vit import build_model
from lift_fast.train.checkpoint import checkpoint_step, complete_checkpoints, latest_checkpoint, load_checkpoint
from lift_fast.train.optim import build_optimizer, build_scheduler

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("fault_driver.py")
STEPS, EVERY = 12, 2
SETTINGS = ["data.image_size=32", "model.depth=1", f"train.steps={STEPS}", "train.batch_size=16", "train.lr=3e-3",
            "train.warmup_steps=3", "train.log_every=1", "data.num_workers=0", "data.shuffle_window=4",
            "data.backend=pil", f"train.checkpoint_every={EVERY}", f"train.keep_checkpoints={STEPS}",
            "train.tensorboard=false"]


def lift_fast_train(run: Path, synth_data: Path, stores: Path, fault: str = "none", *,
                    file_limit: int | None = None) -> subprocess.CompletedProcess:
    """`lift-fast train ... --resume auto` with `fault` injected (see fault_driver.py), optionally
    under a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so that write() fails with EFBIG)."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    command = [sys.executable, str(DRIVER), fault, "--", "train", "--data", str(synth_data / "train"),
               "--embeddings", str(stores / "train"), "--run", str(run), "--resume", "auto", *SETTINGS]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size if file_limit else None)


def weights(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {record["step"]: record["loss"] for record in records}


def assert_same_run(run: Path, reference: Path) -> None:
    """The final weights are bitwise those of the uninterrupted run, and so is every logged loss."""
    final, expected = weights(run), weights(reference)
    assert final.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(final[name], expected[name])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    assert losses(run) == losses(reference)


def assert_leftovers_gone(run: Path) -> None:
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []


def finished(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]


def killed(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == -signal.SIGKILL, f"expected SIGKILL, got {done.returncode}: {done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def reference(synth_data, stores, tmp_path_factory) -> Path:
    """The uninterrupted 12-step run, every checkpoint kept."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    finished(lift_fast_train(run, synth_data, stores))
    assert [checkpoint_step(p) for p in complete_checkpoints(run)] == list(range(EVERY, STEPS + 1, EVERY))
    return run


def stopped_after(reference: Path, step: int, run: Path) -> Path:
    """A copy of the reference run as a run stopped after checkpoint `step` would leave it (its later
    metrics.jsonl lines are dropped by the resume, as after a kill)."""
    shutil.copytree(reference, run)
    for checkpoint in complete_checkpoints(run):
        if checkpoint_step(checkpoint) > step:
            shutil.rmtree(checkpoint)
    return run


def test_sigkill_at_three_random_steps_then_resume_is_bitwise_exact(reference, synth_data, stores, tmp_path):
    rng = random.Random(2506_04209)
    kills = [(rng.choice(["before", "after"]), step) for step in sorted(rng.sample(range(2, STEPS + 1), 3))]
    run = tmp_path / "run"
    for when, step in kills:
        killed(lift_fast_train(run, synth_data, stores, f"{when}:{step}"))
        # the update of `step` was under way (or just applied in memory): the newest checkpoint is the
        # last one before it, and metrics.jsonl ends at step - 1. Checkpoints are written in the
        # background (train.checkpoint_async): a kill in the steps right after a saved one may come
        # before that write is published, which leaves the one before it as the newest
        newest = latest_checkpoint(run)
        last_saved = (step - 1) // EVERY * EVERY
        assert (checkpoint_step(newest) if newest else 0) in {last_saved, max(last_saved - EVERY, 0)}, (when, step)
        assert max(losses(run)) == step - 1, (when, step)
    finished(lift_fast_train(run, synth_data, stores))
    assert_same_run(run, reference)


@pytest.mark.parametrize("file", ["model.safetensors", "state.pt"])
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(reference, synth_data, stores, tmp_path, file):
    run = stopped_after(reference, 4, tmp_path / "run")
    killed(lift_fast_train(run, synth_data, stores, f"save:6:{file}"))
    root = run / "checkpoints"
    partial = root / ".tmp_step_000006" / file
    assert partial.is_file() and 0 < partial.stat().st_size  # the half-written file, under the temporary name
    assert not (root / "step_000006").exists()
    assert [p.name for p in complete_checkpoints(run)] == ["step_000002", "step_000004"]
    # the previous checkpoint is chosen and loads into the run's model
    newest = latest_checkpoint(run)
    assert newest.name == "step_000004"
    cfg = load_config(run / "config.yaml")
    model = build_model(cfg.model, cfg.data.image_size, 384, cfg.train.logit_scale_init)
    optimizer = build_optimizer(model, cfg.train)
    assert load_checkpoint(newest, model, optimizer, build_scheduler(optimizer, cfg.train))["step"] == 4
    finished(lift_fast_train(run, synth_data, stores))
    assert_leftovers_gone(run)
    assert_same_run(run, reference)


@pytest.mark.parametrize("file", ["model.safetensors", "state.pt"])
def test_write_past_the_file_size_limit_names_the_file_and_keeps_the_checkpoint(reference, synth_data, stores,
                                                                                tmp_path, file):
    run = stopped_after(reference, 4, tmp_path / "run")
    previous = run / "checkpoints" / "step_000004"
    sizes = {name: (previous / name).stat().st_size for name in ("model.safetensors", "state.pt")}
    assert sizes["model.safetensors"] < sizes["state.pt"]
    # a limit below `file` but above everything written before it (config.yaml, metrics.jsonl, the weights)
    limit = sizes["model.safetensors"] // 2 if file == "model.safetensors" else sum(sizes.values()) // 2
    before = {p.name: p.stat().st_mtime_ns for p in previous.iterdir()}
    done = lift_fast_train(run, synth_data, stores, file_limit=limit)
    assert done.returncode == 2, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("lift-fast train: error: "), done.stderr[-3000:]
    assert str(run / "checkpoints" / ".tmp_step_000006" / file) in message
    assert "writing checkpoint step 6 failed" in message and f"{previous} is kept" in message
    if file == "model.safetensors":
        assert "File too large" in message  # safetensors passes the OS error on; torch.save does not
    # nothing half-written counts, the previous checkpoints are untouched, no temporary is left
    assert [p.name for p in complete_checkpoints(run)] == ["step_000002", "step_000004"]
    assert {p.name: p.stat().st_mtime_ns for p in previous.iterdir()} == before
    assert_leftovers_gone(run)
    if file == "state.pt":  # (the weights were written in full, under the temporary name) the run goes on exactly
        finished(lift_fast_train(run, synth_data, stores))
        assert_same_run(run, reference)

