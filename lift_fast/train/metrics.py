"""What a run logs: metrics.jsonl, and the same scalars as TensorBoard curves under run/tensorboard/;
and what it measures: samples/s with the step time split into data wait and compute (Throughput),
achieved TFLOP/s, MFU and peak memory (utilisation).

Only rank 0 of a distributed run logs. The TensorBoard writer is optional: without the
`tensorboard` package (or with train.tensorboard=false) only metrics.jsonl is written, and the
first run in a process that wanted curves says once that they are off.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from lift_fast.atomic import write_text
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
            # atomically: a crash here must not leave the run with no loss history at all
            write_text(path, "".join(line + "\n" for line in kept))
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


class Throughput:
    """Samples per second over a run's steps, with the first step of each `train` call (torch.compile
    traces and compiles in it; caches and allocators warm up) timed apart as compile_seconds."""

    def __init__(self):
        self.started = time.perf_counter()
        self.data_wait = 0.0  # seconds waiting for batches in the current window
        self.first_seconds: float | None = None
        self.first_samples, self.first_wait = 0, 0.0
        self.window_start, self.window_samples, self.window_steps, self.steady_samples = self.started, 0, 0, 0
        self.compile_reported = False  # the first metrics record carries compile_seconds

    def step_done(self, samples: int) -> None:
        """Count a finished step of `samples` samples (global: all ranks)."""
        now = time.perf_counter()
        if self.first_seconds is None:
            self.first_seconds, self.first_samples, self.first_wait = now - self.started, samples, self.data_wait
            self.window_start, self.data_wait = now, 0.0
            return
        self.window_samples += samples
        self.window_steps += 1
        self.steady_samples += samples

    def window(self) -> dict:
        """Since the last call, then a new window: samples_per_second, data_wait_fraction, and the
        mean step time split into data wait and compute (step_seconds = data_wait_seconds +
        compute_seconds). A window holding only the first step reports that step (the only one)."""
        now = time.perf_counter()
        if self.window_samples:
            elapsed, samples, wait, steps = now - self.window_start, self.window_samples, self.data_wait, self.window_steps
        else:
            elapsed, samples, wait, steps = self.first_seconds, self.first_samples, self.first_wait, 1
        numbers = {"samples_per_second": samples / elapsed, "data_wait_fraction": wait / elapsed,
                   "step_seconds": elapsed / steps, "data_wait_seconds": wait / steps,
                   "compute_seconds": (elapsed - wait) / steps}
        self.window_start, self.window_samples, self.window_steps, self.data_wait = time.perf_counter(), 0, 0, 0.0
        return numbers

    def summary(self) -> dict:
        """seconds (the whole loop), compile_seconds (the first step) and samples_per_second (the
        steps after the first; the first's rate when it was the only one)."""
        seconds = time.perf_counter() - self.started
        first = self.first_seconds or 0.0
        if self.steady_samples:
            rate = self.steady_samples / (seconds - first)
        else:
            rate = self.first_samples / first if first else 0.0
        return {"seconds": seconds, "samples_per_second": rate, "compile_seconds": first}


def utilisation(samples_per_second: float, flops_per_sample: int, peak: float | None, device: torch.device,
                 world_size: int) -> dict:
    """tflops (achieved, all ranks), mfu (when the per-device peak is known) and peak_memory_gib (CUDA)."""
    achieved = samples_per_second * flops_per_sample / 1e12
    numbers = {"tflops": achieved}
    if peak:
        numbers["mfu"] = achieved / (peak * world_size)
    if device.type == "cuda":
        numbers["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return numbers


class StepTally:
    """The step's numbers kept on the device between read-backs, so that no step waits for the GPU.

    Holds the last step's loss (the mean over ranks) and gradient norm, and the non-finite steps:
    over the run, in a row, the first one since the last read-back, and the first step at which
    `max_nonfinite` were in a row, with that step's loss and norm. `updated` computes the next
    values with a few tensor ops (no read-back); `read` brings everything to the host in one copy,
    which the loop does at logged steps, checkpoints and the end. `values` is replaced, never
    changed in place, so a reference kept to it is the state after a finished step.
    """

    FIELDS = ("loss", "grad_norm", "nonfinite", "in_a_row", "first_nonfinite", "limit_step", "limit_loss",
              "limit_grad_norm")

    def __init__(self, device: torch.device, max_nonfinite: int, nonfinite: int = 0):
        self.max_nonfinite = max_nonfinite
        initial = dict.fromkeys(self.FIELDS, 0.0) | {"loss": math.nan, "grad_norm": math.nan, "nonfinite": nonfinite}
        # float64: the step numbers and counts stay exact integers (to 2**53)
        self.values = torch.tensor([initial[name] for name in self.FIELDS], dtype=torch.float64, device=device)

    def updated(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the values after step `step` (1-based) with this loss and gradient norm, found_inf).

        found_inf: float32 0-d, 1.0 when the loss or the norm is not finite (the update is to be
        skipped), else 0.0; the form torch's fused optimizers and GradScaler use. grad_norm None
        (no clipping): only the loss decides, as it did before the read-backs moved.
        """
        old = self.values
        loss = loss.detach().to(torch.float64)
        norm = grad_norm.detach().to(torch.float64) if grad_norm is not None else torch.zeros_like(loss)
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        in_a_row = (old[3] + 1) * bad
        reached = (in_a_row >= self.max_nonfinite) & (old[5] == 0)
        values = torch.stack([loss, norm if grad_norm is not None else torch.full_like(loss, math.nan),
                              old[2] + bad, in_a_row, torch.where(bad & (old[4] == 0), step, old[4]),
                              torch.where(reached, step, old[5]), torch.where(reached, loss, old[6]),
                              torch.where(reached, norm, old[7])])
        return values, bad.float()

    def read(self, *extra: torch.Tensor) -> tuple[dict, list[float]]:
        """({field: value} of `values`, the 0-d `extra` tensors' values): one copy to the host; the
        first-non-finite marker starts over, so each read reports the ones since the last."""
        values = torch.cat([self.values, *(tensor.detach().to(self.values).reshape(1) for tensor in extra)]).tolist()
        numbers = dict(zip(self.FIELDS, values[:len(self.FIELDS)], strict=True))
        for name in ("nonfinite", "in_a_row", "first_nonfinite", "limit_step"):
            numbers[name] = int(numbers[name])
        if numbers["first_nonfinite"]:
            self.values = self.values.clone()
            self.values[4] = 0.0
        return numbers, values[len(self.FIELDS):]
