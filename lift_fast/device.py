"""The device switches of `lift-fast train` and `lift-fast embed`: bf16 autocast (train.precision) and torch.compile
(train.compile, and embed.compile for the caption encoder).

`auto` takes the fast path on CUDA (bf16 autocast, compiled model) and the plain one on CPU (fp32,
eager), and logs which it took. An explicit choice is honoured where it can run, and is a
ConfigError saying why where it cannot. bf16 on CPU runs under torch.autocast("cpu"), which is
slow on most CPUs but lets a CPU check the bf16 path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil

import torch

from lift_fast.config import ConfigError

log = logging.getLogger(__name__)


def resolve_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.precision on `device`: torch.bfloat16, or None (plain fp32).

    Raises ConfigError for bf16 on a GPU without bfloat16 support, naming the setting.
    """
    cuda = device.type == "cuda"
    bf16_ok = not cuda or torch.cuda.is_bf16_supported()
    if choice == "fp32":
        return None
    if choice == "bf16":
        if not bf16_ok:
            raise ConfigError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                              "use train.precision=fp32 or auto")
        return torch.bfloat16
    if choice != "auto":
        raise ConfigError(f"train.precision={choice!r} is not one of auto, bf16, fp32")
    if cuda and bf16_ok:
        log.info("train.precision=auto: bf16 autocast on %s", device)
        return torch.bfloat16
    log.info("train.precision=auto: fp32 on %s%s", device, " (no bfloat16 support)" if cuda else "")
    return None


def _cpp_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def resolve_compile(choice: str, device: torch.device, setting: str = "train.compile") -> bool:
    """Whether to torch.compile for `setting` (train.compile, embed.compile) = choice on `device`.

    Raises ConfigError naming the setting for `on` where the compiler cannot run: no Triton on CUDA,
    no C++ compiler on CPU (inductor generates and builds code with them).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if choice == "off":
        return False
    if choice == "on":
        if cuda and importlib.util.find_spec("triton") is None:
            raise ConfigError(f"{setting}=on: torch.compile on CUDA needs Triton, which is not installed; "
                              f"pip install triton, or use {setting}=off")
        if not cuda and _cpp_compiler() is None:
            raise ConfigError(f"{setting}=on: torch.compile on CPU needs a C++ compiler (g++, clang++ or $CXX), "
                              f"and none is on PATH; install one or use {setting}=off")
        return True
    if choice != "auto":
        raise ConfigError(f"{setting}={choice!r} is not one of auto, on, off")
    log.info("%s=auto: %s on %s", setting, "compiled" if cuda else "eager", device)
    return cuda


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast on `device` in `dtype`, or a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# Dense (no sparsity) peak TFLOP/s of bf16 tensor-core math, from the vendors' data sheets; the
# denominator of MFU. Matched as a substring of torch.cuda.get_device_name().
DENSE_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "B200": 2250.0, "A100": 312.0, "A800": 312.0,
                     "L40S": 362.1, "A10": 125.0, "RTX 4090": 165.2}


def peak_tflops(device: torch.device, precision: torch.dtype | None, override: float = 0.0) -> float | None:
    """The peak TFLOP/s MFU is measured against: train.peak_tflops when set, else the data-sheet bf16
    figure of a known GPU when training in bf16; None (no MFU reported) otherwise, e.g. on a CPU."""
    if override:
        return override
    if device.type != "cuda" or precision != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in DENSE_BF16_TFLOPS.items() if key in name), None)
