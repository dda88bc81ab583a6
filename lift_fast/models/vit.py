"""The image tower: a ViT (timm's parameter names), mean pooling of patch tokens, and the LIFT head.

    images [B, 3, H, W] -> patches [B, N, width] -> blocks -> pool [B, width] -> head [B, text_dim]

Parameter names follow timm's VisionTransformer (`patch_embed.proj`, `pos_embed`, `blocks.i.attn.qkv`,
`blocks.i.mlp.fc1`, `norm`, ...), so tower weights map onto timm's checkpoints one to one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lift_fast.config import ConfigError

# width, depth, heads (timm / the ViT paper)
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
ALIASES = {"vit_b16": "vit_base_patch16", "vit_b32": "vit_base_patch32", "vit_l14": "vit_large_patch14",
           "vit_s16": "vit_small_patch16", "vit_t16": "vit_tiny_patch16"}


@dataclass
class ViTSpec:
    width: int
    depth: int
    heads: int
    patch_size: int
    mlp_ratio: float = 4.0


def vit_spec(name: str, *, patch_size: int = 0, depth: int = 0) -> ViTSpec:
    """Parse 'vit_{tiny,small,base,large}_patch{P}' (or an alias such as 'vit_b16'); 0 keeps the preset.

    Raises ConfigError naming model.name when the name is not one of these.
    """
    match = re.fullmatch(r"vit_(tiny|small|base|large)_patch(\d+)", ALIASES.get(name, name))
    if match is None:
        raise ConfigError(f"model.name={name!r} is not a known ViT; use vit_{{tiny,small,base,large}}_patch{{8,14,16,32}} "
                         f"or one of {', '.join(ALIASES)}")
    width, preset_depth, heads = SIZES[match.group(1)]
    return ViTSpec(width, depth or preset_depth, heads, patch_size or int(match.group(2)))


def sincos_pos_embed(grid: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE-style): [grid*grid, width]."""
    if width % 4:
        raise ValueError(f"sincos position embedding needs a width divisible by 4, got {width}")
    freqs = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = [f(coord.flatten()[:, None] * freqs) for coord in (xs, ys) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, backend: str = "sdpa"):
        super().__init__()
        if width % heads:
            raise ValueError(f"ViT width {width} is not divisible by its {heads} heads")
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape  # x: [B, N, W]
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, W/heads]
        if self.backend == "math":
            weights = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
            out = weights.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads, backend)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, 3, H, W] -> [B, N, W]


class VisionTransformer(nn.Module):
    """ViT returning one pooled feature per image: the mean of patch tokens (LIFT) or the class token."""

    def __init__(self, spec: ViTSpec, image_size: int, *, pooling: str = "mean", pos_embed: str = "learned",
                 attention: str = "sdpa"):
        super().__init__()
        if image_size % spec.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {spec.patch_size}")
        grid = image_size // spec.patch_size
        self.spec, self.pooling, self.width = spec, pooling, spec.width
        self.patch_embed = PatchEmbed(spec.patch_size, spec.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.width)) if pooling == "cls" else None
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_pos_embed(grid, spec.width)[None], persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, spec.width) * 0.02)
        self.blocks = nn.Sequential(*[Block(spec.width, spec.heads, spec.mlp_ratio, attention) for _ in range(spec.depth)])
        self.norm = nn.LayerNorm(spec.width, eps=1e-6)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images) + self.pos_embed  # [B, N, W]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+N, W]
        x = self.norm(self.blocks(x))
        return x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # [B, W]


class LiftHead(nn.Module):
    """LIFT's projection from the ViT width to the text dim: Linear -> GELU -> Linear."""

    def __init__(self, width: int, hidden: int, text_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, text_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(pooled)))  # [B, W] -> [B, text_dim]


class LiftImageEncoder(nn.Module):
    """ViT + LIFT head + the learnable logit scale (stored as its log, as in CLIP)."""

    def __init__(self, tower: VisionTransformer, text_dim: int, head_hidden: int = 0, logit_scale_init: float = 1 / 0.07):
        super().__init__()
        self.visual = tower
        self.head = LiftHead(tower.width, head_hidden or text_dim, text_dim)
        self.head.apply(_init_weights)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> L2-normalised image features [B, text_dim]."""
        return F.normalize(self.head(self.visual(images)), dim=-1)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_model(model_cfg, image_size: int, text_dim: int, logit_scale_init: float = 1 / 0.07) -> LiftImageEncoder:
    """Build the image tower from a ModelConfig for square images of side `image_size` (data.image_size).

    Raises ConfigError naming the setting for an unknown model.name, an image size that is not a
    multiple of the patch size, or a sincos position embedding on a width not divisible by 4.
    """
    spec = vit_spec(model_cfg.name, patch_size=model_cfg.patch_size, depth=model_cfg.depth)
    if image_size % spec.patch_size:
        raise ConfigError(f"data.image_size={image_size} is not a multiple of the patch size {spec.patch_size} "
                          f"(model.name={model_cfg.name!r}, model.patch_size={model_cfg.patch_size})")
    if model_cfg.pos_embed == "sincos" and spec.width % 4:
        raise ConfigError(f"model.pos_embed=sincos needs a ViT width divisible by 4; model.name={model_cfg.name!r} "
                          f"has width {spec.width}")
    backend = "sdpa" if model_cfg.attention == "auto" else model_cfg.attention
    tower = VisionTransformer(spec, image_size, pooling=model_cfg.pooling, pos_embed=model_cfg.pos_embed, attention=backend)
    return LiftImageEncoder(tower, text_dim, model_cfg.head_hidden, logit_scale_init)
