"""The test harness's fork rule (conftest.py): a forked child never finalises garbage it inherited."""

from __future__ import annotations

import gc
import os


class _Finalised:
    def __init__(self, marker):
        self.marker = marker
        self.cycle = self  # unreachable only as a cycle: freed by the collector, not by reference counts

    def __del__(self):
        with open(self.marker, "a") as file:
            file.write(f"{os.getpid()}\n")


def test_a_forked_child_does_not_finalise_inherited_garbage(tmp_path):
    marker = tmp_path / "finalised"
    gc.disable()  # so that the garbage is still there at the fork
    try:
        _Finalised(marker)
        pid = os.fork()
        if pid == 0:  # the child: a full collection must not reach the parent's garbage
            gc.collect()
            os._exit(0)
        os.waitpid(pid, 0)
    finally:
        gc.enable()
    assert not marker.exists(), "the child ran the finaliser of an object it inherited"
    gc.collect()
    assert marker.read_text().split() == [str(os.getpid())]
