"""FLOPs of the image tower, the LIFT head, the CLIP baseline's text tower, the frozen encoder's one-off
pass and the contrastive loss, by formula, for throughput (FLOP/s), MFU and `lift-fast flops`.

A multiply-add counts as 2 FLOPs, and only matrix products are counted (patch-embedding convolution,
linear layers, the two attention matmuls), as torch.utils.flop_counter.FlopCounterMode counts them;
norms, softmax, GELU, residual adds and pooling are left out (under 1% of a ViT-B/16). Note that the
widely quoted "17.6 GFLOPs" of ViT-B/16 at 224 px (fvcore, timm tables) counts multiply-adds once:
it is ~35 GFLOPs in this module's unit. Training is taken as 3x forward (backward = 2x forward),
the usual convention for MFU; activation recomputation (model.grad_checkpointing) is not counted,
since MFU counts the model's FLOPs, not the hardware's. Attention matmuls count the whole L x L square
(as FlopCounterMode does for written-out attention and for SDPA), also under a causal mask, where flash
kernels skip about half of it.

Per sample of a training step (`step_flops_per_sample`), for a global batch N and joint width D:
- LIFT (model.text_tower=frozen): image tower + head (3 x forward), the loss against frozen texts
  (2 N D forward; 4 N D backward: the similarity recomputed and the image gradient, see
  kernels/lift_fast_kernels/clip_loss.py), and the frozen encoder's one-off pass over every caption spread over the
  samples seen (its forward FLOPs per caption / epochs).
- CLIP (model.text_tower=transformer): the same image side, the text tower (3 x forward, every step),
  and the loss with text gradients (2 N D forward, 6 N D backward).
"""

from __future__ import annotations

from torch import nn

from lift_fast.models.text_tower import TextSpec
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
                           head_hidden: int = 0, patch_dropout: float = 0.0, pooling: str = "mean",
                           text: TextSpec | None = None) -> int:
    """FLOPs of one training step per sample, what the trainer logs as tflops and MFU: the tower and head
    (3 x forward, as `vit_flops_per_image`'s "train"), the text tower for CLIP (`text`, 3 x forward), and
    the contrastive loss (6 * global_batch * text_dim against frozen texts: the similarity GEMM forward,
    its recomputation and the image-gradient GEMM backward; 10 * global_batch * text_dim with the
    text gradient's column pass: a second recomputation and the text-gradient GEMM). LIFT's one-off embedding pass is not part of a step (`step_flops_per_sample`)."""
    return int(step_flops_per_sample(spec, image_size, text_dim, global_batch, head_hidden=head_hidden,
                                     patch_dropout=patch_dropout, pooling=pooling, text=text)["train"])


def text_tower_flops_per_caption(spec: TextSpec, embed_dim: int, tokens: int = 0) -> dict[str, int]:
    """Forward FLOPs of one caption through the CLIP text tower (models/text_tower.py) at `tokens`
    positions (0: the context length, which CLIP always runs: captions are padded to it).

    Returns {"attention_projections", "attention_matmuls" (the whole square), "mlp", "projection" (the
    pooled row only), "forward" (all), "train" (3 x forward: the token embedding is a lookup, so every
    counted matmul has both backward products)}. Raises ValueError for tokens beyond the context.
    """
    length = tokens or spec.context_length
    if not 0 < length <= spec.context_length:
        raise ValueError(f"{length} tokens do not fit the text tower's context of {spec.context_length}")
    width, hidden = spec.width, int(spec.width * spec.mlp_ratio)
    flops = {
        "attention_projections": spec.layers * 2 * length * width * (3 * width + width),
        "attention_matmuls": spec.layers * 2 * (2 * length * length * width),
        "mlp": spec.layers * 2 * length * (width * hidden + hidden * width),
        "projection": 2 * width * embed_dim,
    }
    flops["forward"] = sum(flops.values())
    flops["train"] = 3 * flops["forward"]
    return flops


def encoder_flops_per_caption(model: nn.Module, tokens: int) -> int:
    """Forward FLOPs of a frozen Hugging Face encoder (BERT, Qwen3, Mistral ...) over one caption of
    `tokens` tokens: 2 x tokens x the weights of every nn.Linear (a BERT pooler's once: it sees one token)
    plus the attention matmuls, 4 x layers x tokens^2 x (heads x head dim), as FlopCounterMode counts
    eager attention. Poolers beyond that (NV-Embed's latent attention) are not counted.

    model: the module (a meta-device copy from its config is enough: only shapes are read).
    Raises ValueError when the model's config lacks num_hidden_layers / num_attention_heads.
    """
    config = getattr(model, "config", None)
    try:
        layers, heads = config.num_hidden_layers, config.num_attention_heads
    except AttributeError:
        raise ValueError(f"{type(model).__name__}: no config with num_hidden_layers and num_attention_heads, "
                         "so its attention FLOPs cannot be counted") from None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = once = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if "pooler" in name.split("."):
                once += module.weight.numel()
            else:
                per_token += module.weight.numel()
    return 2 * tokens * per_token + 2 * once + 4 * layers * tokens * tokens * heads * head_dim


def loss_flops_per_sample(global_batch: int, dim: int, text_gradients: bool) -> int:
    """The fused CLIP/SigLIP loss's matmul FLOPs per sample: 2 N D forward, 4 N D backward against
    frozen texts (recomputed similarities, image gradient) or 8 N D with text gradients (their column
    pass recomputes the similarities once more, so each text row's gradient is written once)."""
    return (2 + (8 if text_gradients else 4)) * global_batch * dim


def step_flops_per_sample(spec: ViTSpec, image_size: int, dim: int, global_batch: int, *, head_hidden: int = 0,
                          patch_dropout: float = 0.0, pooling: str = "mean", text: TextSpec | None = None,
                          encoder_flops: int = 0, epochs: float = 1.0) -> dict[str, float]:
    """FLOPs of one training step per sample, by part, for LIFT (text=None) or CLIP (text: the text tower).

    dim: the joint width (LIFT: the store's dim); encoder_flops: LIFT's frozen encoder forward FLOPs per
    caption (`encoder_flops_per_caption`; 0 leaves the embedding pass out); epochs: samples seen / captions,
    over which that one-off pass is spread. Returns {"image_tower", "head", "text_tower" (CLIP),
    "embedding_pass" (LIFT), "loss", "train" (all)}. Raises ValueError for epochs <= 0.
    """
    if epochs <= 0:
        raise ValueError(f"epochs (samples seen / captions) must be > 0, got {epochs}")
    image = vit_flops_per_image(spec, image_size, dim, head_hidden, patch_dropout, pooling)
    parts: dict[str, float] = {"image_tower": 3 * image["tower"], "head": 3 * image["head"]}
    if text is None:
        parts["embedding_pass"] = encoder_flops / epochs
    else:
        parts["text_tower"] = text_tower_flops_per_caption(text, dim)["train"]
    parts["loss"] = loss_flops_per_sample(global_batch, dim, text_gradients=text is not None)
    parts["train"] = sum(parts.values())
    return parts
