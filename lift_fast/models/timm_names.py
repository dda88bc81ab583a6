"""Tower weights to and from timm's VisionTransformer state dicts.

Block, patch-embedding and final-norm names are timm's already (`blocks.i.attn.qkv.weight`, ...). What
differs is the class token: timm's default (`no_embed_class=False`) puts the class token's position
embedding in row 0 of `pos_embed` ([1, 1+N, W]) and adds it after concatenating, where this tower keeps
`pos_embed` for the patches only ([1, N, W]) and the class token without one. So
`ours.cls_token = timm.cls_token + timm.pos_embed[:, :1]` and `ours.pos_embed = timm.pos_embed[:, 1:]`,
and the way back writes a zero row 0. timm's classifier (`head`) has no counterpart: the LIFT head is
trained against the text embeddings instead, and it is not exported.

    timm.create_model("vit_base_patch16_224", **timm_kwargs(model)).load_state_dict(to_timm_state_dict(model))
    model.visual.load_state_dict(from_timm_state_dict(timm_model.state_dict(), class_token=False))
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from lift_fast.models.vit import LiftImageEncoder, VisionTransformer

# timm keys with no counterpart in the tower that are dropped on the way in: the ImageNet classifier
TIMM_CLASSIFIER_KEYS = ("head.weight", "head.bias")
_BLOCK_KEY = re.compile(r"blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_TOWER_KEYS = {"patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias", "pos_embed", "cls_token",
               "norm_pre.weight", "norm_pre.bias"}  # norm_pre: model.pre_norm (timm's pre_norm=True)


def image_tower(model: nn.Module) -> VisionTransformer:
    """The ViT of a LiftImageEncoder (its `visual`), or `model` itself when it is one."""
    return model.visual if isinstance(model, LiftImageEncoder) else model


def timm_kwargs(model: nn.Module) -> dict:
    """Keyword arguments for timm's VisionTransformer (or timm.create_model) that build the same network
    as this tower, without a classifier: the state dict of `to_timm_state_dict` loads into it strictly.

    Mean pooling maps to global_pool="avg" with fc_norm=False: timm then applies `norm` to every token
    before the mean, as this tower does (its default for "avg", fc_norm=True, normalises after pooling).
    """
    tower = image_tower(model)
    spec = tower.spec
    grid = math.isqrt(tower.pos_embed.shape[1])
    kwargs = dict(img_size=grid * spec.patch_size, patch_size=spec.patch_size, embed_dim=spec.width, depth=spec.depth,
                  num_heads=spec.heads, mlp_ratio=spec.mlp_ratio, num_classes=0, class_token=tower.cls_token is not None,
                  global_pool="token" if tower.cls_token is not None else "avg", fc_norm=False, no_embed_class=False)
    if isinstance(getattr(tower, "norm_pre", None), nn.LayerNorm):
        kwargs["pre_norm"] = True  # model.pre_norm; timm's default (False) otherwise, so left out
    return kwargs


def to_timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's weights under timm's VisionTransformer names (see timm_kwargs for the matching model).

    model: a LiftImageEncoder (its `visual` tower is taken; the LIFT head and logit scale are left out) or
    a VisionTransformer. A fixed sincos position embedding is written as timm's `pos_embed` too.
    With model.pre_norm, timm's patch convolution has no bias (CLIP's layout): the bias is added to the
    patches' position embeddings instead, which is the same sum before norm_pre.
    Returns new tensors for pos_embed and cls_token, and the tower's own tensors (detached) otherwise.
    """
    tower = image_tower(model)
    state = {name: tensor.detach() for name, tensor in tower.state_dict().items()}
    pos_embed = tower.pos_embed.detach()  # [1, N, W]; a buffer outside state_dict when sincos
    if isinstance(getattr(tower, "norm_pre", None), nn.LayerNorm):
        pos_embed = pos_embed + state.pop("patch_embed.proj.bias")  # [1, N, W] + [W]
    if tower.cls_token is not None:
        # timm adds pos_embed row 0 to its class token; this tower's class token has no position
        pos_embed = torch.cat([torch.zeros_like(pos_embed[:, :1]), pos_embed], dim=1)  # [1, 1+N, W]
        state["cls_token"] = tower.cls_token.detach().clone()
    state["pos_embed"] = pos_embed
    return state


def keys_without_counterpart(state: dict[str, torch.Tensor]) -> list[str]:
    """The keys of a timm VisionTransformer state dict that this tower has no place for (sorted): register
    tokens, layer scale, fc_norm, norm_pre, attention pooling ...; the classifier is not among them (dropped)."""
    return sorted(key for key in state if key not in _TOWER_KEYS and key not in TIMM_CLASSIFIER_KEYS
                  and not _BLOCK_KEY.fullmatch(key))


def from_timm_state_dict(state: dict[str, torch.Tensor], *, class_token: bool | None = None) -> dict[str, torch.Tensor]:
    """A timm VisionTransformer state dict as this tower's state dict, for `model.visual.load_state_dict`.

    state: timm names, with or without a class token (`cls_token`, pos_embed with or without its row 0,
    as timm's no_embed_class), with or without the classifier (`head.*`, dropped), with or without a
    patch-convolution bias (zero when absent: timm's pre_norm towers have none).
    class_token: None keeps the class token when the state has one (for model.pooling=cls); False drops
    it (for LIFT's mean pooling: the patch tokens keep their position embeddings, and the network no
    longer sees the class token, so it is a starting point for training, not the same function).
    Returns the tower's keys; a tower with model.pos_embed=sincos has no pos_embed parameter, so drop that
    key before loading into one.
    Raises ValueError naming the keys that have no counterpart here (register tokens, layer scale, an
    fc_norm after pooling, a pre-norm ...), a pos_embed whose length is not a square grid (plus one
    class-token row), or class_token=True for a state without one.
    """
    unknown = keys_without_counterpart(state)
    if unknown:
        raise ValueError(f"timm state dict has keys with no counterpart in lift-fast's ViT: {', '.join(unknown)} "
                         "(supported: plain pre-norm ViT blocks, patch_embed.proj, pos_embed, cls_token, norm_pre, norm; "
                         "timm's fc_norm normalises after pooling, which this tower does not)")
    if "pos_embed" not in state:
        raise ValueError("timm state dict has no pos_embed (a model made with pos_embed='none' does not fit this tower)")
    has_class_token = "cls_token" in state
    if class_token and not has_class_token:
        raise ValueError("class_token=True, but the timm state dict has no cls_token")
    pos_embed = state["pos_embed"]  # [1, prefix + N, W]
    length = pos_embed.shape[1]
    prefix = length - math.isqrt(length) ** 2
    if prefix not in (0, 1) or (prefix == 1 and not has_class_token):
        raise ValueError(f"timm pos_embed has {length} rows: expected a square grid of patches"
                         f"{', plus one row for the class token' if has_class_token else ''}")
    out = {key: tensor for key, tensor in state.items() if key not in TIMM_CLASSIFIER_KEYS and key != "cls_token"}
    out["pos_embed"] = pos_embed[:, prefix:]
    if "patch_embed.proj.weight" in state and "patch_embed.proj.bias" not in state:
        # timm's pre_norm (CLIP-style) towers have a bias-free patch convolution
        weight = state["patch_embed.proj.weight"]
        out["patch_embed.proj.bias"] = weight.new_zeros(weight.shape[0])
    if has_class_token and class_token is not False:
        # row 0 (when there is one) moves onto the class token
        out["cls_token"] = state["cls_token"] + pos_embed[:, :1] if prefix else state["cls_token"]
    return out
