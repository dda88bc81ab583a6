"""FLOPs of the image tower and LIFT head, by formula, for throughput (FLOP/s) and MFU.

A multiply-add counts as 2 FLOPs, and only matrix products are counted (patch-embedding convolution,
linear layers, the two attention matmuls), as torch.utils.flop_counter.FlopCounterMode counts them;
norms, softmax, GELU, residual adds and pooling are left out (under 1% of a ViT-B/16). Note that the
widely quoted "17.6 GFLOPs" of ViT-B/16 at 224 px (fvcore, timm tables) counts multiply-adds once:
it is ~35 GFLOPs in this module's unit. Training is taken as 3x forward (backward = 2x forward),
the usual convention for MFU; activation recomputation (model.grad_checkpointing) is not counted,
since MFU counts the model's FLOPs, not the hardware's.
"""

from __future__ import annotations

from lift_fast.models.vit import ViTSpec, kept_patches


def vit_flops_per_image(spec: ViTSpec, image_size: int, text_dim: int, head_hidden: int = 0,
                        patch_dropout: float = 0.0, pooling: str = "mean") -> dict[str, int]:
    """Forward FLOPs of one image through the ViT and the LIFT head (Linear width->hidden, GELU, Linear
    hidden->text_dim), with FLIP patch dropout as in training (the patch embedding still sees every patch).

    spec: the ViT (width, depth, heads, patch size, mlp ratio); image_size: side of the square image;
    head_hidden: 0 means text_dim, as in build_model; pooling: "mean" (no class token) or "cls" (one more
    token in every block).
    Returns {"patch_embed", "attention_projections" (qkv and out), "attention_matmuls" (q k^T and
    weights v), "mlp", "head", "tower" (all but the head), "forward" (all), "train" (3 x forward)}.
    Raises ValueError for an image size that is not a multiple of the patch size or an unknown pooling.
    """
    if image_size % spec.patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {spec.patch_size}")
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    width, hidden = spec.width, head_hidden or text_dim
    patches = (image_size // spec.patch_size) ** 2
    tokens = kept_patches(patches, patch_dropout) + (pooling == "cls")  # tokens through every block
    mlp_hidden = int(width * spec.mlp_ratio)
    flops = {
        "patch_embed": 2 * patches * (3 * spec.patch_size ** 2) * width,
        "attention_projections": spec.depth * 2 * tokens * width * (3 * width + width),
        "attention_matmuls": spec.depth * 2 * (2 * tokens * tokens * width),  # summed over heads
        "mlp": spec.depth * 2 * tokens * (width * mlp_hidden + mlp_hidden * width),
        "head": 2 * (width * hidden + hidden * text_dim),
    }
    flops["tower"] = sum(value for name, value in flops.items() if name != "head")
    flops["forward"] = flops["tower"] + flops["head"]
    flops["train"] = 3 * flops["forward"]
    return flops


def train_flops_per_sample(spec: ViTSpec, image_size: int, text_dim: int, global_batch: int, *,
                           head_hidden: int = 0, patch_dropout: float = 0.0, pooling: str = "mean") -> int:
    """FLOPs of one training step per sample: the tower and head (3 x forward, as `vit_flops_per_image`'s
    "train") plus the contrastive loss against frozen texts (6 * global_batch * text_dim: the similarity
    GEMM forward, its recomputation and the image-gradient GEMM backward)."""
    tower = vit_flops_per_image(spec, image_size, text_dim, head_hidden, patch_dropout, pooling)["train"]
    return tower + 6 * global_batch * text_dim
