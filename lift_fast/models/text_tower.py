"""The CLIP baseline's trainable text tower (model.text_tower=transformer): OpenAI CLIP's text transformer.

    tokens [B, L] (L <= context) -> token embedding + learned position [B, L, width] -> pre-LN blocks with a
        causal mask -> final LayerNorm -> the row at each caption's end-of-text token [B, width]
        -> projection (no bias) [B, embed_dim] -> L2 normalisation

CLIP ViT-B/16's text side is width 512, 12 layers, 8 heads, context 77 (models/tokenizer.py makes the
token ids). The projection goes to the joint width, the dim of the image features, so the loss kernels
of LIFT mode apply unchanged, with text gradients. The causal mask means a token never sees the padding
after it: a batch may be cut to its longest caption (`trim_padding`) without changing any feature.
Parameter layout follows open_clip's TextTransformer (qkv stacked as nn.MultiheadAttention's
in_proj_weight; the projection is its text_projection transposed), so weights map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lift_fast.config import ConfigError
from lift_fast.models.attention import Attention
from lift_fast.models.vit import Mlp

LAYER_NORM_EPS = 1e-5  # CLIP's and open_clip's (torch's default); the ViT uses timm's 1e-6


@dataclass
class TextSpec:
    """The text transformer's shape (CLIP ViT-B/16: 512 wide, 12 layers, 8 heads, 77 tokens, BPE 49,408)."""

    width: int = 512
    layers: int = 12
    heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0


class CausalSelfAttention(Attention):
    """The ViT's multi-head self-attention (its `qkv` and `proj` layers), where token i attends to tokens 0..i.

    math=True writes softmax(q k^T / sqrt(d) + mask) v out, the form torch.utils.flop_counter counts
    on a CPU (it counts nothing for CPU SDPA); otherwise torch's scaled_dot_product_attention.
    """

    def __init__(self, width: int, heads: int):
        if width % heads:
            raise ValueError(f"text tower width {width} is not divisible by its {heads} heads")
        super().__init__(width, heads, "sdpa")
        self.math = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape  # x: [B, L, W]
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if self.math:  # q, k, v: [B, H, L, Dh]
            scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)  # [B, H, L, L]
            future = torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).triu(1)
            out = scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))  # [B, H, L, Dh] -> [B, L, W]


class TextBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """CLIP's text tower: token ids [B, L] -> L2-normalised text features [B, embed_dim].

    spec: the shape; embed_dim: the joint width (the image features' dim); eot_token_id: the token whose
    position is pooled (CLIP BPE's <end_of_text>, WordPiece's [SEP]; each row must hold one);
    grad_checkpointing: recompute each block in backward.
    """

    def __init__(self, spec: TextSpec, embed_dim: int, eot_token_id: int, grad_checkpointing: bool = False):
        super().__init__()
        if not 0 <= eot_token_id < spec.vocab_size:
            raise ValueError(f"end-of-text id {eot_token_id} is outside the vocabulary of {spec.vocab_size}")
        self.spec, self.embed_dim, self.eot_token_id = spec, embed_dim, eot_token_id
        self.grad_checkpointing = grad_checkpointing
        self.token_embedding = nn.Embedding(spec.vocab_size, spec.width)
        self.positional_embedding = nn.Parameter(torch.empty(spec.context_length, spec.width))
        self.blocks = nn.Sequential(*[TextBlock(spec.width, spec.heads, spec.mlp_ratio) for _ in range(spec.layers)])
        self.ln_final = nn.LayerNorm(spec.width, eps=LAYER_NORM_EPS)
        self.projection = nn.Linear(spec.width, embed_dim, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """open_clip's TextTransformer.init_parameters (CLIP's): std 0.02 tokens, 0.01 positions, scaled
        residual projections; zero biases, unit LayerNorms."""
        width, layers = self.spec.width, self.spec.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        residual_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=width ** -0.5)
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=residual_std)
            for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.zeros_(linear.bias)
        nn.init.normal_(self.projection.weight, std=width ** -0.5)

    def set_math_attention(self, enabled: bool = True) -> TextTransformer:
        """Use the written-out attention in every block (for FlopCounterMode on a CPU); returns self."""
        for block in self.blocks:
            block.attn.math = enabled
        return self

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] -> the final-LayerNorm row at each caption's end-of-text token [B, width]."""
        if tokens.ndim != 2 or tokens.shape[1] > self.spec.context_length:
            raise ValueError(f"text tower: token ids must be [batch, at most {self.spec.context_length}], "
                             f"got {list(tokens.shape)}")
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # [B, L, W]
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        end = (tokens == self.eot_token_id).int().argmax(dim=1)  # [B]: the first end-of-text token
        return self.ln_final(x[torch.arange(x.shape[0], device=x.device), end])  # LayerNorm is per token

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] (int64, L <= context) -> L2-normalised text features [B, embed_dim]."""
        return F.normalize(self.projection(self.pooled(tokens)), dim=-1)


def trim_padding(tokens: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """tokens [B, context] -> [B, L], cut after the last column holding a non-pad token (at least one
    column). With the causal mask no feature changes, and a batch of short captions runs in less time."""
    used = (tokens != pad_token_id).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1 if used.numel() else 1]


def text_spec(model_cfg, vocab_size: int) -> TextSpec:
    """The TextSpec of a ModelConfig (model.text_width, text_layers, text_heads, text_context) for a
    tokenizer of `vocab_size` ids. Raises ConfigError naming model.text_heads when the width does not divide."""
    if model_cfg.text_width % model_cfg.text_heads:
        raise ConfigError(f"model.text_width={model_cfg.text_width} is not divisible by model.text_heads="
                          f"{model_cfg.text_heads}")
    return TextSpec(model_cfg.text_width, model_cfg.text_layers, model_cfg.text_heads, model_cfg.text_context, vocab_size)


def build_text_tower(model_cfg, embed_dim: int, tokenizer=None) -> tuple[TextTransformer, object]:
    """The text tower and its tokenizer for a ModelConfig with model.text_tower=transformer.

    embed_dim: the joint width (the image features' dim); tokenizer: a CaptionTokenizer to reuse (default:
    build_tokenizer(model_cfg)). Returns (tower, tokenizer): tokenizer(captions) -> [B, context] ids,
    tower(ids) -> [B, embed_dim]. Raises ConfigError naming the setting (see text_spec, build_tokenizer).
    """
    from lift_fast.models.tokenizer import build_tokenizer

    tokenizer = tokenizer or build_tokenizer(model_cfg)
    spec = text_spec(model_cfg, tokenizer.vocab_size)
    # selective and full both recompute its blocks (auto is resolved before this, in train/build.py)
    recompute = model_cfg.grad_checkpointing in ("selective", "full", True)
    tower = TextTransformer(spec, embed_dim, tokenizer.eot_token_id, recompute)
    return tower, tokenizer
