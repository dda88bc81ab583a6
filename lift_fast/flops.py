"""`lift-fast flops`: FLOPs per sample and per step of a config, LIFT vs CLIP, and peak memory per step.

    lift-fast flops --config run.yaml model.name=vit_b16 model.head_hidden=4096 data.image_size=224
    lift-fast flops ... --epochs 10 --memory-batch 8      # spread the embedding pass; measure memory

FLOPs come from the formulas the trainer logs (lift_fast/models/flops.py, checked against
FlopCounterMode in tests/test_flops.py), for the config's ViT and head and, in CLIP mode, its text
tower (model.text_width/layers/heads/context; every caption runs padded to the context). LIFT's
one-off embedding pass is the frozen encoder (embed.model, built from its config on the meta device,
no weights read) at embed.max_length tokens per caption, divided by the epochs (samples seen /
captions). The joint width is embed.dim or the encoder's hidden size, in both modes.

Peak memory is measured, not computed: the second of two training steps (forward, loss, backward,
AdamW; the first one makes AdamW's state) of each mode at a small batch on this machine, with
torch.cuda.max_memory_allocated on CUDA and the CPU profiler's allocation events otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lift_fast.config import Config, ConfigError
from lift_fast.models.flops import encoder_flops_per_caption, step_flops_per_sample
from lift_fast.models.text_tower import TextSpec, text_spec
from lift_fast.models.vit import vit_spec

MODES = ("lift", "clip")
PARTS = ("image_tower", "head", "text_tower", "embedding_pass", "loss")
WORDPIECE_VOCAB, CLIP_BPE_VOCAB = 30522, 49408  # the tokenizers' sizes: only the embedding's memory needs them


@dataclass
class Encoder:
    """What the FLOP count needs of LIFT's frozen encoder: its forward FLOPs per caption and its width."""

    name: str
    flops_per_caption: int
    dim: int


def frozen_encoder(cfg: Config) -> Encoder:
    """embed.model built from its config.json on the meta device (no weights), counted at embed.max_length.

    Raises FileNotFoundError (from resolve_model) for a model that is not on this machine, ConfigError
    for one whose code must be trusted (embed.trust_remote_code) or whose config has no hidden size.
    """
    from transformers import AutoConfig, AutoModel

    from lift_fast.embed.encoder import resolve_model

    folder, _ = resolve_model(cfg.embed.model)
    trust = cfg.embed.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=trust)
    except ValueError as err:
        raise ConfigError(f"embed.model={cfg.embed.model!r}: cannot build it from {folder}/config.json ({err}); "
                          "a model with its own code needs embed.trust_remote_code=true") from None
    text_config = getattr(config, "text_config", None) or config
    width = getattr(text_config, "hidden_size", None)
    if width is None:
        raise ConfigError(f"embed.model={cfg.embed.model!r}: {folder}/config.json has no hidden_size; set embed.dim")
    flops = encoder_flops_per_caption(getattr(model, "embedding_model", model), cfg.embed.max_length)
    return Encoder(cfg.embed.model, flops, cfg.embed.dim or width)


def text_tower_spec(cfg: Config) -> TextSpec:
    """The CLIP text tower's shape from the config (vocabulary of model.text_tokenizer)."""
    vocab = CLIP_BPE_VOCAB if cfg.model.text_tokenizer == "clip_bpe" else WORDPIECE_VOCAB
    return text_spec(cfg.model, vocab)


def flops_rows(cfg: Config, encoder: Encoder, *, global_batch: int = 0, epochs: float = 1.0) -> list[dict]:
    """One row per mode (lift, clip): FLOPs per sample by part and in all, per step, and CLIP's extra.

    global_batch: 0 takes train.batch_size; epochs: samples seen / captions, over which LIFT's embedding
    pass is spread (math.inf leaves it out). Raises ConfigError naming the setting for a bad model config.
    """
    batch = global_batch or cfg.train.batch_size
    spec = vit_spec(cfg.model.name, patch_size=cfg.model.patch_size, depth=cfg.model.depth)
    if cfg.data.image_size % spec.patch_size:
        raise ConfigError(f"data.image_size={cfg.data.image_size} is not a multiple of the patch size {spec.patch_size}")
    common = dict(head_hidden=cfg.model.head_hidden, patch_dropout=cfg.model.patch_dropout, pooling=cfg.model.pooling)
    rows = []
    for mode in MODES:
        text = text_tower_spec(cfg) if mode == "clip" else None
        parts = step_flops_per_sample(spec, cfg.data.image_size, encoder.dim, batch, text=text,
                                      encoder_flops=0 if math.isinf(epochs) else encoder.flops_per_caption,
                                      epochs=1.0 if math.isinf(epochs) else epochs, **common)
        rows.append({"mode": mode, "global_batch": batch, **{part: parts.get(part, 0.0) for part in PARTS},
                     "per_sample": parts["train"], "per_step": parts["train"] * batch})
    lift, clip = rows
    lift["saved_vs_clip"] = 1 - lift["per_sample"] / clip["per_sample"]
    lift["saved_vs_clip_steps_only"] = 1 - (lift["per_sample"] - lift["embedding_pass"]) / clip["per_sample"]
    return rows


def _optimizer(modules: nn.Module, cfg: Config):
    from lift_fast.train.optim import build_optimizer

    return build_optimizer(modules, cfg.train)


def _cpu_peak_bytes(function) -> int:
    """Peak bytes allocated on the CPU while `function()` runs, above what was allocated before it
    (the running sum of the profiler's [memory] events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    current = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU:
            current += event.nbytes()
            peak = max(peak, current)
    return peak


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_step_memory(cfg: Config, mode: str, batch: int, dim: int, device: torch.device | str = "cpu") -> dict:
    """Peak memory of one steady training step of `mode` (lift or clip) at `batch` samples on `device`.

    Builds the config's image tower (and text tower for clip) with random weights, runs two steps of
    forward, the CLIP loss, backward and AdamW on random inputs (bf16 autocast on CUDA, fp32 on CPU),
    and measures the second. Returns {"mode", "batch", "peak_bytes" (whole process view: weights,
    AdamW state, batch and the step's peak), "weights_and_state_bytes", "parameters"}.
    Raises ConfigError naming the setting for a bad model config.
    """
    from lift_fast.kernels import clip_loss
    from lift_fast.models.text_tower import TextTransformer
    from lift_fast.models.vit import build_model

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    device = torch.device(device)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size, dim, cfg.train.logit_scale_init)
    modules = nn.ModuleDict({"image": model})
    size = cfg.data.image_size
    images = torch.randn(batch, 3, size, size)
    if mode == "clip":
        spec = text_tower_spec(cfg)
        modules["text"] = TextTransformer(spec, dim, eot_token_id=spec.vocab_size - 1,
                                          grad_checkpointing=cfg.model.grad_checkpointing in ("selective", "full"))
        texts = torch.randint(1, spec.vocab_size - 1, (batch, spec.context_length))
        texts[:, -1] = spec.vocab_size - 1  # every caption fills the context, as padded ones cost the same
    else:
        texts = F.normalize(torch.randn(batch, dim), dim=-1)
    modules.to(device)
    images, texts = images.to(device), texts.to(device)
    optimizer = _optimizer(modules, cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            image_features = model(images)
            text_features = modules["text"](texts) if mode == "clip" else texts
            loss = clip_loss(image_features, text_features, model.logit_scale.exp())
        loss.backward()
        optimizer.step()

    step()  # AdamW's state appears in the first step
    optimizer.zero_grad(set_to_none=True)
    resident = _bytes(modules.parameters()) + _bytes(t for state in optimizer.state.values() for t in state.values()
                                                     if torch.is_tensor(t)) + _bytes([images, texts])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resident + _cpu_peak_bytes(step)
    return {"mode": mode, "batch": batch, "device": str(device), "peak_bytes": peak, "weights_and_state_bytes": resident,
            "parameters": sum(p.numel() for p in modules.parameters())}


def format_table(rows: list[dict], memory: list[dict] | None = None) -> str:
    """The rows of flops_rows (and peak_step_memory) as a plain-text table, GFLOPs and GiB."""
    lines = [f"{'':24}" + "".join(f"{row['mode'].upper():>12}" for row in rows)]
    for part in (*PARTS, "per_sample"):
        lines.append(f"{part + ' GFLOPs':24}" + "".join(f"{row[part] / 1e9:12.3f}" for row in rows))
    lines.append(f"{'per_step TFLOPs':24}" + "".join(f"{row['per_step'] / 1e12:12.3f}" for row in rows))
    if memory:
        lines.append(f"{'peak GiB (batch ' + str(memory[0]['batch']) + ')':24}"
                     + "".join(f"{m['peak_bytes'] / 2**30:12.3f}" for m in memory))
    lift = rows[0]
    lines.append(f"LIFT saves {lift['saved_vs_clip']:.1%} of CLIP's FLOPs per sample (global batch {lift['global_batch']}); "
                 f"{lift['saved_vs_clip_steps_only']:.1%} without the embedding pass")
    if memory:
        lines.append(f"LIFT saves {1 - memory[0]['peak_bytes'] / memory[1]['peak_bytes']:.1%} of CLIP's peak memory "
                     f"per step (batch {memory[0]['batch']}, measured on {memory[0].get('device', 'cpu')})")
    return "\n".join(lines)


def run_flops(cfg: Config, *, global_batch: int | None = None, epochs: float = 1.0, memory_batch: int | None = None,
              device: str = "cpu", as_json: bool = False) -> dict:
    """What `lift-fast flops` prints: the FLOP rows of both modes (and measured peak memory), as a table
    or JSON; returns {"encoder", "flops": rows, "memory": rows or []}.

    Raises ConfigError for epochs <= 0 or a bad model config, FileNotFoundError for an embed.model not here.
    """
    import json

    if not epochs > 0:
        raise ConfigError(f"--epochs {epochs}: samples seen / captions must be > 0 (inf leaves the embedding pass out)")
    encoder = frozen_encoder(cfg)
    rows = flops_rows(cfg, encoder, global_batch=global_batch or 0, epochs=epochs)
    memory = [peak_step_memory(cfg, mode, memory_batch, encoder.dim, device) for mode in MODES] if memory_batch else []
    result = {"encoder": {"model": encoder.name, "flops_per_caption": encoder.flops_per_caption, "dim": encoder.dim,
                          "tokens": cfg.embed.max_length}, "epochs": epochs, "flops": rows, "memory": memory}
    if as_json:
        print(json.dumps(result))
    else:
        print(f"{cfg.model.name} at {cfg.data.image_size} px, joint width {encoder.dim}; CLIP text tower "
              f"{cfg.model.text_width} wide x {cfg.model.text_layers} layers at {cfg.model.text_context} tokens; "
              f"LIFT embedding pass: {encoder.name} at {cfg.embed.max_length} tokens "
              f"({encoder.flops_per_caption / 1e9:.2f} GFLOPs a caption) / {epochs:g} epochs")
        print(format_table(rows, memory))
    return result
