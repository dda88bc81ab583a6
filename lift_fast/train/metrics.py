"""What a run logs: metrics.jsonl, and the same scalars as TensorBoard curves under run/tensorboard/.

Only rank 0 of a distributed run logs. The TensorBoard writer is optional: without the
`tensorboard` package (or with train.tensorboard=false) only metrics.jsonl is written, and the
first run in a process that wanted curves says once that they are off.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from lift_fast.train import RunFolderError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
_told_tensorboard_missing = False


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
        """Append one record; non-finite numbers are written as null, so the file stays strict JSON."""
        clean = {name: None if isinstance(value, float) and not math.isfinite(value) else value
                 for name, value in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def tensorboard_writer(run_dir: Path, resume_step: int):
    """A SummaryWriter on run_dir/tensorboard, or None when the tensorboard package is missing.

    resume_step > 0: events past that step, written before the interruption, are purged, so the
    curves read as one run (as metrics.jsonl does).
    """
    global _told_tensorboard_missing
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _told_tensorboard_missing:
            log.warning("train.tensorboard=true, but the tensorboard package is not installed: curves are off, "
                        "metrics.jsonl has the same numbers (pip install tensorboard to get them)")
            _told_tensorboard_missing = True
        return None
    return SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step > 0 else None)


class RunLog:
    """metrics.jsonl plus, when asked and available, the same scalars in TensorBoard (tag train/NAME)."""

    def __init__(self, run_dir: Path, resume_step: int, *, tensorboard: bool):
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step)
        self.writer = tensorboard_writer(run_dir, resume_step) if tensorboard else None

    def write(self, record: dict) -> None:
        self.metrics.write(record)
        if self.writer is None:
            return
        step = record["step"]
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        self.metrics.close()
        if self.writer is not None:
            self.writer.close()
