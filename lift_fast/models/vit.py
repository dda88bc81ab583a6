"""The image tower: a ViT (timm's parameter names), mean pooling of patch tokens, and the LIFT head.

    images [B, 3, H, W] -> patches [B, N, width] (+ position) -> patch dropout (training) -> blocks
        -> norm -> pool [B, width] -> head [B, text_dim]

Parameter names follow timm's VisionTransformer (`patch_embed.proj`, `pos_embed`, `blocks.i.attn.qkv`,
`blocks.i.mlp.fc1`, `norm`, ...); models/timm_names.py maps tower weights to and from timm checkpoints.
Attention kernels (model.attention) live in models/attention.py, the FLOP formula in models/flops.py.

Activation checkpointing (model.grad_checkpointing, resolved from `auto` by train/build.py with the
planner, lift_fast/plan/): `none` keeps every activation the backward needs; `selective` runs each
block under torch's selective activation checkpointing, keeping the GEMM and attention outputs and
recomputing norms, GELU and casts in the backward (no extra GEMM FLOPs); `full` keeps only each
block's input and recomputes the whole block (one more forward of the blocks).
model.grad_checkpointing_blocks=k (0: all) applies the policy to the first k blocks only; the
others run as model.grad_checkpointing_rest says (none or selective). The planner picks the k
whose peak fits the GPU with the least recompute (full on k blocks, selective on the rest).

Under autocast the residual stream stays in the compute dtype: the position embedding is cast to it,
and the LayerNorms run in the dtype of their input (their kernels accumulate in float32; CUDA
autocast would otherwise run them on a float32 copy, keep that copy for the backward and hand a
float32 stream to the residual adds). tests/test_grad_checkpointing.py checks this against float32.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lift_fast.config import ConfigError
from lift_fast.models.attention import Attention, flash_import_error

# width, depth, heads (timm / the ViT paper)
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
ALIASES = {"vit_b16": "vit_base_patch16", "vit_b32": "vit_base_patch32", "vit_l14": "vit_large_patch14",
           "vit_s16": "vit_small_patch16", "vit_t16": "vit_tiny_patch16"}
# model.grad_checkpointing, least recompute first (auto is resolved to one of the others before training)
CHECKPOINT_POLICIES = ("none", "selective", "full")


def checkpoint_policy(value: str | bool) -> str:
    """model.grad_checkpointing as one of CHECKPOINT_POLICIES: true -> full, false -> none, and `auto`
    (not resolved: no planner asked, as outside training) -> none. Raises ValueError for anything else."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value == "auto":
        return "none"
    if value not in CHECKPOINT_POLICIES:
        raise ValueError(f"grad_checkpointing must be auto, {', '.join(CHECKPOINT_POLICIES)} or a bool, got {value!r}")
    return value


def block_policies(policy: str | bool, depth: int, blocks: int = 0, rest: str = "none") -> list[str]:
    """Each of `depth` blocks' checkpointing: `policy` (checkpoint_policy's reading) on the first
    `blocks` (0: all), `rest` (none or selective) on the others. Raises ConfigError naming
    model.grad_checkpointing_blocks when blocks > depth, or model.grad_checkpointing_rest when rest
    is neither none nor selective."""
    if not 0 <= blocks <= depth:
        raise ConfigError(f"model.grad_checkpointing_blocks={blocks}: the ViT has {depth} blocks (0: all of them)")
    if rest not in ("none", "selective"):
        raise ConfigError(f"model.grad_checkpointing_rest={rest!r}: none or selective")
    blocks = blocks or depth
    return [checkpoint_policy(policy)] * blocks + [rest] * (depth - blocks)


@functools.cache
def _saved_ops() -> frozenset:
    """The ops whose outputs `selective` keeps: GEMMs and attention kernels (torch's and ours)."""
    aten, names = torch.ops.aten, ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
                                   "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                                   "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
                                   "_efficient_attention_forward")
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    ops.update(packet.default for packet in (getattr(torch.ops.lift_fast, "flash_attention", None),) if packet)
    return frozenset(ops)


def _keep_gemm_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing: keep GEMM and attention outputs, recompute the rest (norms, GELU, casts)."""
    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that runs in the dtype of its input under autocast (weights cast to it), so a
    half-precision residual stream stays in half precision and its half-precision input is what the
    backward keeps. Without autocast, or on float32 input, it is nn.LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


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
        self.norm1 = LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads, backend)
        self.norm2 = LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def kept_patches(num_patches: int, patch_dropout: float) -> int:
    """Patch tokens that patch dropout keeps out of `num_patches` (timm's and FLIP's rounding, at least 1)."""
    return max(1, int(num_patches * (1.0 - patch_dropout)))


class PatchDropout(nn.Module):
    """FLIP patch dropout: in training, each image keeps a random subset of its patch tokens.

    [B, N, W] -> [B, kept_patches(N, prob), W]; the identity in eval mode or at prob 0. Runs after the
    position embedding is added, so kept tokens carry their positions.
    """

    def __init__(self, prob: float):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch dropout must be in [0, 1), got {prob}")
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        batch, tokens, width = x.shape
        keep = kept_patches(tokens, self.prob)
        indices = torch.rand(batch, tokens, device=x.device).argsort(dim=1)[:, :keep]  # [B, keep]
        return x.gather(1, indices.unsqueeze(-1).expand(batch, keep, width))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, 3, H, W] -> [B, N, W]


class VisionTransformer(nn.Module):
    """ViT returning one pooled feature per image: the mean of patch tokens (LIFT) or the class token.

    attention: model.attention (auto|flash|sdpa|math); patch_dropout: FLIP's fraction of patch tokens
    dropped in training; grad_checkpointing: none, selective or full (see the module docstring; a
    bool means full or none), on the first checkpoint_blocks blocks (0: all) and checkpoint_rest on
    the others (block_policies); pre_norm: a LayerNorm on the tokens before the first block (model.pre_norm).
    """

    def __init__(self, spec: ViTSpec, image_size: int, *, pooling: str = "mean", pos_embed: str = "learned",
                 attention: str = "sdpa", patch_dropout: float = 0.0, grad_checkpointing: str | bool = "none",
                 pre_norm: bool = False, checkpoint_blocks: int = 0, checkpoint_rest: str = "none"):
        super().__init__()
        if image_size % spec.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {spec.patch_size}")
        grid = image_size // spec.patch_size
        self.spec, self.pooling, self.width = spec, pooling, spec.width
        self.grad_checkpointing = checkpoint_policy(grad_checkpointing)
        self.block_policies = block_policies(grad_checkpointing, spec.depth, checkpoint_blocks, checkpoint_rest)
        self.patch_embed = PatchEmbed(spec.patch_size, spec.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.width)) if pooling == "cls" else None
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_pos_embed(grid, spec.width)[None], persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, spec.width) * 0.02)
        self.patch_dropout = PatchDropout(patch_dropout)
        # timm's pre_norm, open_clip's ln_pre: CLIP towers normalise the tokens before the first block
        self.norm_pre = LayerNorm(spec.width, eps=1e-6) if pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*[Block(spec.width, spec.heads, spec.mlp_ratio, attention) for _ in range(spec.depth)])
        self.norm = LayerNorm(spec.width, eps=1e-6)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # [B, N, W], in the compute dtype under autocast
        x = self.patch_dropout(x + self.pos_embed.to(x.dtype))  # N kept in training
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+N, W]
        x = self.norm_pre(x)
        recompute = torch.is_grad_enabled()
        for block, policy in zip(self.blocks, self.block_policies):
            if not recompute or policy == "none":
                x = block(x)
            elif policy == "full":
                x = checkpoint(block, x, use_reentrant=False)
            elif policy == "selective":
                x = checkpoint(block, x, use_reentrant=False,
                               context_fn=partial(create_selective_checkpoint_contexts, _keep_gemm_outputs))
        x = self.norm(x)
        return x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # [B, W]


class LiftHead(nn.Module):
    """LIFT's projection from the ViT width to the text dim: Linear -> GELU -> Linear."""

    def __init__(self, width: int, hidden: int, text_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, text_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(pooled))  # [B, W] -> [B, text_dim]

    def hidden(self, pooled: torch.Tensor) -> torch.Tensor:
        """What enters the last Linear: [B, W] -> [B, hidden] (model.fuse_projection takes it from here)."""
        return self.act(self.fc1(pooled))


class LiftImageEncoder(nn.Module):
    """ViT + LIFT head + the learnable logit scale (stored as its log, as in CLIP)."""

    def __init__(self, tower: VisionTransformer, text_dim: int, head_hidden: int = 0, logit_scale_init: float = 1 / 0.07):
        super().__init__()
        self.visual = tower
        self.head = LiftHead(tower.width, head_hidden or text_dim, text_dim)
        self.head.apply(_init_weights)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))

    def forward(self, images: torch.Tensor, project: bool = True) -> torch.Tensor:
        """images [B, 3, H, W] -> L2-normalised image features [B, text_dim]; with project=False the
        head's hidden states before its last Linear [B, hidden], unnormalised, for a loss that fuses
        that Linear and the norm (model.fuse_projection, lift_fast.kernels.fused_projection_clip_loss)."""
        if not project:
            return self.head.hidden(self.visual(images))
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
    model.grad_checkpointing=auto builds without checkpointing: train/build.py resolves it first.

    Raises ConfigError naming the setting for an unknown model.name, an image size that is not a
    multiple of the patch size, a sincos position embedding on a width not divisible by 4, a
    model.patch_dropout outside [0, 1), model.grad_checkpointing_blocks over the depth, or
    model.attention=flash where flash-attn does not import.
    (Whether flash can run on the tensors it gets, CUDA in half precision, is checked in forward.)
    """
    spec = vit_spec(model_cfg.name, patch_size=model_cfg.patch_size, depth=model_cfg.depth)
    if image_size % spec.patch_size:
        raise ConfigError(f"data.image_size={image_size} is not a multiple of the patch size {spec.patch_size} "
                          f"(model.name={model_cfg.name!r}, model.patch_size={model_cfg.patch_size})")
    if model_cfg.pos_embed == "sincos" and spec.width % 4:
        raise ConfigError(f"model.pos_embed=sincos needs a ViT width divisible by 4; model.name={model_cfg.name!r} "
                          f"has width {spec.width}")
    if not 0.0 <= model_cfg.patch_dropout < 1.0:
        raise ConfigError(f"model.patch_dropout={model_cfg.patch_dropout} must be in [0, 1): the fraction of "
                          "patch tokens dropped in training (FLIP uses 0.5; 0 turns it off)")
    if model_cfg.attention == "flash" and (reason := flash_import_error()) is not None:
        raise ConfigError(f"model.attention=flash cannot run: {reason}. Install the GPU extra "
                          "(pip install 'lift-fast[gpu]'), or use model.attention=auto (sdpa where flash cannot run)")
    tower = VisionTransformer(spec, image_size, pooling=model_cfg.pooling, pos_embed=model_cfg.pos_embed,
                              attention=model_cfg.attention, patch_dropout=model_cfg.patch_dropout,
                              grad_checkpointing=model_cfg.grad_checkpointing, pre_norm=model_cfg.pre_norm,
                              checkpoint_blocks=model_cfg.grad_checkpointing_blocks,
                              checkpoint_rest=model_cfg.grad_checkpointing_rest)
    return LiftImageEncoder(tower, text_dim, model_cfg.head_hidden, logit_scale_init)
