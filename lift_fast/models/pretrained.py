"""Starting a tower from pretrained weights (`model.init=PATH`): a timm or open_clip checkpoint read safely,
its names mapped to this tower's, its position embedding resampled to the run's patch grid.

    state = read_state_dict("vit_base_patch16_224.safetensors")     # safetensors, or .pt/.pth/.bin
    init_tower(model, "vit_base_patch16_224.safetensors")         # maps, resamples, loads strictly

Layouts read (found from the key names, a `module.`/`model.`/`state_dict` wrapper taken off):
- timm VisionTransformer (`patch_embed.proj.weight`, `blocks.i...`), as timm saves it, with or without
  its classifier; also inside an open_clip model whose tower is a timm model (`visual.trunk.`, or
  `trunk.` in model.visual's own state dict, as `lift-fast export --format open_clip` writes it);
- open_clip's own VisionTransformer (`conv1.weight`, `transformer.resblocks.i...`), alone or as the
  `visual.` part of a whole CLIP checkpoint (the text tower, logit scale and `proj` are dropped: the
  LIFT head takes the projection's place). open_clip's patch convolution has no bias (zero here), and
  its `ln_pre` (OpenAI CLIP, LAION towers) is the tower's `norm_pre`, present with model.pre_norm=true.

The position embedding is resampled bicubically (as timm's `resample_abs_pos_embed`) when the
checkpoint's grid differs from the run's data.image_size / patch size, and the patch kernel (FlexiViT's
pseudo-inverse, as timm's `resample_patch_embed`) when the patch size differs.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lift_fast.config import ConfigError
from lift_fast.models.timm_names import from_timm_state_dict, image_tower, keys_without_counterpart

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")  # read with torch.load(weights_only=True)
# Wrappers training scripts put around a state dict: {"state_dict": ...} (timm's train.py, open_clip's
# main.py), {"model": ...}, and DDP's `module.` prefix.
_CONTAINER_KEYS = ("state_dict", "model", "module")
_OPEN_CLIP_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_OPEN_CLIP_BLOCK_NAMES = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight",
                          "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1",
                          "mlp.c_proj": "mlp.fc2"}
# Tower-level open_clip names with a timm counterpart; `proj` (open_clip's projection into its text
# space) is dropped, since the LIFT head replaces it.
_OPEN_CLIP_DROPPED = ("proj",)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: safetensors, or a pickle (.pt/.pth/.bin) read with weights_only=True.

    A training script's wrapper ({"state_dict": ...}, {"model": ...}) and a `module.` prefix are taken off.
    Raises ConfigError naming model.init and the file when it is missing, of another kind, or not a
    state dict (a pickle holding code is refused by weights_only).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.init={str(path)!r}: no such file (a timm or open_clip checkpoint: .safetensors, "
                          ".pt, .pth or .bin)")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            state = load_file(str(path))
        except Exception as err:  # SafetensorError (a bad header, a cut file) and OSError
            raise ConfigError(f"model.init={str(path)!r} is not a readable safetensors file: {err}") from None
    elif suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refuses pickled code with an UnpicklingError, among others
            raise ConfigError(f"model.init={str(path)!r} cannot be read with torch.load(weights_only=True): {err}") from None
    else:
        raise ConfigError(f"model.init={str(path)!r}: unknown checkpoint kind {suffix!r}; use .safetensors, "
                          f"or {', '.join(PICKLE_SUFFIXES)} (read with torch.load(weights_only=True))")
    while isinstance(state, dict) and len(state) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[key] for key in _CONTAINER_KEYS if isinstance(state.get(key), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.init={str(path)!r} holds no state dict of tensors")
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if all(key.startswith("module.") for key in tensors):
        tensors = {key.removeprefix("module."): value for key, value in tensors.items()}
    return tensors


def checkpoint_layout(state: dict[str, torch.Tensor]) -> str:
    """'timm', 'open_clip' or 'open_clip_timm' (an open_clip model with a timm tower) from the key names;
    '' when none fits."""
    if any(key.startswith(("visual.trunk.", "trunk.")) for key in state):
        return "open_clip_timm"
    if "conv1.weight" in state or "visual.conv1.weight" in state:
        return "open_clip"
    if "patch_embed.proj.weight" in state:
        return "timm"
    return ""


def from_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip VisionTransformer weights (alone, or under `visual.` in a whole CLIP model) under timm's
    VisionTransformer names (class token with pos_embed row 0, as timm's default), for from_timm_state_dict.

    Keys with no timm counterpart are kept under their open_clip names, so the fit check lists them.
    """
    if any(key.startswith("visual.") for key in state):
        state = {key.removeprefix("visual."): value for key, value in state.items() if key.startswith("visual.")}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        block = _OPEN_CLIP_BLOCK.fullmatch(key)
        if block is not None:
            index, rest = block.groups()
            for old, new in _OPEN_CLIP_BLOCK_NAMES.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            out[f"blocks.{index}.{rest}"] = value
        elif key == "conv1.weight":
            out["patch_embed.proj.weight"] = value  # open_clip's conv1 has no bias: from_timm_state_dict zeroes it
        elif key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["pos_embed"] = value.reshape(1, -1, value.shape[-1])
        elif key.startswith("ln_post."):
            out["norm." + key.removeprefix("ln_post.")] = value
        elif key.startswith("ln_pre."):
            out["norm_pre." + key.removeprefix("ln_pre.")] = value  # for a model.pre_norm=true tower
        elif key not in _OPEN_CLIP_DROPPED:
            out[key] = value  # attn_pool.*, ls_1 ...: no counterpart, reported by the fit check
    return out


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, g*g, W] -> [1, grid*grid, W], bicubic over the 2-D patch grid with antialias on, exactly as timm's
    resample_abs_pos_embed (so a tower started here matches timm's own resized model); the same tensor
    when g == grid. Raises ValueError for a non-square length."""
    length, width = pos_embed.shape[1], pos_embed.shape[2]
    old = math.isqrt(length)
    if old * old != length:
        raise ValueError(f"pos_embed has {length} rows, not a square grid of patches")
    if old == grid:
        return pos_embed
    image = pos_embed.reshape(1, old, old, width).permute(0, 3, 1, 2).float()  # [1, W, g, g]
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, grid * grid, width).to(pos_embed.dtype)


def resample_patch_embed(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[W, C, P, P] -> [W, C, p, p] (p = patch_size): FlexiViT's pseudo-inverse of resizing a patch (bicubic,
    antialiased), exactly as timm's resample_patch_embed, so that the kernel applied to a patch resized
    from P to p pixels gives what the old kernel gave on the original patch; the same tensor when P == p."""
    old = weight.shape[-1]
    if old == patch_size:
        return weight
    basis = torch.eye(old * old).reshape(old * old, 1, old, old)  # one image per kernel position
    resized = F.interpolate(basis, size=(patch_size, patch_size), mode="bicubic", antialias=True, align_corners=False)
    resize = resized.squeeze(1).permute(1, 2, 0).reshape(patch_size * patch_size, old * old)  # [p*p, P*P]
    kernel = weight.reshape(weight.shape[0], weight.shape[1], old * old).float() @ torch.linalg.pinv(resize)
    return kernel.reshape(weight.shape[0], weight.shape[1], patch_size, patch_size).to(weight.dtype)


def tower_state_from_checkpoint(state: dict[str, torch.Tensor], model: nn.Module, *,
                                source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A timm or open_clip checkpoint's tensors as `model.visual`'s state dict: names mapped, the class
    token kept for model.pooling=cls and dropped for mean pooling, pos_embed resampled to the tower's grid
    and the patch kernel to the tower's patch size.

    Raises ConfigError naming `source` when the layout is neither, or keys have no counterpart.
    """
    tower = image_tower(model)
    layout = checkpoint_layout(state)
    if layout == "open_clip_timm":
        # the timm model inside open_clip's TimmModel (model.visual alone: `trunk.`); its projection head is
        # open_clip's, not this tower's
        prefix = "visual.trunk." if any(key.startswith("visual.trunk.") for key in state) else "trunk."
        state = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    elif layout == "open_clip":
        state = from_open_clip_state_dict(state)
    elif layout != "timm":
        raise ConfigError(f"{source}: neither a timm nor an open_clip ViT checkpoint (no patch_embed.proj.weight, "
                          f"conv1.weight or visual.trunk.*; first keys: {', '.join(list(state)[:5])})")
    # Keys with no place in the tower go on under their own names, for check_fit to list with the rest.
    unknown = {key: state[key] for key in keys_without_counterpart(state)}
    try:
        mapped = from_timm_state_dict({k: v for k, v in state.items() if k not in unknown},
                                      class_token=tower.cls_token is not None)
        mapped["pos_embed"] = resample_pos_embed(mapped["pos_embed"], _grid(tower))
        kernel = mapped.get("patch_embed.proj.weight")
        if kernel is not None and kernel.ndim == 4 and kernel.shape[-1] == kernel.shape[-2]:
            mapped["patch_embed.proj.weight"] = resample_patch_embed(kernel, tower.spec.patch_size)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    mapped.update(unknown)
    if not isinstance(tower.pos_embed, nn.Parameter):
        mapped.pop("pos_embed")  # model.pos_embed=sincos: fixed, not learned, nothing to load
    return mapped


def _grid(tower: nn.Module) -> int:
    return math.isqrt(tower.pos_embed.shape[1])


def check_fit(tower: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ConfigError naming `source` unless `state` has exactly the tower's names and shapes; the
    message lists the missing, unexpected and mis-shaped keys (what differs between the two networks)."""
    expected = {name: tuple(tensor.shape) for name, tensor in tower.state_dict().items()}
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    reshaped = [f"{name} {tuple(state[name].shape)} vs {expected[name]}"
                for name in state if name in expected and tuple(state[name].shape) != expected[name]]
    if missing or unexpected or reshaped:
        parts = [f"{label}: {', '.join(names)}" for label, names in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped, file vs model", reshaped)) if names]
        pre_norm = ""
        if "norm_pre.weight" in unexpected:
            pre_norm = "model.pre_norm=true (the checkpoint normalises the tokens before the first block), "
        elif "norm_pre.weight" in missing:
            pre_norm = "model.pre_norm=false, "
        raise ConfigError(f"{source} does not fit the tower built from model.* and data.image_size "
                          f"({'; '.join(parts)}). Choose {pre_norm}model.name, model.depth, model.patch_size and "
                          "model.pooling to match the checkpoint (the position embedding and the patch kernel are "
                          "resampled to data.image_size and the patch size)")


def init_tower(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Load a timm or open_clip checkpoint at `path` into the tower of `model` (a LiftImageEncoder or a
    VisionTransformer): names mapped, pos_embed resampled, then loaded strictly. The LIFT head and the
    logit scale keep their fresh values.

    Returns {"tensors": tensors loaded, "from_grid": the checkpoint's patch grid side, "grid": the tower's}.
    Raises ConfigError naming model.init and listing missing, unexpected and mis-shaped keys.
    """
    source = f"model.init={str(path)!r}"
    tower = image_tower(model)
    state = read_state_dict(path)
    mapped = tower_state_from_checkpoint(state, model, source=source)
    check_fit(tower, mapped, source)
    from_grid = _checkpoint_grid(state)
    with torch.no_grad():
        tower.load_state_dict(mapped)
    log.info("%s: %d tensors loaded into the tower (patch grid %d -> %d)", source, len(mapped), from_grid, _grid(tower))
    return {"tensors": len(mapped), "from_grid": from_grid, "grid": _grid(tower)}


def _checkpoint_grid(state: dict[str, torch.Tensor]) -> int:
    # the vision tower's first: a whole CLIP checkpoint's top-level positional_embedding is the text tower's
    for key in ("visual.trunk.pos_embed", "visual.positional_embedding", "trunk.pos_embed", "pos_embed",
                "positional_embedding"):
        if key in state:
            return math.isqrt(state[key].reshape(-1, state[key].shape[-1]).shape[0])
    return 0
