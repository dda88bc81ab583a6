"""Durable writes: the temporary file is fsynced before the rename and the folder after it; a folder
is published with every file fsynced, then renamed, then its parent fsynced."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys

import pytest

from lift_fast.atomic import atomic_write, fsync_dir, publish_dir, write_json


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
