"""Durable writes: the temporary file is fsynced before the rename and the folder after it; a folder
(a checkpoint) is published with every file fsynced, then renamed, then its parent fsynced; a
checkpoint write that fails names the file; a kill while pruning leaves nothing that counts."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lift_fast.atomic import atomic_write, fsync_dir, publish_dir, write_json
from lift_fast.train import RunFolderError
from lift_fast.train import checkpoint as checkpoint_module
from lift_fast.train.checkpoint import (
    CheckpointWriteError,
    checkpoint_step,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


@pytest.fixture
def events(monkeypatch):
    """Record every fsync (as ("fsync", path of the descriptor)) and rename (as ("rename", src, dst))."""
    log: list[tuple] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        log.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    def rename(src, dst):
        log.append(("rename", str(src), str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return log


def test_atomic_write_fsyncs_file_then_renames_then_fsyncs_folder(tmp_path, events):
    target = tmp_path / "manifest.json"
    write_json(target, {"a": 1})
    assert target.read_text() == '{\n "a": 1\n}\n'
    tmp = str(tmp_path / f".manifest.json.{os.getpid()}.tmp")
    assert events == [("fsync", tmp), ("rename", tmp, str(target)), ("fsync", str(tmp_path))]
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_atomic_write_failure_keeps_old_file_and_names_path(tmp_path):
    target = tmp_path / "keys.txt"
    target.write_text("old\n")

    def fail(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="keys.txt") as caught:
        atomic_write(target, fail)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["keys.txt"]


def test_atomic_write_file_size_limit_names_path(tmp_path):
    """A real EFBIG (RLIMIT_FSIZE, SIGXFSZ ignored) in a subprocess: the error names the target."""
    target = tmp_path / "rows.npy"
    code = ("import sys; from lift_fast.atomic import atomic_write; "
            "atomic_write(sys.argv[1], lambda f: f.write(b'x' * 100_000))")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))

    done = subprocess.run([sys.executable, "-c", code, str(target)], preexec_fn=limit, capture_output=True, text=True)
    assert done.returncode != 0
    assert "File too large" in done.stderr and str(target) in done.stderr, done.stderr
    assert os.listdir(tmp_path) == []


def test_publish_dir_fsyncs_every_file_before_the_rename_and_the_parent_after(tmp_path, events):
    tmp, final = tmp_path / ".tmp_step_000002", tmp_path / "step_000002"
    (tmp / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "state.pt", "sub/extra.bin"):
        (tmp / name).write_bytes(b"x")
    publish_dir(tmp, final)
    renames = [i for i, event in enumerate(events) if event[0] == "rename"]
    assert len(renames) == 1 and events[renames[0]] == ("rename", str(tmp), str(final))
    before = {event[1] for event in events[:renames[0]]}
    assert before == {str(tmp / "model.safetensors"), str(tmp / "state.pt"), str(tmp / "sub/extra.bin"),
                      str(tmp / "sub"), str(tmp)}
    # a folder is fsynced after the files in it
    order = [event[1] for event in events[:renames[0]]]
    assert order.index(str(tmp / "sub/extra.bin")) < order.index(str(tmp / "sub")) < order.index(str(tmp))
    assert events[renames[0] + 1:] == [("fsync", str(tmp_path))]
    assert sorted(os.listdir(final)) == ["model.safetensors", "state.pt", "sub"]


def test_publish_dir_replaces_an_existing_folder(tmp_path):
    final = tmp_path / "step_000004"
    final.mkdir()
    (final / "old").write_text("old")
    tmp = tmp_path / ".tmp_step_000004"
    tmp.mkdir()
    (tmp / "new").write_text("new")
    publish_dir(tmp, final)
    assert os.listdir(tmp_path) == ["step_000004"] and os.listdir(final) == ["new"]


def test_publish_dir_refuses_another_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="one folder"):
        publish_dir(tmp_path / "a" / "x", tmp_path / "b" / "x")


def test_fsync_dir_names_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ checkpoints


def tiny_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_checkpoint_files_are_fsynced_before_the_rename_and_the_parent_after(tmp_path, events):
    final = save_checkpoint(tmp_path / "run", 3, *tiny_state())
    root, tmp = final.parent, final.parent / ".tmp_step_000003"
    renames = [i for i, event in enumerate(events) if event[0] == "rename"]
    assert events[renames[0]] == ("rename", str(tmp), str(final))
    fsynced_before = [event[1] for event in events[:renames[0]] if event[0] == "fsync"]
    assert fsynced_before[-1] == str(tmp)  # the folder after its files
    assert set(fsynced_before) == {str(tmp / "model.safetensors"), str(tmp / "state.pt"), str(tmp)}
    assert events[renames[0] + 1] == ("fsync", str(root))
    assert load_file(str(final / "model.safetensors"))["weight"].shape == (2, 3)


def test_pruning_renames_before_deleting_and_the_next_save_clears_leftovers(tmp_path, monkeypatch):
    run = tmp_path / "run"
    state = tiny_state()
    for step in (1, 2):
        save_checkpoint(run, step, *state, keep=2)
    # killed while deleting step 1: the rename went through, the deletion did not
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", lambda path, ignore_errors=False: None)
    save_checkpoint(run, 3, *state, keep=2)
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [f".old_step_000001.{os.getpid()}", "step_000002", "step_000003"]
    assert [p.name for p in complete_checkpoints(run)] == ["step_000002", "step_000003"]
    monkeypatch.undo()
    (root / ".tmp_step_000009").mkdir()  # and what a save killed mid-write leaves
    save_checkpoint(run, 4, *state, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_000003", "step_000004"]


def test_failed_checkpoint_write_names_the_file_and_keeps_the_previous(tmp_path, monkeypatch):
    run = tmp_path / "run"
    state = tiny_state()
    kept = save_checkpoint(run, 5, *state)

    def no_space(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", no_space)
    with pytest.raises(CheckpointWriteError) as caught:
        save_checkpoint(run, 6, *state)
    message = str(caught.value)
    assert str(run / "checkpoints" / ".tmp_step_000006" / "model.safetensors") in message
    assert "No space left on device" in message and f"{kept} is kept" in message
    assert isinstance(caught.value, OSError) and isinstance(caught.value, RunFolderError)
    assert latest_checkpoint(run) == kept and sorted(p.name for p in kept.parent.iterdir()) == ["step_000005"]


def test_checkpoint_step_from_metadata_or_folder_name(tmp_path):
    copy = tmp_path / "best"  # a checkpoint copied under another name keeps its step
    shutil.copytree(save_checkpoint(tmp_path / "run", 7, *tiny_state()), copy)
    assert checkpoint_step(copy) == 7
    bare = tmp_path / "run" / "checkpoints" / "step_000012"
    bare.mkdir()
    save_file({"weight": torch.zeros(2)}, str(bare / "model.safetensors"))  # no metadata
    assert checkpoint_step(bare) == 12
    other = tmp_path / "other"
    other.mkdir()
    save_file({"weight": torch.zeros(2)}, str(other / "model.safetensors"))
    with pytest.raises(RunFolderError, match="not a lift-fast checkpoint"):
        checkpoint_step(other)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        checkpoint_step(tmp_path)


@pytest.mark.parametrize("file", ["model.safetensors", "state.pt"])
def test_damaged_checkpoint_names_the_file_and_the_one_before(tmp_path, file):
    """A checkpoint cut short after it was saved (a copy, bit rot): RunFolderError, not a traceback
    from safetensors or torch.load, naming the file and the checkpoint to resume from instead."""
    run = tmp_path / "run"
    state = tiny_state()
    earlier = save_checkpoint(run, 2, *state, keep=5)
    damaged = save_checkpoint(run, 4, *state, keep=5)
    data = (damaged / file).read_bytes()
    (damaged / file).write_bytes(data[: len(data) // 2])
    with pytest.raises(RunFolderError) as caught:
        load_checkpoint(damaged, *tiny_state())
    message = str(caught.value)
    assert str(damaged / file) in message and "cannot be read" in message and f"--resume {earlier}" in message
    if file == "model.safetensors":  # what `train --resume` reads first
        with pytest.raises(RunFolderError, match="cannot be read"):
            checkpoint_step(damaged)
    load_checkpoint(earlier, *tiny_state())  # the one before still loads


def test_fsync_dir_passes_over_a_file_system_that_cannot_sync_folders(tmp_path, monkeypatch):
    def fsync(fd, code=errno.EINVAL):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)
    fsync_dir(tmp_path)  # EINVAL: passed over
    monkeypatch.setattr(os, "fsync", lambda fd: fsync(fd, errno.EIO))
    with pytest.raises(OSError) as caught:  # a real I/O error is not
        fsync_dir(tmp_path)
    assert caught.value.errno == errno.EIO
