"""`lift-fast embed --data D --out O --estimate [--json F]`: what embedding a shard folder will cost,
known before a GPU is asked for.

    report = estimate(data_dir, cfg.embed, sample=10_000, mfu=0.4)
    print(format_estimate(report))

It reads the captions of a sample of the shards (whole shards, spread over the folder, until `sample`
captions), tokenizes the distinct captions of each shard exactly as the embed run would (prompt,
max_length, EOS), and plans their batches as a GPU run would (lift_fast.embed.batching: packed,
exact-length, and the bucketed padded plan of embed.packing=off). Only the model's config.json and
tokenizer files are read: the model is built on the meta device (no weights), and an NV-Embed-v2
config (text_config + latent_attention_config) is counted as its Mistral plus the latent-attention
pooling. Counts from the sample are scaled to the whole folder by its shards' bytes (the report says
by how much: `scaled_by`, 1 when every shard was read).

FLOPs per caption of L tokens are lift_fast.models.flops.encoder_flops_per_caption (2 L x linear weights
+ attention over the L x L square, checked against FlopCounterMode), plus, for NV-Embed, 2 L x the
latent block's weights and 4 L x latents x inner width. A planned batch costs rows x FLOPs(padded
length); a pack costs the sum over its captions (flash-attention's variable-length kernel attends
within each caption only). GPU-hours = planned FLOPs / (dense bf16 peak x MFU).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lift_fast.config import ConfigError, EmbedConfig
from lift_fast.data.captions import parse_sources
from lift_fast.data.shards import list_shards
from lift_fast.device import DENSE_BF16_TFLOPS
from lift_fast.embed.batching import auto_length_step, plan_batches, plan_exact, plan_packs
from lift_fast.embed.encoder import TextEncoder, resolve_model
from lift_fast.embed.run import read_captions
from lift_fast.models.flops import encoder_flops_per_caption

# The MFU GPU-hours are stated at, until a GPU check has measured the embed pass (bench/gpu_check.py
# --only embed): an assumption, typical of a well-fed bf16 forward pass of a 0.6-8B model.
DEFAULT_MFU = 0.40
GPUS = ("H100", "H200", "B200")  # dense bf16 peaks from lift_fast.device.DENSE_BF16_TFLOPS
SAMPLE = 10_000
STORE_DTYPE_BYTES = {"float16": 2, "float32": 4, "int8": 1}
MATRYOSHKA_DIMS = (4096, 2048, 1024, 512, 256)
HASH_BYTES, SCALE_BYTES = 8, 4  # per row: the caption hash; the int8 row's scale


def _meta_model(cfg: EmbedConfig, folder: Path):
    """(backbone built on the meta device, latent-attention FLOPs per token, whether it is NV-Embed-shaped)."""
    from transformers import AutoConfig, AutoModel, MistralConfig, MistralModel

    config_file = folder / "config.json"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"embed.model={cfg.model!r}: cannot read {config_file} ({err})") from None
    latent = raw.get("latent_attention_config")
    if latent and raw.get("text_config"):  # NV-Embed: a (bidirectional) Mistral and the latent pooling
        text = {k: v for k, v in raw["text_config"].items() if k not in ("model_type", "architectures", "auto_map")}
        with torch.device("meta"):
            model = MistralModel(MistralConfig(**text))
        dim, inner = latent["latent_dim"], latent["num_cross_heads"] * latent["cross_dim_head"]
        # to_q, to_out, the GEGLU feed-forward (dim -> 8 dim -> 4 dim -> dim), attention to the latents
        per_token = 2 * (2 * dim * inner + dim * 8 * dim + 4 * dim * dim) + 4 * latent["num_latents_value"] * inner
        return model, per_token, True
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except ValueError as err:
        raise ConfigError(f"embed.model={cfg.model!r}: cannot build it from {config_file} ({err}); a model with "
                          "its own code needs embed.trust_remote_code=true") from None
    return getattr(model, "embedding_model", model), 0, False


def _flops_polynomial(model) -> tuple[float, float, float]:
    """(c, a, b) with FLOPs(L) = c + a L + b L^2 for the encoder (encoder_flops_per_caption is quadratic)."""
    f0, f1, f2 = (encoder_flops_per_caption(model, n) for n in (0, 1, 2))
    b = (f2 - f0 - 2 * (f1 - f0)) / 2
    return float(f0), float(f1 - f0 - b), float(b)


def _sample_shards(shards: list[Path], sample: int, sources: tuple[str, ...], on_error: str) -> list:
    """Captions of whole shards, spread over the folder, until `sample` rows: [(shard, ShardCaptions)]."""
    if not shards:
        return []
    taken, read = set(), []
    count = 0
    step = len(shards)
    while count < sample and len(taken) < len(shards):
        # every step-th shard, then halfway between those, ...: an even spread whatever the sample size
        for index in range(0, len(shards), max(step, 1)):
            if index in taken:
                continue
            taken.add(index)
            captions = read_captions(shards[index], on_error, sources)
            read.append((shards[index], captions))
            count += len(captions.keys)
            if count >= sample:
                break
        step = max(step // 2, 1)
    return read


def estimate(data_dir: str | Path, cfg: EmbedConfig, *, sample: int = SAMPLE, mfu: float = DEFAULT_MFU) -> dict:
    """Tokens, padded tokens, FLOPs, GPU-hours and store bytes of embedding every caption of `data_dir`.

    Returns a JSON-able dict: captions (store rows), embedded (distinct captions run through the model),
    tokens, padded_tokens (under the plan a GPU run takes), plan, plans ({packed, exact, padded}: padded
    tokens of each), flops (of the plan), useful_flops (no padding), flops_per_caption, gpu_hours ({GPU: hours}
    at `mfu`), mfu, store_bytes ({dtype: bytes} at the rows' dim), store_bytes_by_dim, dim, model_dim,
    scaled_by and sample (what was read). Raises ShardError for a missing folder or unreadable shard,
    ConfigError (or FileNotFoundError) for a model whose config.json or tokenizer cannot be read.
    """
    from transformers import AutoTokenizer

    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: the fraction of the matmul peak, in (0, 1]")
    shards = list_shards(data_dir)
    folder, revision = resolve_model(cfg.model)
    backbone, latent_per_token, nv_embed = _meta_model(cfg, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"embed.model={cfg.model!r}: no tokenizer in {folder} ({err}); --estimate needs "
                          "config.json and the tokenizer files, not the weights") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    # NV-Embed's captions are tokenized as for last-token pooling: the prompt before, EOS appended.
    token_cfg = replace(cfg, pooling="last") if nv_embed or cfg.pooling == "model" else cfg
    encoder = TextEncoder(backbone, tokenizer, token_cfg, path=folder, revision=revision, device="cuda")
    read = _sample_shards(shards, sample, parse_sources(cfg.captions), cfg.on_error)
    lengths: list[int] = []
    rows = key_bytes = 0
    for _, captions in read:
        distinct = list(dict.fromkeys(captions.captions))
        lengths += [len(ids) for ids in encoder.tokenize(distinct).ids]
        rows += len(captions.keys)
        key_bytes += sum(len(key.encode()) + 1 for key in captions.keys)
    read_bytes = sum(shard.stat().st_size for shard, _ in read)
    scale = sum(s.stat().st_size for s in shards) / read_bytes if read_bytes else 0.0

    c, a, b = _flops_polynomial(backbone)
    lens = np.asarray(lengths, dtype=np.float64)
    per_caption = c + (a + latent_per_token) * lens + b * lens ** 2  # FLOPs of each caption alone

    def batch_flops(plan) -> float:
        return float(sum(len(batch.rows) * (c + (a + latent_per_token) * batch.length + b * batch.length ** 2)
                         for batch in plan))

    batch_size, max_tokens = cfg.batch_size, cfg.max_tokens
    packed = plan_packs(lengths, max_tokens=max_tokens or batch_size * cfg.max_length) if lengths else []
    exact = plan_exact(lengths, batch_size=batch_size, max_tokens=max_tokens) if lengths else []
    step = cfg.length_step or auto_length_step(cfg.max_length, cfg.compile != "off")  # compile=auto: on for CUDA
    padded = plan_batches(lengths, batch_size=batch_size, max_tokens=max_tokens, length_step=step,
                          max_length=cfg.max_length) if lengths else []
    plans = {"packed": sum(batch.length for batch in packed), "exact": sum(len(q.rows) * q.length for q in exact),
             "padded": sum(len(q.rows) * q.length for q in padded)}
    # What a GPU run takes (TextEncoder.packing_mode with flash_attention_2): NV-Embed's encoder ignores packing.
    plan = {"off": "padded", "exact": "exact"}.get(cfg.packing, "exact" if nv_embed else "packed")
    flops = {"packed": float(per_caption.sum()), "exact": batch_flops(exact), "padded": batch_flops(padded)}[plan]

    model_dim = int(getattr(backbone.config, "hidden_size", 0)) if not nv_embed else int(
        json.loads((folder / "config.json").read_text())["latent_attention_config"]["latent_dim"])
    dim = cfg.dim or model_dim
    total_rows = rows * scale
    mean_key = key_bytes / rows if rows else 0.0

    def store_bytes(width: int) -> dict:
        return {dtype: round(total_rows * (width * size + HASH_BYTES + mean_key + (SCALE_BYTES if dtype == "int8" else 0)))
                for dtype, size in STORE_DTYPE_BYTES.items()}

    return {
        "data_dir": str(Path(data_dir).resolve()), "model": cfg.model, "config": str(folder / "config.json"),
        "nv_embed": nv_embed, "max_length": cfg.max_length, "prompt": cfg.prompt,
        "captions": round(total_rows), "embedded": round(len(lengths) * scale), "tokens": round(lens.sum() * scale),
        "padded_tokens": round(plans[plan] * scale), "plan": plan, "plans": {k: round(v * scale) for k, v in plans.items()},
        "truncated": round(sum(n >= cfg.max_length for n in lengths) * scale),
        "flops": flops * scale, "useful_flops": float(per_caption.sum()) * scale,
        "flops_per_caption": float(per_caption.mean()) if lengths else 0.0,
        "mfu": mfu, "gpu_hours": {gpu: flops * scale / (DENSE_BF16_TFLOPS[gpu] * 1e12 * mfu) / 3600 for gpu in GPUS},
        "gpu_hours_note": f"dense bf16 peaks (H100 and H200 {DENSE_BF16_TFLOPS['H100']:.0f}, B200 "
                          f"{DENSE_BF16_TFLOPS['B200']:.0f} TFLOP/s) at an assumed MFU of {mfu}; no GPU check has "
                          "measured the embed pass yet",
        "dim": dim, "model_dim": model_dim, "store_bytes": store_bytes(dim),
        "store_bytes_by_dim": {str(width): store_bytes(width)
                               for width in dict.fromkeys([model_dim, dim, *[d for d in MATRYOSHKA_DIMS if d < model_dim]])},
        "scaled_by": scale,
        "sample": {"shards_read": len(read), "shards": len(shards), "rows_read": rows, "captions_tokenized": len(lengths),
                   "note": "counts are the sample's, scaled to the whole folder by shard bytes" if scale != 1 else
                           "every shard was read: counts are exact"},
    }


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:,.2f} {prefix}{unit}"
    return f"{value:,.0f} {unit}"


def format_estimate(report: dict) -> str:
    """The report as lines for a person (the JSON has every field)."""
    ratio = report["padded_tokens"] / report["tokens"] if report["tokens"] else 0.0
    lines = [
        f"embed estimate for {report['data_dir']} with {report['model']} (max_length {report['max_length']}); "
        f"{report['sample']['note']} (x{report['scaled_by']:.2f}, {report['sample']['shards_read']} of "
        f"{report['sample']['shards']} shards read)",
        f"  captions {report['captions']:,} (distinct, embedded: {report['embedded']:,}; cut at max_length: "
        f"{report['truncated']:,})",
        f"  tokens {report['tokens']:,}; padded tokens under the {report['plan']} plan {report['padded_tokens']:,} "
        f"({ratio:.3f}x); packed {report['plans']['packed']:,}, exact {report['plans']['exact']:,}, "
        f"padded (bucketed) {report['plans']['padded']:,}",
        f"  FLOPs {_si(report['flops'], 'FLOP')} ({_si(report['flops_per_caption'], 'FLOP')} per caption)",
        "  GPU-hours at MFU {:.2f}: ".format(report["mfu"])
        + ", ".join(f"{gpu} {hours:,.1f}" for gpu, hours in report["gpu_hours"].items()),
    ]
    for width, by_dtype in report["store_bytes_by_dim"].items():
        mark = " (embed.dim)" if int(width) == report["dim"] else ""
        lines.append(f"  store at dim {width}{mark}: " + ", ".join(f"{d} {_si(n, 'B')}" for d, n in by_dtype.items()))
    return "\n".join(lines)
