"""`lift-fast export`: a run's image tower as a folder that timm, open_clip or lift-fast itself loads.

    export_run("runs/a", "exports/a-timm", "timm")        # config.json + model.safetensors (timm's own layout)
    timm.create_model("local-dir:exports/a-timm", pretrained=True)        # the tower; features as lift-fast's

    export_run("runs/a", "exports/a-lift", "lift")        # tower + head + logit scale + encoder identity
    model, preprocess = lift_fast.load_image_encoder("exports/a-lift")

Formats (docs/export.md has the commands and what each one holds):
- timm: the tower under timm's VisionTransformer names, and timm's config.json (`architecture`,
  `model_args` as timm_names.timm_kwargs, `pretrained_cfg` with the eval preprocessing). The LIFT head
  has no place in a timm classifier model and is left out: features are the pooled tower output.
- open_clip: open_clip's own VisionTransformer always has a class token that every patch attends to
  and ends in one bias-free linear projection, so it cannot hold LIFT's tower (mean of patch tokens,
  no class token) nor its MLP head. The nearest layout that holds both exactly is open_clip's timm
  tower (`vision_cfg.timm_model_name`): `trunk.*` is the tower in timm's names, `head.mlp.*` the
  LIFT head (open_clip's `timm_proj="mlp"` has 2 x embed_dim hidden units; the head's are padded with
  zero units, which add exactly nothing). `model.encode_image(x, normalize=True)` then equals the
  lift-fast model's features.
- lift: lift-fast's own state dict (tower, head, logit scale, SigLIP's logit bias), for
  `load_image_encoder`, zero-shot use against the same frozen text encoder, and the CLIP_benchmark adapter.

Every export writes `lift_export.json` beside the weights: the checkpoint and its step, the run's
resolved config, the embedding store's manifest (the encoder identity) and the preprocessing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lift_fast import __version__
from lift_fast.atomic import publish_dir, write_json
from lift_fast.config import Config, ConfigError, config_to_dict, load_config
from lift_fast.data.augment import CLIP_MEAN, CLIP_STD
from lift_fast.embed.store import EMBED_SETTINGS
from lift_fast.eval.model import preprocess
from lift_fast.models.timm_names import image_tower, timm_kwargs, to_timm_state_dict
from lift_fast.models.vit import SIZES, LiftImageEncoder, build_model
from lift_fast.train import RunFolderError
from lift_fast.train.checkpoint import PATTERN, latest_checkpoint, load_weights

FORMATS = ("timm", "open_clip", "lift")
PROVENANCE = "lift_export.json"  # written by every export
WEIGHTS = "model.safetensors"  # timm's and lift's weights file
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_VISUAL = "open_clip_visual.safetensors"  # model.visual's state dict, loaded strictly
FORMAT_VERSION = 1
_HEAD_OUT = "head.fc2.weight"  # [text_dim, hidden]
# timm architectures registered as vit_{size}_patch{P}_224 (timm 1.0); model_args override every shape
_TIMM_PATCHES = {"tiny": (16,), "small": (8, 16, 32), "base": (8, 16, 32), "large": (14, 16, 32)}


class EvalTransform:
    """The eval loader's view of one image: centre square, bicubic to image_size, CLIP mean/std.

    transform(pil_image) -> [3, S, S] float32. Raises ShardError naming the image when it does not decode.
    """

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, self.image_size)

    def __repr__(self) -> str:
        return f"EvalTransform(centre square, bicubic {self.image_size}px, CLIP mean/std)"


def preprocess_spec(image_size: int) -> dict:
    """The preprocessing an export records, in words and numbers (the eval loader's)."""
    return {"image_size": image_size, "crop": "centre square of the shorter side", "resize": "bicubic, antialiased",
            "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "range": "RGB in [0, 1] before normalising"}


def text_dim_of(weights_file: Path) -> int:
    """The feature width (the text encoder's dim) of a lift-fast state dict file, from the head's last layer."""
    with safe_open(str(weights_file), framework="pt") as file:
        if _HEAD_OUT not in file.keys():  # noqa: SIM118 (not a dict)
            raise RunFolderError(f"{weights_file} has no {_HEAD_OUT}: not a lift-fast model's weights")
        return int(file.get_slice(_HEAD_OUT).get_shape()[0])


def build_from_weights(cfg: Config, folder: Path) -> LiftImageEncoder:
    """The model of `cfg` with the weights of `folder/model.safetensors` (a checkpoint or a lift export),
    in eval mode on the CPU. A run trained with model.attention=flash gets `auto` (flash where it can run,
    SDPA elsewhere: the same weights), so that it loads on a machine without flash-attn.
    Raises FileNotFoundError, or RunFolderError naming the file when it does not fit."""
    weights_file = folder / WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} does not exist")
    model_cfg = dataclasses.replace(cfg.model, attention="auto") if cfg.model.attention == "flash" else cfg.model
    model = build_model(model_cfg, cfg.data.image_size, text_dim_of(weights_file), cfg.train.logit_scale_init)
    if model_cfg.text_tower == "transformer":  # a CLIP-mode run: its trained text tower is in the weights too
        from lift_fast.models.text_tower import build_text_tower

        model.text = build_text_tower(model_cfg, text_dim_of(weights_file))[0]
    with safe_open(str(weights_file), framework="pt") as file:
        if "logit_bias" in file.keys():  # noqa: SIM118 (not a dict)
            model.register_parameter("logit_bias", nn.Parameter(torch.zeros(())))
    load_weights(model, folder)
    return model.eval()


def load_image_encoder(path: str | Path, *, checkpoint: str | Path | None = None) -> tuple[LiftImageEncoder, EvalTransform]:
    """A trained LIFT image encoder and its preprocessing, from a lift export or a run folder.

    path: a folder written by `lift-fast export --format lift` (lift_export.json + model.safetensors), a
    run folder (config.yaml; its newest checkpoint, or `checkpoint`), or a checkpoint folder of a run
    (RUN/checkpoints/step_N).
    Returns (model, preprocess): model(images [B, 3, S, S]) -> L2-normalised features [B, D] in the frozen
    text encoder's space (model.logit_scale.exp() is the trained scale), in eval mode on the CPU;
    preprocess(PIL image) -> [3, S, S], the eval transform the run was evaluated with.
    Raises FileNotFoundError when `path` is neither, RunFolderError for weights that do not fit the config.
    """
    path = Path(path)
    if checkpoint is None and PATTERN.fullmatch(path.name) and path.parent.name == "checkpoints":
        path, checkpoint = path.parent.parent, path  # a checkpoint folder: its run's config
    cfg = export_config(path)
    folder = path if (path / PROVENANCE).is_file() else _checkpoint(path, checkpoint)
    return build_from_weights(cfg, folder), EvalTransform(cfg.data.image_size)


def lift_export_record(path: str | Path) -> dict:
    """The lift_export.json of the lift export in folder `path` (checkpoint, step, config, store manifest,
    preprocessing). Raises RunFolderError for a timm or open_clip export (their weights load with those
    libraries), FileNotFoundError when there is no lift_export.json."""
    record = json.loads((Path(path) / PROVENANCE).read_text(encoding="utf-8"))
    if record.get("format") != "lift":
        raise RunFolderError(f"{Path(path) / PROVENANCE}: a {record.get('format')!r} export; lift-fast reads --format "
                             "lift exports here (timm and open_clip exports load with those libraries)")
    return record


def export_config(path: str | Path) -> Config:
    """The resolved config a lift export (from its lift_export.json) or a run folder (config.yaml) was
    trained with: cfg.embed is the frozen text encoder to embed class names and captions with
    (`lift_fast.embed.load_encoder(cfg.embed)`). Raises FileNotFoundError when `path` is neither,
    RunFolderError for a timm or open_clip export (their weights load with those libraries)."""
    path = Path(path)
    if (path / PROVENANCE).is_file():
        record = lift_export_record(path)
        return load_config(overrides={f"{section}.{name}": value for section, fields in record["config"].items()
                                      for name, value in fields.items()})
    if (path / "config.yaml").is_file():
        return load_config(path / "config.yaml")
    raise FileNotFoundError(f"{path}: neither a lift export ({PROVENANCE}) nor a run folder (config.yaml)")


def _checkpoint(run_dir: Path, checkpoint: str | Path | None) -> Path:
    folder = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if folder is None:
        raise FileNotFoundError(f"run folder {run_dir} has no complete checkpoint to export")
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"--checkpoint {folder}: not a checkpoint folder (no {WEIGHTS})")
    return folder


def _step(checkpoint: Path) -> int | None:
    with safe_open(str(checkpoint / WEIGHTS), framework="pt") as file:
        step = (file.metadata() or {}).get("step")
    return int(step) if step is not None else None


# --- timm ---------------------------------------------------------------------------------------------

def timm_architecture(model: nn.Module) -> str:
    """The timm architecture a tower is recorded under: vit_{size}_patch{P}_224 for its width and patch
    size where timm registers one (else patch16's); config.json's model_args set every shape."""
    spec = image_tower(model).spec
    size = next((name for name, (width, _, _) in SIZES.items() if width == spec.width), "base")
    patch = spec.patch_size if spec.patch_size in _TIMM_PATCHES[size] else 16
    return f"vit_{size}_patch{patch}_224"


def timm_config(model: nn.Module) -> dict:
    """timm's config.json for the tower: architecture, model_args (timm_kwargs) and pretrained_cfg with
    the eval preprocessing (crop_pct 1: resize the shorter side to the input size, centre crop)."""
    kwargs = timm_kwargs(model)
    size = kwargs["img_size"]
    pretrained_cfg = {"tag": "lift_fast", "custom_load": False, "input_size": [3, size, size], "fixed_input_size": True,
                      "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center", "mean": list(CLIP_MEAN),
                      "std": list(CLIP_STD), "num_classes": 0, "pool_size": None, "first_conv": "patch_embed.proj",
                      "classifier": "head"}
    return {"architecture": timm_architecture(model), "num_classes": 0, "num_features": kwargs["embed_dim"],
            "global_pool": kwargs["global_pool"], "model_args": kwargs, "pretrained_cfg": pretrained_cfg}


def write_timm(model: nn.Module, out: Path) -> list[str]:
    """config.json + model.safetensors (tower only) in `out`; returns the file names."""
    state = {name: tensor.contiguous() for name, tensor in to_timm_state_dict(model).items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    write_json(out / "config.json", timm_config(model), indent=2)
    return ["config.json", WEIGHTS]


# --- open_clip ----------------------------------------------------------------------------------------

def open_clip_visual_state(model: LiftImageEncoder) -> dict[str, torch.Tensor]:
    """model.visual's state dict of open_clip's timm tower: `trunk.*` (timm names) and `head.mlp.*`, the LIFT
    head with its hidden layer padded to 2 x text_dim by zero units (GELU(0) = 0 meets zero weights: exact).
    Raises ConfigError when the head is wider than 2 x text_dim (model.head_hidden), which open_clip cannot hold."""
    head = model.head
    hidden, text_dim = head.fc1.out_features, head.fc2.out_features
    if hidden > 2 * text_dim:
        raise ConfigError(f"model.head_hidden={hidden} is wider than open_clip's timm_proj='mlp' head "
                          f"(2 x embed_dim = {2 * text_dim}); export --format timm or lift instead")
    pad = 2 * text_dim - hidden
    state = {f"trunk.{name}": tensor for name, tensor in to_timm_state_dict(model).items()}
    with torch.no_grad():
        state["head.mlp.fc1.weight"] = torch.cat([head.fc1.weight, head.fc1.weight.new_zeros(pad, head.fc1.in_features)])
        state["head.mlp.fc1.bias"] = torch.cat([head.fc1.bias, head.fc1.bias.new_zeros(pad)])
        state["head.mlp.fc2.weight"] = torch.cat([head.fc2.weight, head.fc2.weight.new_zeros(text_dim, pad)], dim=1)
        state["head.mlp.fc2.bias"] = head.fc2.bias.detach().clone()
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def open_clip_config(model: LiftImageEncoder, timm_dir: Path) -> dict:
    """open_clip_config.json: a CLIP whose vision tower is timm's model in `timm_dir` (`local-dir:`, an
    absolute path: edit it after moving the folder) with LIFT's pooling and head. The text tower is a
    minimal placeholder (LIFT's text side is the frozen encoder named in lift_export.json)."""
    kwargs = timm_kwargs(model)
    size = kwargs["img_size"]
    vision_cfg = {"timm_model_name": f"local-dir:{timm_dir.resolve()}", "timm_model_pretrained": False,
                  "timm_pool": kwargs["global_pool"], "timm_proj": "mlp", "timm_proj_bias": True, "image_size": size}
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}
    preprocess_cfg = {"size": size, "mode": "RGB", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    return {"model_cfg": {"embed_dim": model.head.fc2.out_features, "vision_cfg": vision_cfg, "text_cfg": text_cfg},
            "preprocess_cfg": preprocess_cfg}


def write_open_clip(model: LiftImageEncoder, out: Path, final: Path) -> list[str]:
    """open_clip_config.json, open_clip_visual.safetensors and timm/config.json (the tower's architecture
    for open_clip's timm adapter) in `out`, whose config names `final` (where `out` is published)."""
    state = open_clip_visual_state(model)
    (out / "timm").mkdir()
    write_json(out / "timm" / "config.json", timm_config(model), indent=2)
    # not a *.safetensors at the top: open_clip's local-dir loader would load such a file into the whole CLIP
    (out / "visual").mkdir()
    save_file(state, str(out / "visual" / OPEN_CLIP_VISUAL), metadata={"format": "pt"})
    write_json(out / OPEN_CLIP_CONFIG, open_clip_config(model, final / "timm"), indent=2)
    return [OPEN_CLIP_CONFIG, f"visual/{OPEN_CLIP_VISUAL}", "timm/config.json"]


# --- lift ---------------------------------------------------------------------------------------------

def write_lift(model: nn.Module, out: Path, step: int | None) -> list[str]:
    """model.safetensors: lift-fast's whole state dict (tower, head, logit scale, logit bias)."""
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"step": str(step), "format": "pt"})
    return [WEIGHTS]


# --- the command --------------------------------------------------------------------------------------

def _store_record(run_dir: Path, cfg: Config, embeddings: str | Path | None) -> tuple[dict | None, dict]:
    """(the store manifest, the encoder identity) of a run: the manifest of `embeddings` (checked against the
    run's embed settings), else the run folder's store_manifest.json when training left one; the identity
    is the manifest's, or the run's embed settings when neither is there."""
    manifest = None
    if embeddings is not None:
        from lift_fast.train.store_check import check_store  # the trainer's own check of a store against a config

        manifest = check_store(embeddings, cfg)
    elif (run_dir / "store_manifest.json").is_file():
        manifest = json.loads((run_dir / "store_manifest.json").read_text(encoding="utf-8"))
    identity = {name: getattr(cfg.embed, name) for name in EMBED_SETTINGS}
    if manifest is not None:  # the encoder's own record (store format 4), else the manifest's top level
        encoder = manifest.get("encoder")
        identity.update(encoder if isinstance(encoder, dict) else {key: value for key, value in manifest.items()
                                                                    if key not in ("shards", "data_shards")})
        identity.update(dim=manifest.get("dim", identity["dim"]), normalized=manifest.get("normalized"))
    return manifest, identity


def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str, *, checkpoint: str | Path | None = None,
               embeddings: str | Path | None = None) -> dict:
    """Export a run's checkpoint (the newest, or `checkpoint`) to the new folder `out_dir` in format `fmt`.

    embeddings: the run's training store, whose manifest (checked against the run's embed settings) is
    recorded as the encoder identity; without it, a store_manifest.json in the run folder, else the
    run's embed settings alone. The folder is written under a temporary name and renamed.
    Returns lift_export.json's contents. Raises ConfigError for an unknown format (or a head open_clip
    cannot hold), FileNotFoundError for a missing run, config or checkpoint, FileExistsError when
    `out_dir` exists and is not empty, RunFolderError for weights that do not fit the run's config,
    and StoreError/StoreMismatchError for a store that is not the run's.
    """
    run_dir, out = Path(run_dir), Path(out_dir)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"run folder {run_dir} has no config.yaml")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder; choose a new one")
    cfg = load_config(run_dir / "config.yaml")
    folder = _checkpoint(run_dir, checkpoint)
    model = build_from_weights(cfg, folder)
    manifest, identity = _store_record(run_dir, cfg, embeddings)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp_{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    step = _step(folder)
    try:
        if fmt == "timm":
            files = write_timm(model, tmp)
        elif fmt == "open_clip":
            files = write_open_clip(model, tmp, out)
        else:
            files = write_lift(model, tmp, step)
        record = {"format": fmt, "format_version": FORMAT_VERSION, "lift_fast_version": __version__, "files": files,
                  "run": str(run_dir.resolve()), "checkpoint": str(folder.resolve()), "checkpoint_step": step,
                  "text_dim": model.head.fc2.out_features, "features": _features_note(fmt),
                  "preprocess": preprocess_spec(cfg.data.image_size), "encoder": identity, "store_manifest": manifest,
                  "config": config_to_dict(cfg)}
        write_json(tmp / PROVENANCE, record, indent=2)
    except BaseException:  # a refused head, a full disk, Ctrl-C: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # empty (checked above): publish_dir renames over it
    publish_dir(tmp, out)
    return record


def _features_note(fmt: str) -> str:
    if fmt == "timm":
        return "pooled tower output [B, width] (timm forward_features + forward_head); the LIFT head is not included"
    if fmt == "open_clip":
        return "model.encode_image(x, normalize=True): the LIFT features [B, text_dim] in the text encoder's space"
    return "load_image_encoder(path)[0](x): L2-normalised LIFT features [B, text_dim] in the text encoder's space"
