"""Checkpoint writes off the training step (train.checkpoint_async, CheckpointWriter): the loop keeps
stepping while a deliberately slowed write runs, the checkpoint holds the state of its own step,
one write at a time, a failed write stops the run at a later step naming the file, and an
interrupt waits for the write in flight. The fault tests (tests/test_faults.py, test_atomic.py)
run with the writer on, as it is by default."""

from __future__ import annotations

import errno
import os
import signal
import threading

import pytest
import torch
from safetensors.torch import load_file

from lift_fast.config import load_config
from lift_fast.train import checkpoint as checkpoint_module
from lift_fast.train import loop as loop_module
from lift_fast.train.checkpoint import CheckpointWriteError, CheckpointWriter, complete_checkpoints
from lift_fast.train.loop import TrainingInterrupted, train

TINY = ["data.image_size=32", "model.depth=1", "train.steps=10", "train.batch_size=16", "train.lr=3e-3",
        "train.warmup_steps=3", "train.log_every=1", "data.num_workers=0", "data.shuffle_window=4", "data.backend=pil",
        "train.checkpoint_every=4", "train.keep_checkpoints=5", "train.tensorboard=false"]
TIMEOUT = 60  # seconds a blocked write waits for the loop before the test gives up on it


def tiny_config(*extra: str):
    return load_config(overrides=TINY + list(extra))


class Timeline:
    """What happened, in order: 'step N' as the loop starts each step, 'published N' as a checkpoint
    folder is renamed into place (by whichever thread writes it)."""

    def __init__(self, monkeypatch):
        self.events: list[str] = []
        self.changed = threading.Condition()
        step, publish = loop_module._train_step, checkpoint_module.publish_dir

        def counted_step(cfg, ctx, parts, progress, *args, **kwargs):
            self.add(f"step {progress.step + 1}")
            return step(cfg, ctx, parts, progress, *args, **kwargs)

        def counted_publish(tmp, final):
            self.before_publish(int(final.name.removeprefix("step_")))
            result = publish(tmp, final)
            self.add(f"published {int(final.name.removeprefix('step_'))}")
            return result

        monkeypatch.setattr(loop_module, "_train_step", counted_step)
        monkeypatch.setattr(checkpoint_module, "publish_dir", counted_publish)
        self.before_publish = lambda step: None

    def add(self, event: str) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def wait_for(self, event: str) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: event in self.events, timeout=TIMEOUT)


def test_the_loop_steps_on_while_a_slow_write_runs(synth_data, stores, tmp_path, monkeypatch):
    """Checkpoint 4's write is held until the loop has started step 6: a write on the step's path
    would never see step 6 (the test would time out). Its files hold step 4's state, equal to a run
    whose step waits for each write."""
    sync_run = tmp_path / "sync"
    train(tiny_config("train.checkpoint_async=false"), synth_data / "train", stores / "train", sync_run,
          progress=False)
    timeline = Timeline(monkeypatch)
    waited = []
    timeline.before_publish = lambda step: waited.append(timeline.wait_for("step 6")) if step == 4 else None
    run = tmp_path / "async"
    result = train(tiny_config(), synth_data / "train", stores / "train", run, progress=False)

    assert waited == [True]
    events = timeline.events
    assert events.index("step 5") < events.index("step 6") < events.index("published 4")
    assert events.index("published 4") < events.index("published 8") < events.index("published 10")
    assert result["step"] == 10 and [p.name for p in complete_checkpoints(run)] == \
        ["step_000004", "step_000008", "step_000010"]
    for step in (4, 8, 10):  # the state of the checkpoint's own step, not of the later steps it was written during
        name = f"step_{step:06d}"
        written, expected = (load_file(str(r / "checkpoints" / name / "model.safetensors")) for r in (run, sync_run))
        assert all(torch.equal(written[key], expected[key]) for key in expected), name
        state = torch.load(run / "checkpoints" / name / "state.pt", weights_only=True)
        reference = torch.load(sync_run / "checkpoints" / name / "state.pt", weights_only=True)
        assert state["step"] == step and state["extra"] == reference["extra"]
        for index, moments in reference["optimizer"]["state"].items():
            assert all(torch.equal(state["optimizer"]["state"][index][key], value) for key, value in moments.items())
    assert not list((run / "checkpoints").glob(".tmp_*"))


def test_a_failed_background_write_stops_the_run_naming_the_file(synth_data, stores, tmp_path, monkeypatch):
    """A full disk while checkpoint 4 is written in the background: the run stops with the
    CheckpointWriteError a synchronous save raises (the file, the checkpoint kept) at a later step, at
    the latest when step 8's save waits for it, and leaves no temporary folder."""
    real = checkpoint_module.save_file

    def no_space_at_step_4(tensors, filename, metadata=None):
        if metadata["step"] == "4":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", no_space_at_step_4)
    run = tmp_path / "run"
    with pytest.raises(CheckpointWriteError) as caught:
        train(tiny_config(), synth_data / "train", stores / "train", run, progress=False)
    message = str(caught.value)
    assert str(run / "checkpoints" / ".tmp_step_000004" / "model.safetensors") in message
    assert "No space left on device" in message and "no complete checkpoint yet" in message
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 4 <= max(steps) <= 8 and max(steps) < 10  # the run stopped before its end


def test_sigterm_waits_for_the_write_in_flight_then_saves_its_step(synth_data, stores, tmp_path, monkeypatch):
    """SIGTERM in step 5 while checkpoint 4 is still being written: the run saves step 5 after
    checkpoint 4 is published, and both are complete."""
    timeline = Timeline(monkeypatch)
    release = threading.Event()
    timeline.before_publish = lambda step: release.wait(TIMEOUT) if step == 4 else None
    loss, calls = loop_module.contrastive_loss, []

    def signalled(*args):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Timer(0.5, release.set).start()  # the write ends after the loop has stopped
        return loss(*args)

    monkeypatch.setattr(loop_module, "contrastive_loss", signalled)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as err:
        train(tiny_config(), synth_data / "train", stores / "train", run, progress=False)
    assert err.value.step == 5
    assert timeline.events.index("published 4") < timeline.events.index("published 5")
    assert [p.name for p in complete_checkpoints(run)] == ["step_000004", "step_000005"]


def tiny_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_one_write_at_a_time_the_next_save_waits(tmp_path, monkeypatch):
    release, published = threading.Event(), []
    publish = checkpoint_module.publish_dir

    def held(tmp, final):
        if final.name == "step_000001":
            release.wait(TIMEOUT)
        published.append(final.name)
        return publish(tmp, final)

    monkeypatch.setattr(checkpoint_module, "publish_dir", held)
    writer, state = CheckpointWriter(), tiny_state()
    writer.save(tmp_path / "run", 1, *state)
    assert writer.in_flight
    second = threading.Thread(target=writer.save, args=(tmp_path / "run", 2, *state))
    second.start()
    second.join(0.5)
    assert second.is_alive() and not (tmp_path / "run" / "checkpoints" / ".tmp_step_000002").exists()
    release.set()
    second.join(TIMEOUT)
    writer.wait()
    assert published == ["step_000001", "step_000002"]


def test_the_copy_is_taken_at_save_and_its_buffers_are_kept(tmp_path, monkeypatch):
    """The state is copied when save is called (a change to the weights afterwards is not written),
    into host buffers that the next save reuses instead of allocating again."""
    release = threading.Event()
    publish = checkpoint_module.publish_dir
    monkeypatch.setattr(checkpoint_module, "publish_dir", lambda tmp, final: (release.wait(TIMEOUT), publish(tmp, final))[1])
    model, optimizer, scheduler = tiny_state()
    writer = CheckpointWriter()
    expected = model.weight.detach().clone()
    writer.save(tmp_path / "run", 1, model, optimizer, scheduler)
    buffers = [buffer.data_ptr() for buffer in writer._buffers]
    with torch.no_grad():
        model.weight.add_(1.0)  # the next steps, while the write runs
    release.set()
    writer.wait()
    assert torch.equal(load_file(str(tmp_path / "run" / "checkpoints" / "step_000001" / "model.safetensors"))["weight"],
                       expected)
    writer.save(tmp_path / "run", 2, model, optimizer, scheduler)
    writer.wait()
    assert [buffer.data_ptr() for buffer in writer._buffers] == buffers
    assert len(buffers) >= 2 + 3  # weight, bias; AdamW's step, exp_avg, exp_avg_sq per parameter; the RNG state
