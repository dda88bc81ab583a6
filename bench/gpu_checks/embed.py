"""The caption embedding engine on the GPU: a random-weight model with the shape of Qwen3-Embedding-0.6B
(and of Qwen3-Embedding-8B where memory and budget allow), run through lift_fast's TextEncoder exactly
as `lift-fast embed` runs it (token-budget batches, bucketed lengths, left padding, last-token pooling,
torch.compile), in bf16 and then fp8 (torchao, dynamic per-row scales); and the bf16 model once more with
embed.packing=packed (captions end to end, no padding; flash_attention_2's variable-length kernel where
flash-attn is installed, else sdpa with a block-diagonal mask), its rows' cosine to the padded ones.

Rows per model and mode: captions/s and tokens/s (real tokens) of a timed pass over synthetic token-id
captions of log-normal lengths (median ~19 tokens, at most 77 + EOS), the model FLOP/s and its fraction
of the dense bf16 matmul rate measured by `matmul_bf16` (fp8's tensor cores peak at twice that rate,
so fp8 fractions above 0.5 beat what bf16 could ever reach), the compile + warm-up time of the first
pass, and for fp8 the mean and minimum cosine of its rows to the bf16 rows of the same captions.

FLOPs counted per caption of n tokens: 2 * n * (parameters of the linear layers) for the matmuls, plus causal
attention 2 * layers * n^2 * (heads * head_dim) (QK^T and AV over the lower triangle); padding is not
counted, so the figure is the useful work done.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from lift_fast.config import ConfigError

from . import Context, Row, gpu_check
from .loss import matmul_ceiling

# Qwen3-Embedding-0.6B and -8B (their config.json), with random weights.
QWEN3_0_6B = {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
              "intermediate_size": 3072, "vocab_size": 151669, "head_dim": 128}
QWEN3_8B = {"hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 12288, "vocab_size": 151665, "head_dim": 128}
QUICK_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 128, "vocab_size": 1000, "head_dim": 16}
MAX_LENGTH = 77
EOS_ID, PAD_ID = 2, 0
FIDELITY_SAMPLE = 256
# Not yet sized on a GPU: model init and compilation dominate (28 or 36 layers, bf16 then fp8).
EST_0_6B_S, EST_8B_S = 120, 180
MIN_FREE_GIB_8B = 48  # bf16 weights (16 GiB), fp8 weights made from them, activations of 16k-token batches
SIZES = {  # captions timed, captions per pass at most, padded tokens per pass at most
    "0.6B": (20000, 1024, 32768),
    "8B": (6000, 512, 16384),
    "quick": (96, 32, 512),
}


class IdTokenizer:
    """What TextEncoder asks of a tokenizer when it is given token ids: pad id, side, EOS (no text here)."""

    pad_token_id = PAD_ID
    eos_token_id = EOS_ID
    padding_side = "left"


def synthetic_captions(count: int, vocab_size: int, seed: int = 0):
    """Token-id captions: log-normal lengths (median ~19), cut at MAX_LENGTH, each ending with EOS."""
    from lift_fast.embed.encoder import Tokenized

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(2.9, 0.5, count).astype(int), 2, MAX_LENGTH + 1)
    ids = [[*rng.integers(3, vocab_size, size=n - 1).tolist(), EOS_ID] for n in lengths]
    return Tokenized([""] * count, ids, torch.from_numpy(lengths > MAX_LENGTH))


def build_encoder(ctx: Context, shape: dict, dtype: torch.dtype, batch_size: int, max_tokens: int):
    """A random-weight Qwen3 model of `shape` on ctx.device in `dtype`, wrapped as the embed run wraps it."""
    from transformers import AutoModel, Qwen3Config

    from lift_fast.config import EmbedConfig
    from lift_fast.embed.encoder import TextEncoder

    config = Qwen3Config(**shape, max_position_embeddings=4096, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = AutoModel.from_config(config, dtype=dtype)
    model.requires_grad_(False).eval()
    cfg = EmbedConfig(model="random-qwen3", pooling="last", max_length=MAX_LENGTH + 1, append_eos="off",
                      batch_size=batch_size, max_tokens=max_tokens, packing="off")  # the padded, bucketed plan
    precision = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    return TextEncoder(model, IdTokenizer(), cfg, path=Path("random-qwen3"), revision=None, device=str(ctx.device),
                       precision=precision)


def model_flops(model: torch.nn.Module, lengths: list[int]) -> float:
    """Useful FLOPs of one pass over captions of these token counts (see the module docstring)."""
    config = model.config
    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention_width = config.num_attention_heads * config.head_dim
    return sum(2 * n * params + 2 * config.num_hidden_layers * n * n * attention_width for n in lengths)


def timed_pass(ctx: Context, encoder, captions) -> tuple[torch.Tensor, float, int]:
    """Rows of one pass over `captions`, its wall time in seconds (synchronised) and the padded tokens run."""
    padded_before = encoder.padded_tokens
    ctx.synchronize()
    started = time.perf_counter()
    rows = encoder.encode_tokenized(captions)
    ctx.synchronize()
    return rows, time.perf_counter() - started, encoder.padded_tokens - padded_before


def mode_rows(ctx: Context, label: str, encoder, captions, warmup_seconds: float, matmul: tuple[float, str],
              note: str = "") -> list[Row]:
    """Time one pass and turn it into the rows of one model and mode."""
    _, seconds, padded = timed_pass(ctx, encoder, captions)
    count, tokens = len(captions.ids), captions.tokens
    tflops = model_flops(encoder.model, [len(seq) for seq in captions.ids]) / seconds / 1e12
    setting = f"batch <= {encoder.cfg.batch_size} captions, <= {encoder.cfg.max_tokens} padded tokens"
    return [
        Row(f"{label} captions/s", count / seconds, "captions/s",
            f"{count} captions, {seconds:.2f} s after warm-up; {setting}{note}"),
        Row(f"{label} tokens/s", tokens / seconds, "tokens/s",
            f"{tokens} real tokens; {padded / max(tokens, 1):.3f} tokens run per real token (padding)"),
        Row(f"{label} model TFLOP/s", tflops, "TFLOP/s", "useful FLOPs (padding not counted)"),
        Row(f"{label} / matmul_bf16", tflops / matmul[0], "x", f"of {matmul[0]:.4g} TFLOP/s ({matmul[1]})"),
        Row(f"{label} compile + warm-up", warmup_seconds, "s", "first pass over every input shape"),
    ]


def packed_rows(ctx: Context, encoder, captions, matmul: tuple[float, str], reference: torch.Tensor,
                label: str) -> list[Row]:
    """The rows of the same model run with embed.packing=packed (compiled with dynamic shapes on CUDA)."""
    from dataclasses import replace

    from lift_fast.embed.encoder import TextEncoder

    config = encoder.model.config
    previous = config._attn_implementation
    try:
        import flash_attn  # noqa: F401

        if ctx.device.type == "cuda":
            config._attn_implementation = "flash_attention_2"
    except ImportError:
        pass
    try:
        packed = TextEncoder(encoder.model, IdTokenizer(), replace(encoder.cfg, packing="packed"), path=encoder.path,
                             revision=None, device=str(ctx.device), precision=encoder.precision)
        if ctx.device.type == "cuda":
            packed.compile()
        started = time.perf_counter()
        rows, _, _ = timed_pass(ctx, packed, captions)  # compiles; then the timed pass
        note = f"; {packed.packing_mode()} batches, attention {config._attn_implementation}"
        result = mode_rows(ctx, f"{label} packed", packed, captions, time.perf_counter() - started, matmul, note)
        cosine = torch.nn.functional.cosine_similarity(rows.double(), reference.double(), dim=-1)
        result.append(Row(f"{label} packed cosine min to padded", float(cosine.min()), "cosine",
                          f"mean {float(cosine.mean()):.6f} over {len(cosine)} captions"))
        return result
    finally:
        config._attn_implementation = previous


def measure_model(ctx: Context, name: str, shape: dict) -> list[Row]:
    """bf16 then fp8 rows for one model shape (fp32 and no fp8 in quick mode, which runs anywhere)."""
    from lift_fast.embed.quantize import (
        check_supported,
        cosine_fidelity,
        quantize_model,
    )

    count, batch_size, max_tokens = SIZES["quick" if ctx.quick else name]
    dtype = torch.float32 if ctx.quick else torch.bfloat16
    matmul = matmul_ceiling(ctx)
    encoder = build_encoder(ctx, shape, dtype, batch_size, max_tokens)
    captions = synthetic_captions(count, shape["vocab_size"])
    label = f"Qwen3-{name} shape {'fp32' if ctx.quick else 'bf16'} {ctx.device.type}"
    if ctx.device.type == "cuda":
        encoder.compile()
    started = time.perf_counter()
    reference, _, _ = timed_pass(ctx, encoder, captions)  # compiles every shape; the rows are fp8's reference
    rows = mode_rows(ctx, label, encoder, captions, time.perf_counter() - started, matmul)
    rows += packed_rows(ctx, encoder, captions, matmul, reference, label)

    fp8_label = f"Qwen3-{name} shape fp8 {ctx.device.type}"
    try:
        check_supported("fp8", ctx.device)
    except ConfigError as error:  # no CUDA, an older GPU, or no torchao
        return [*rows, Row(f"{fp8_label} captions/s", math.nan, "captions/s", f"not run: {error}"[:200])]
    quantize_model(encoder.model, "fp8")
    encoder.compile()  # the quantized model, traced again
    encoder.warmup_seconds = 0.0
    started = time.perf_counter()
    quantized, _, _ = timed_pass(ctx, encoder, captions)
    warmup = time.perf_counter() - started
    sample = slice(0, FIDELITY_SAMPLE)
    mean, worst = cosine_fidelity(quantized[sample], reference[sample])
    fidelity = f"; cosine to bf16 on {FIDELITY_SAMPLE} captions mean {mean:.5f}, min {worst:.5f}"
    rows += mode_rows(ctx, fp8_label, encoder, captions, warmup, matmul, fidelity)
    rows.append(Row(f"{fp8_label} cosine min to bf16", worst, "cosine", f"mean {mean:.5f}; embed.min_fidelity "
                    f"default 0.99: {'met' if min(mean, worst) >= 0.99 else 'NOT MET'}"))
    return rows


def release(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()


@gpu_check("embed_qwen3_0.6b", est_seconds=EST_0_6B_S)
def embed_qwen3_0_6b(ctx: Context) -> list[Row]:
    """Qwen3-Embedding-0.6B's shape: 28 layers, hidden 1024, 16 heads (8 KV), MLP 3072, bf16 and fp8."""
    return measure_model(ctx, "0.6B", QUICK_SHAPE if ctx.quick else QWEN3_0_6B)


@gpu_check("embed_qwen3_8b", est_seconds=EST_8B_S)
def embed_qwen3_8b(ctx: Context) -> list[Row]:
    """Qwen3-Embedding-8B's shape (36 layers, hidden 4096, 32 heads, 8 KV, MLP 12288), where memory allows."""
    if ctx.device.type == "cuda" and not ctx.quick:
        free, _ = torch.cuda.mem_get_info(ctx.device)
        if free < MIN_FREE_GIB_8B * 2**30:
            return [Row("Qwen3-8B shape captions/s", math.nan, "captions/s",
                        f"not run: {free / 2**30:.0f} GiB free, needs {MIN_FREE_GIB_8B}")]
    release(ctx)
    return measure_model(ctx, "8B", QUICK_SHAPE if ctx.quick else QWEN3_8B)
