"""Configuration: dataclasses with defaults, then a YAML/TOML file, then dotted overrides.

    cfg = load_config("run.yaml", ["train.steps=200", "model.name=vit_tiny_patch16"])
    save_config(cfg, run_dir / "config.yaml")

Every field is typed; values from files and the command line are checked against that type and
against the field's `choices`/`min` metadata. Unknown sections or fields, and bad values, raise
`ConfigError` naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lift_fast.atomic import write_text


class ConfigError(ValueError):
    """A config key that does not exist or a value that does not fit its field."""


def _field(default: Any, doc: str, *, choices: tuple | None = None, min: float | None = None,
           aliases: dict | None = None):
    """A dataclass field carrying its docstring and validation rules as metadata (aliases: older
    spellings of a value, e.g. a bool that became a choice, read as the value they stand for)."""
    meta = {"doc": doc, "choices": choices, "min": min, "aliases": aliases}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Where images come from and how they are prepared."""

    image_size: int = _field(64, "side of the square training crop, in pixels", min=8)
    backend: str = _field("auto", "image loader: auto prefers DALI where it is installed and works, else PIL",
                          choices=("auto", "dali", "pil"))
    crop_scale: tuple[float, float] = _field((0.9, 1.0), "RandomResizedCrop area range (LIFT: 0.9-1.0)")
    hflip: bool = _field(False, "random horizontal flip (off: it would flip left/right relations)")
    num_workers: int | str = _field("auto", "PIL loader: worker processes (0: in the training process); DALI loader: "
                                    "CPU threads (0 counts as 1); auto: the cores this process may use (its CPU "
                                    "affinity) divided by LOCAL_WORLD_SIZE, less one for the training process on "
                                    "PIL (data/loader.py worker_count)", min=0)
    shuffle_window: int = _field(32, "shards whose samples are mixed together in the training stream (memory: "
                                 "one permutation of their samples)", min=1)
    on_error: str = _field("error", "bad sample (corrupt image, no embedding): error or counted skip", choices=("error", "skip"))
    prefetch: int = _field(2, "DALI loader: batches prepared ahead on a feed thread (0: in the training step, "
                           "as the synchronous baseline)", min=0)
    caption_weights: str = _field("", "training: probability of each caption source of the store, drawn per sample "
                                  "per step, as SOURCE=WEIGHT,... (e.g. txt=0.2,json:re_caption=0.8; '': each "
                                  "source equally; a source left out is never drawn)")


@dataclass
class EmbedConfig:
    """The frozen text encoder and how captions are turned into vectors."""

    model: str = _field("all-minilm-l6-v2", "encoder: a local path, a hub id, or 'all-minilm-l6-v2' (bundled)")
    pooling: str = _field("mean", "token pooling; 'model' calls the model's own encode() (NV-Embed, needs "
                          "trust_remote_code)", choices=("mean", "cls", "last", "model"))
    prompt: str = _field("", "prefix prepended to every caption (an instruction, for LLM embedders)")
    max_length: int = _field(77, "tokens kept per caption; longer ones are truncated and counted", min=1)
    normalize: bool = _field(True, "store L2-normalised rows")
    dim: int = _field(0, "Matryoshka truncation: keep the first dim features, then renormalise (0: the "
                      "model's full width)", min=0)
    append_eos: str = _field("auto", "append the tokenizer's EOS token when it does not end sequences with it; "
                             "auto: on for last-token pooling (Qwen3-Embedding), off otherwise (quote on/off in YAML)",
                             choices=("auto", "on", "off"))
    dtype: str = _field("float16", "storage dtype of the rows (int8: per-row float32 scales)",
                        choices=("float16", "float32", "int8"))
    batch_size: int = _field(128, "captions per forward pass, at most", min=1)
    max_tokens: int = _field(0, "padded tokens per forward pass, at most (0: auto, 1024 on a CPU, no limit "
                             "beyond batch_size on a GPU)", min=0)
    length_step: int = _field(0, "padded lengths are rounded up to multiples of this, so a compiled model sees "
                              "few shapes (0: auto, 16 or more when compiled, exact lengths otherwise)", min=0)
    packing: str = _field("auto", "batches without padding: packed (captions end to end with restarting position ids, "
                          "where the model honours them: checked on two captions; else exact), exact (batches padded to "
                          "their own longest caption, at most 5 % padding), auto (packed under flash_attention_2, whose "
                          "variable-length kernel skips the cross-caption attention; exact elsewhere), off (padded "
                          "batches, lengths bucketed by length_step when compiled)",
                          choices=("auto", "packed", "exact", "off"))
    precision: str = _field("auto", "compute dtype; auto: bf16 on CUDA, fp32 on CPU; bf16-mixed: fp32 weights, "
                            "bf16 matmuls under autocast (fast on CPUs with AVX512-BF16/AMX, checked against fp32)",
                            choices=("auto", "bf16", "bf16-mixed", "fp16", "fp32"))
    quantize: str = _field("none", "torchao weight quantization: int8 (dynamic int8 activations, int8 weights), "
                           "fp8 (CUDA, compute capability >= 8.9); checked against min_fidelity",
                           choices=("none", "int8", "fp8"))
    min_fidelity: float = _field(0.99, "a quantized (or bf16-mixed) encoder runs only when the mean and minimum "
                                 "cosine of its rows to the unquantized (fp32) model's, on a sample of captions, "
                                 "are at least this", min=0.0)
    fidelity_sample: int = _field(256, "captions (from the first data shard) for the fidelity check", min=1)
    compile: str = _field("auto", "torch.compile the model; auto: on for CUDA, off on CPU (quote on/off in YAML)",
                          choices=("auto", "on", "off"))
    captions: str = _field("txt", "caption sources, one store row per (key, source): txt (KEY.txt) and/or "
                           "json:FIELD (a string field of KEY.json, e.g. json:re_caption), comma-separated")
    on_error: str = _field("error", "empty/undecodable/missing caption (of any source): error or counted skip",
                           choices=("error", "skip"))
    on_long: str = _field("truncate", "caption longer than max_length: cut at max_length (counted as truncated, "
                          "as LIFT does), counted skip, or error", choices=("truncate", "skip", "error"))
    trust_remote_code: bool = _field(False, "allow code from the model folder (only for models that need it, "
                                     "e.g. NV-Embed-v2)")


@dataclass
class ModelConfig:
    """The image tower: ViT, pooling and LIFT head."""

    name: str = _field("vit_tiny_patch16", "ViT preset, vit_{tiny,small,base,large}_patch{8,14,16,32} or vit_b16")
    patch_size: int = _field(0, "override the preset's patch size (0 keeps it)", min=0)
    depth: int = _field(0, "override the preset's number of blocks (0 keeps it)", min=0)
    init: str = _field("", "start the tower from a timm or open_clip checkpoint (.safetensors, or .pt/.pth read with "
                       "weights_only): names mapped, position embedding resampled to data.image_size; a fresh run only, "
                       "resume takes the checkpoint's weights ('': random weights)")
    pooling: str = _field("mean", "image feature: mean of patch tokens (LIFT) or class token", choices=("mean", "cls"))
    pre_norm: bool = _field(False, "a LayerNorm on the tokens before the first block (timm's pre_norm, open_clip's "
                            "ln_pre, which OpenAI and LAION CLIP towers have): for model.init from such a tower")
    pos_embed: str = _field("learned", "position embedding", choices=("learned", "sincos"))
    head_hidden: int = _field(0, "hidden width of the LIFT head (0: the text dim)", min=0)
    attention: str = _field("auto", "attention kernel: auto (flash-attn on CUDA in fp16/bf16 where installed, "
                            "else sdpa), flash (flash-attn, or an error), sdpa, math (plain reference)",
                            choices=("auto", "flash", "sdpa", "math"))
    patch_dropout: float = _field(0.0, "FLIP patch dropout: fraction of patch tokens dropped at random in "
                                  "training, in [0, 1) (0: off)", min=0.0)
    grad_checkpointing: str = _field("auto", "activation checkpointing of the ViT blocks: none; selective (keep GEMM and "
                                     "attention outputs, recompute norms and GELU: no extra GEMM FLOPs); full (recompute "
                                     "each block, and each text tower block: a third more compute); auto: the least "
                                     "recompute that fits the GPU, from the planner (lift-fast plan; none on CPU); "
                                     "true/false mean full/none", choices=("auto", "none", "selective", "full"),
                                     aliases={"true": "full", "false": "none"})
    grad_checkpointing_blocks: int = _field(0, "how many of the ViT's blocks (the first ones) model.grad_checkpointing "
                                            "applies to; the others follow model.grad_checkpointing_rest (0: all "
                                            "blocks; auto sets it)", min=0)
    grad_checkpointing_rest: str = _field("none", "the checkpointing of the blocks model.grad_checkpointing_blocks "
                                          "leaves out: none (keep everything) or selective (auto sets it)",
                                          choices=("none", "selective"))
    fuse_projection: bool = _field(False, "compute the head's last Linear, the norm and the loss in one fused call "
                                   "(lift_fast.kernels.fused_projection_clip_loss): no [B, D] features kept; not under fsdp")
    text_tower: str = _field("frozen", "frozen: LIFT (caption embeddings from the store); transformer: the CLIP "
                             "baseline, a text transformer trained jointly on the raw captions (models/text_tower.py; "
                             "train/build.py; DDP or fsdp; docs/training.md)",
                             choices=("frozen", "transformer"))
    text_width: int = _field(512, "text transformer width (CLIP ViT-B/16: 512)", min=8)
    text_layers: int = _field(12, "text transformer blocks (CLIP: 12)", min=1)
    text_heads: int = _field(8, "text transformer attention heads (CLIP: 8)", min=1)
    text_context: int = _field(77, "tokens per caption for the text transformer, start and end of text included "
                               "(CLIP: 77; longer captions are cut, keeping the end-of-text token)", min=2)
    text_tokenizer: str = _field("wordpiece", "text transformer tokenizer: wordpiece (the bundled encoder's, "
                                 "vocab 30,522) or clip_bpe (OpenAI CLIP's, vocab 49,408; needs open_clip)",
                                 choices=("wordpiece", "clip_bpe"))


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and logging."""

    steps: int = _field(2000, "optimizer steps", min=1)
    batch_size: int = _field(128, "global batch size (split evenly over the ranks of a torchrun job)", min=1)
    lr: float = _field(1e-3, "peak learning rate", min=0.0)
    min_lr: float = _field(0.0, "learning rate at the end of the cosine", min=0.0)
    warmup_steps: int = _field(100, "linear warm-up steps", min=0)
    schedule_steps: int = _field(0, "length of the cosine schedule (0: train.steps when the run starts); kept "
                                 "when train.steps changes on resume, past it the lr stays at train.min_lr; set "
                                 "it on resume to re-stretch the cosine on purpose", min=0)
    weight_decay: float = _field(0.2, "AdamW weight decay (not on biases, norms, logit scale)", min=0.0)
    betas: tuple[float, float] = _field((0.9, 0.98), "AdamW betas")
    eps: float = _field(1e-6, "AdamW epsilon", min=0.0)
    grad_clip: float = _field(1.0, "max gradient norm (0: off)", min=0.0)
    loss: str = _field("clip", "contrastive loss", choices=("clip", "siglip"))
    logit_scale_init: float = _field(14.285714, "initial logit scale (1/temperature)", min=0.0)
    logit_scale_max: float = _field(100.0, "the logit scale is clamped at this value", min=1.0)
    seed: int = _field(0, "seed for weights, data order and augmentation")
    threads: int = _field(0, "CPU threads for torch (0: torch's default)", min=0)
    log_every: int = _field(20, "steps between metrics.jsonl lines", min=1)
    checkpoint_every: int = _field(500, "steps between checkpoints (0: only at the end and on interruption)", min=0)
    keep_checkpoints: int = _field(2, "complete checkpoints kept", min=1)
    checkpoint_async: bool = _field(True, "write checkpoints on a background thread while training goes on (the state "
                                    "is copied to host memory first, pinned on CUDA); false: the step waits for the write")
    precision: str = _field("auto", "auto: bf16 autocast on CUDA, fp32 on CPU; bf16 or fp32 to choose",
                            choices=("auto", "bf16", "fp32"))
    compile: str = _field("auto", "torch.compile the model; auto: on for CUDA, off on CPU (quote on/off in YAML)",
                          choices=("auto", "on", "off"))
    tensorboard: bool = _field(True, "also write the metrics as TensorBoard curves under run/tensorboard/")
    peak_tflops: float = _field(0.0, "peak TFLOP/s for MFU (0: the data-sheet bf16 figure of a known GPU, none on CPU)", min=0.0)
    max_nonfinite: int = _field(10, "NaN/inf losses in a row (each step skipped) before training stops", min=1)
    parallel: str = _field("ddp", "ddp: every rank holds the whole model; fsdp: FSDP2 shards weights, gradients and "
                           "AdamW state over the ranks (large ViTs)", choices=("ddp", "fsdp"))
    ddp_bucket_mb: float = _field(100.0, "train.parallel=ddp: MB of gradients per all-reduce bucket (torch's default "
                                  "25 splits a compiled ViT-B/16 graph into ~17 pieces, 100 into ~5; at least DDP's "
                                  "1 MB first bucket)", min=1.0)
    ddp_grad_compress: str = _field("none", "train.parallel=ddp: all-reduce the gradients in bf16 (half the bytes; the "
                                    "average is rounded to bf16) or as they are", choices=("none", "bf16"))


@dataclass
class EvalConfig:
    """Held-out retrieval, zero-shot classification and compositional tests."""

    batch_size: int = _field(256, "images per forward pass", min=1)
    compositional: bool = _field(True, "run the SugarCrepe-style tests when their JSON files exist")
    precision: str = _field("auto", "image tower precision: auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32",
                            choices=("auto", "bf16", "fp32"))
    max_length: int = _field(0, "tokens kept of the eval tasks' own captions and prompts (0: the run's "
                             "embed.max_length; a task's max_length wins); for long-caption retrieval", min=0)
    long_max_length: int = _field(0, "the --suite lift runs each long-caption set at 77 tokens and at this many "
                                  "(0: the text encoder's position limit)", min=0)
    caption_source: str = _field("", "the store's caption source the eval shards are scored against (txt, "
                                 "json:FIELD; '': the store's first)")


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any, annotation: Any, meta: dict) -> Any:
    """Check `value` against a field's type and rules; return it in the field's type."""
    kind = typing.get_origin(annotation) or annotation
    if meta.get("aliases") and str(value).lower() in meta["aliases"]:
        value = meta["aliases"][str(value).lower()]
    if kind is types.UnionType and typing.get_args(annotation) == (int, str):  # a number, or the word auto
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
            raise ConfigError(f"{key}: expected an integer or auto, got {value!r}")
        kind = int
    try:
        if kind is tuple:
            item_types = typing.get_args(annotation)
            if isinstance(value, str):
                value = yaml.safe_load(value if value.lstrip().startswith("[") else f"[{value}]")
            if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
                raise ConfigError(f"{key}: expected {len(item_types)} values, got {value!r}")
            return tuple(_coerce(key, v, t, meta) for v, t in zip(value, item_types))
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                value = value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ConfigError(f"{key}: expected true or false, got {value!r}")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            value = int(value)
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ConfigError(f"{key}: expected a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        elif kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ConfigError(f"{key}: expected a string, got {value!r}")
            value = str(value)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{key}: cannot read {value!r} as {kind.__name__}") from None
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{key}: {value!r} is below the minimum {meta['min']}")
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    """Set `section.field` on cfg, validating the value."""
    section_name, _, field_name = key.partition(".")
    if section_name not in SECTIONS or not field_name:
        raise ConfigError(f"unknown config key {key!r}: keys look like section.field, sections are {', '.join(SECTIONS)}")
    section = getattr(cfg, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if field_name not in fields:
        raise ConfigError(f"unknown config key {key!r}; {section_name} has {', '.join(fields)}")
    hints = typing.get_type_hints(type(section))
    f = fields[field_name]
    setattr(section, field_name, _coerce(key, value, hints[field_name], dict(f.metadata)))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            out.update(_flatten(value, key + "."))
        else:
            out[key] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a flat {dotted.key: value} dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        tree = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {err}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: expected sections (data, embed, model, train, eval) at the top level")
    return _flatten(tree)


def parse_overrides(items: typing.Iterable[str]) -> dict[str, str]:
    """Turn ["train.steps=200", ...] into {"train.steps": "200", ...}."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.field=value")
        out[key.strip()] = value
    return out


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] | dict = (), *,
                preset: typing.Iterable[str] = ()) -> Config:
    """Defaults, then a preset's dotted settings, then the file at `path` (YAML or TOML), then dotted
    overrides; raises ConfigError naming the key."""
    cfg = Config()
    for key, value in parse_overrides(preset).items():
        _set(cfg, key, value)
    return _apply(cfg, path, overrides)


def _apply(cfg: Config, path: str | Path | None, overrides: typing.Iterable[str] | dict) -> Config:
    """Set the fields of the file at `path`, then the dotted overrides, on cfg; returns cfg."""
    if path is not None:
        for key, value in read_config_file(path).items():
            try:
                _set(cfg, key, value)
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from None
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    for key, value in overrides.items():
        _set(cfg, key, value)
    return cfg


def config_changes(before: Config, after: Config) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in `before`, value in `after`) for every field that differs, in field order."""
    old, new = config_to_dict(before), config_to_dict(after)
    return [(f"{section}.{name}", old[section][name], new[section][name])
            for section in old for name in old[section] if old[section][name] != new[section][name]]


def check_changes(saved: Config, asked: Config, allowed: typing.Iterable[str], *, source: str | Path,
                  action: str) -> None:
    """Refuse settings that differ from a run's saved config outside `allowed`.

    allowed: dotted keys, or `section.*` for a whole section. source: the saved config file, named
    in the message; action: what is being done ("resuming a run"), for the message.
    Raises ConfigError naming each key that may not change, with its saved and asked values.
    """
    allowed = tuple(allowed)

    def may_change(key: str) -> bool:
        return key in allowed or f"{key.partition('.')[0]}.*" in allowed

    refused = [(key, old, new) for key, old, new in config_changes(saved, asked) if not may_change(key)]
    if refused:
        lines = "; ".join(f"{key}: saved {old!r}, asked {new!r}" for key, old, new in refused)
        raise ConfigError(f"{action} keeps the settings saved in {source}, but "
                          f"{'these differ' if len(refused) > 1 else 'this differs'}: {lines}. "
                          f"Only {', '.join(allowed)} may change when {action}; drop the other settings "
                          "(the saved ones apply), or use a new run folder.")


def load_run_config(saved_path: str | Path, path: str | Path | None = None,
                    overrides: typing.Iterable[str] | dict = (), *, allowed: typing.Iterable[str] = (),
                    action: str = "continuing a run") -> Config:
    """A run's saved config.yaml, then the file at `path`, then dotted overrides, where only the
    `allowed` keys (see check_changes) may differ from the saved config.

    Raises ConfigError naming the file or key: a missing or bad file, a bad value, or a change
    outside `allowed` (each key with its saved and asked value).
    """
    saved = load_config(saved_path)
    cfg = _apply(copy.deepcopy(saved), path, overrides)
    check_changes(saved, cfg, allowed, source=saved_path, action=action)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The config as plain nested dicts (tuples become lists), ready for YAML or JSON."""

    def plain(value):
        return list(value) if isinstance(value, tuple) else value

    return {name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, name)).items()} for name in SECTIONS}


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe(section: type) -> list[tuple[str, Any, str]]:
    """(field, default, doc) for each field of a config section, for --help output and docs."""
    return [(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory(), f.metadata.get("doc", ""))
            for f in dataclasses.fields(section)]

