"""Registry of GPU measurements run by bench/gpu_check.py.

A check is a function that takes a `Context` and returns a list of `Row`s; registering it is one
decorator in any module of this package (bench/gpu_checks/*.py are all imported by
`load_checks`, `ceilings` first, then the rest by name):

    from . import Context, Row, best_seconds, gpu_check

    @gpu_check("clip_loss_triton", est_seconds=30)
    def clip_loss_triton(ctx: Context) -> list[Row]:
        batch = ctx.size(16384, 64)        # full size on the GPU, tiny with --quick
        ...
        seconds = best_seconds(ctx, step)
        return [Row(f"clip_loss fwd+bwd B={batch}", batch / seconds, "samples/s", "best of 10")]

`est_seconds` is the check's wall time at full size on a GPU, set-up included; the script skips a
check whose estimate does not fit in what is left of its budget. Checks run in registration order,
except that the proofs (`proof=True`: what the code does on the device, e.g. the GEMM dtypes and host
syncs of a train step) all run first, before the ceilings and every timing.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Row:
    """One measured number: what (`name`), the value, its unit, and how it was measured."""

    name: str
    value: float
    unit: str
    notes: str = ""


@dataclass
class Context:
    """What a check runs on and how big it may be."""

    device: torch.device
    quick: bool  # smoke mode: tiny shapes, seconds in all, any device
    deadline: float = math.inf  # time.monotonic() at which the whole budget is spent
    results: dict[str, list[Row]] = field(default_factory=dict)  # rows of the checks done ok so far

    def size(self, full: int, quick: int) -> int:
        """`full` normally, `quick` in smoke mode."""
        return quick if self.quick else full

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def earlier_value(self, check: str, unit: str) -> float | None:
        """The value of the first row in `unit` of `check`, if it ran ok earlier in this run, else None.

        This is how a check reads a ceiling (e.g. `ctx.earlier_value("matmul_bf16", "TFLOP/s")`).
        """
        return next((row.value for row in self.results.get(check, ()) if row.unit == unit), None)


@dataclass(frozen=True)
class Check:
    name: str
    est_seconds: float
    function: Callable[[Context], list[Row]]
    proof: bool = False  # checks what the code does (dtypes, syncs) rather than timing it: runs before any timing


CHECKS: list[Check] = []
FIRST_MODULES = ("ceilings",)  # the two ceilings open every report


def gpu_check(name: str, est_seconds: float, *, proof: bool = False) -> Callable:
    """Register `function(ctx) -> list[Row]` as the measurement `name`; proof=True for a check of
    what the code does on the device (GEMM dtypes, host syncs), which runs before every timing.

    Raises:
        ValueError: `name` is already registered, or `est_seconds` is not positive.
    """
    if est_seconds <= 0:
        raise ValueError(f"gpu_check {name!r}: est_seconds must be > 0, got {est_seconds}")

    def register(function: Callable[[Context], list[Row]]) -> Callable[[Context], list[Row]]:
        if any(check.name == name for check in CHECKS):
            raise ValueError(f"gpu_check {name!r} is registered twice ({function.__module__})")
        CHECKS.append(Check(name, float(est_seconds), function, proof))
        return function

    return register


def load_checks() -> list[Check]:
    """Import every module of this package (so their checks register) and return the checks."""
    names = sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
    for name in sorted(names, key=lambda n: (n not in FIRST_MODULES, n)):
        importlib.import_module(f"{__name__}.{name}")
    return sorted(CHECKS, key=lambda check: not check.proof)  # stable: the proofs, then the rest in order


def best_seconds(ctx: Context, function: Callable[[], object], *, warmup: int = 3,
                 repeats: int = 10, inner: int = 1) -> float:
    """Best time of one call of `function`, in seconds, over `repeats` timings of `inner` calls.

    On CUDA the calls are timed with CUDA events (so launch overhead is hidden when `inner` > 1);
    elsewhere with time.perf_counter.
    """
    for _ in range(warmup):
        function()
    ctx.synchronize()
    best = math.inf
    for _ in range(repeats):
        if ctx.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                function()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            for _ in range(inner):
                function()
            seconds = time.perf_counter() - begin
        best = min(best, seconds / inner)
    return best
