"""Quantized (and mixed-precision) encoders, run only where they keep fidelity.

    report = quantize_encoder(encoder, "fp8", sample_captions, min_fidelity=0.99, where="00000.tar")
    report   # {"mode": "fp8", "captions": 256, "cosine_mean": 0.9993, "cosine_min": 0.9961, ...}

The sample is embedded by the unquantized model first (its reference rows), then the model's linear
layers are quantized in place (no second copy of the weights is held) and the sample is embedded
again. The cosine of each quantized row to its reference row is measured; when the mean or the
minimum is below `min_fidelity` the encoder is refused with FidelityError, which names both figures.

`check_mixed_precision` does the same for embed.precision=bf16-mixed (bf16 autocast against the same
fp32 weights run without it).

Modes (torchao `quantize_` configs, imported only here and only when asked for):
  int8  Int8DynamicActivationInt8WeightConfig: int8 weights, activations quantized per token at run time
  fp8   Float8DynamicActivationFloat8WeightConfig: e4m3 weights and activations, per-row scales; CUDA
        with compute capability 8.9 or more (Ada, Hopper, Blackwell), where fp8 tensor cores exist
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lift_fast.config import ConfigError

MODES = ("none", "int8", "fp8")
FP8_MIN_CAPABILITY = (8, 9)
INSTALL_HINT = "pip install torchao (or pip install 'lift-fast[quantize]')"


class FidelityError(ConfigError):
    """A quantized encoder whose rows are further from the unquantized model's than embed.min_fidelity allows."""


def check_supported(mode: str, device: str | torch.device) -> None:
    """Refuse a quantization mode this device or install cannot run, saying why.

    Raises ConfigError for an unknown mode, fp8 off CUDA or below compute capability 8.9, or torchao
    missing.
    """
    if mode not in MODES:
        raise ConfigError(f"embed.quantize={mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return
    device = torch.device(device)
    if mode == "fp8":
        if device.type != "cuda":
            raise ConfigError(f"embed.quantize=fp8 needs a CUDA GPU with fp8 tensor cores (compute capability >= 8.9); "
                              f"the encoder runs on {device.type}. Use embed.quantize=int8 or none")
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            raise ConfigError(f"embed.quantize=fp8 needs compute capability >= 8.9 (Ada, Hopper or newer); {name} has "
                              f"{capability[0]}.{capability[1]}. Use embed.quantize=int8 or none")
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ConfigError(f"embed.quantize={mode} needs torchao, which is not installed: {INSTALL_HINT}") from None


def quantize_model(model: torch.nn.Module, mode: str) -> None:
    """Quantize the nn.Linear layers of `model` in place with torchao (see the module docstring)."""
    from torchao.quantization import quantize_

    if mode == "int8":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        config = Int8DynamicActivationInt8WeightConfig()
    elif mode == "fp8":
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
        )

        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    else:
        raise ValueError(f"quantize_model: mode {mode!r} is not int8 or fp8")
    quantize_(model, config)


def cosine_fidelity(rows: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(mean, min) cosine similarity of each row [N, D] to its reference row [N, D], in float64."""
    if rows.shape != reference.shape or rows.shape[0] == 0:
        raise ValueError(f"cosine_fidelity: rows {tuple(rows.shape)} and reference {tuple(reference.shape)} "
                         "must be the same non-empty shape")
    cosine = F.cosine_similarity(rows.double(), reference.double(), dim=-1)
    return float(cosine.mean()), float(cosine.min())


def quantize_encoder(encoder, mode: str, sample: list[str], *, min_fidelity: float, where: str = "") -> dict:
    """Quantize `encoder`'s model in place, then check its fidelity on the `sample` captions.

    encoder: a TextEncoder (not yet compiled); sample: captions to measure on; where: what the sample
    is (e.g. the shard), for messages. Returns the report recorded in the store's manifest: mode,
    captions, cosine_mean, cosine_min, min_fidelity. mode "none" returns {"mode": "none"} and does nothing.
    Raises ConfigError when the mode cannot run here (check_supported), ValueError for an empty
    sample, and FidelityError when the mean or minimum cosine is below min_fidelity.
    """
    check_supported(mode, encoder.device)
    if mode == "none":
        return {"mode": "none"}
    if not sample:
        raise ValueError("quantize_encoder: the fidelity sample holds no captions")
    tokenized = encoder.tokenize(sample)
    reference = encoder.encode_tokenized(tokenized)
    quantize_model(encoder.model, mode)
    rows = encoder.encode_tokenized(tokenized)
    mean, worst = cosine_fidelity(rows, reference)
    report = {"mode": mode, "captions": len(sample), "cosine_mean": mean, "cosine_min": worst,
              "min_fidelity": min_fidelity, "reference": encoder.precision}
    _refuse_below(f"embed.quantize={mode}", mean, worst, f"unquantized {encoder.precision}", len(sample), where,
                  min_fidelity, "embed.quantize=none (or another mode)")
    return report


def _refuse_below(what: str, mean: float, worst: float, reference: str, count: int, where: str,
                  min_fidelity: float, instead: str) -> None:
    if mean < min_fidelity or worst < min_fidelity:
        raise FidelityError(
            f"{what}: the encoder's rows have cosine mean {mean:.5f}, min {worst:.5f} to the {reference} model's on "
            f"{count} captions{f' of {where}' if where else ''}, below embed.min_fidelity={min_fidelity:g}; use "
            f"{instead}, or lower embed.min_fidelity if that loss is acceptable")


def check_mixed_precision(encoder, sample: list[str], *, min_fidelity: float, where: str = "") -> dict:
    """Compare a bf16-mixed encoder's rows with its fp32 rows (autocast off) on the `sample` captions.

    Returns the report recorded in the manifest (`precision_fidelity`): precision, captions,
    cosine_mean, cosine_min, min_fidelity. Raises ValueError for an empty sample or an encoder that
    is not bf16-mixed, and FidelityError below min_fidelity.
    """
    if encoder.autocast_dtype is None or not sample:
        raise ValueError("check_mixed_precision needs a bf16-mixed encoder and a non-empty sample")
    tokenized = encoder.tokenize(sample)
    autocast_dtype, encoder.autocast_dtype = encoder.autocast_dtype, None
    try:
        reference = encoder.encode_tokenized(tokenized)
    finally:
        encoder.autocast_dtype = autocast_dtype
    mean, worst = cosine_fidelity(encoder.encode_tokenized(tokenized), reference)
    _refuse_below(f"embed.precision={encoder.precision}", mean, worst, "fp32", len(sample), where, min_fidelity,
                  "embed.precision=fp32")
    return {"precision": encoder.precision, "captions": len(sample), "cosine_mean": mean, "cosine_min": worst,
            "min_fidelity": min_fidelity}
