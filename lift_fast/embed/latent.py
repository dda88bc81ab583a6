"""NV-Embed's latent-attention pooling on an already tokenized batch, padded or packed.

NV-Embed-v2 (arXiv 2405.17428; hf.co/nvidia/NV-Embed-v2, whose modeling_nvembed.py is remote code)
is a bidirectional Mistral-7B (`model.embedding_model`) followed by `model.latent_attention_model`:

    x = h + to_out(attention(q=to_q(LN(h)), k, v=to_kv(LN_c(latents))))   # every token attends to 512 latents
    x = x + FF(LN2(x))                                                     # GEGLU, 4x width
    row = mean of x over the pool mask (instruction tokens left out), L2-normalised

Its own `encode(prompts, instruction, max_length)` tokenizes the captions again and recomputes the
latents' keys and values for every caption of every batch (2 x 512 x 4096 x 8 x 4096 x 2 FLOPs, about
275 GFLOPs per caption, a quarter of Mistral-7B's 1.08 TFLOPs at 77 tokens). Here the pooling runs on
the token states of the batch the embed run tokenized once, the latents' keys and values are computed
once per call (they depend on the frozen weights only), and it runs on a packed [T, D] sequence as on a
padded [B, L, D] batch: each token attends to the latents only, never to other tokens.

The weights are the model's own modules (not copies), so quantizing `encoder.model` quantizes them too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def is_latent_model(model: nn.Module) -> bool:
    """Whether `model` has NV-Embed's layout: `embedding_model` and a `latent_attention_model` with
    `cross_attend_blocks` (attention, feed-forward) and `latents`."""
    latent = getattr(model, "latent_attention_model", None)
    return (getattr(model, "embedding_model", None) is not None and latent is not None
            and hasattr(latent, "cross_attend_blocks") and hasattr(latent, "latents"))


class LatentPooling(nn.Module):
    """Latent-attention pooling over the token states of NV-Embed's `latent_attention_model`.

    forward(hidden [..., D], pool_weights [...]) -> [..., D] pooled per token; see `pool_padded` and
    `pool_packed` for the rows.
    """

    def __init__(self, latent_model: nn.Module):
        super().__init__()
        attention_block, ff_block = latent_model.cross_attend_blocks
        self.norm, self.norm_context, self.attention = attention_block.norm, attention_block.norm_context, attention_block.fn
        self.ff_norm, self.ff = ff_block.norm, ff_block.fn
        self.latents = latent_model.latents  # [R, D_latent]
        self.heads = self.attention.heads
        self.output_normalize = bool(getattr(latent_model, "output_normalize", True))

    def latent_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents' keys and values [heads, R, head_dim] each: the same for every caption."""
        context = self.norm_context(self.latents) if self.norm_context is not None else self.latents
        keys, values = self.attention.to_kv(context).chunk(2, dim=-1)  # [R, inner] each
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(0, 1)  # noqa: E731 [heads, R, head_dim]
        return split(keys), split(values)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token states after the latent-attention block: hidden [N, D] -> [N, D] (N tokens, padded or packed)."""
        keys, values = self.latent_keys_values()
        queries = self.attention.to_q(self.norm(hidden)).unflatten(-1, (self.heads, -1)).transpose(0, 1)  # [heads, N, hd]
        attended = F.scaled_dot_product_attention(queries, keys.to(queries.dtype), values.to(queries.dtype))
        hidden = self.attention.to_out(attended.transpose(0, 1).flatten(-2)) + hidden  # [N, D]
        return self.ff(self.ff_norm(hidden)) + hidden


def pool_padded(pooling: LatentPooling, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """Rows of a padded batch: hidden [B, L, D], pool_mask [B, L] (1: a token the mean counts) -> [B, D] float32."""
    tokens = pooling(hidden.flatten(0, 1)).unflatten(0, hidden.shape[:2]).float()  # [B, L, D]
    weights = pool_mask.unsqueeze(-1).float()
    rows = (tokens * weights).sum(1) / weights.sum(1)
    return F.normalize(rows, dim=-1) if pooling.output_normalize else rows


def pool_packed(pooling: LatentPooling, hidden: torch.Tensor, segments: torch.Tensor, pool_mask: torch.Tensor,
                count: int) -> torch.Tensor:
    """Rows of a packed sequence: hidden [T, D], segments [T] (the caption of each token, 0..count-1),
    pool_mask [T] -> [count, D] float32."""
    tokens = pooling(hidden).float() * pool_mask.unsqueeze(-1).float()  # [T, D]
    sums = torch.zeros((count, tokens.shape[-1]), dtype=torch.float32, device=tokens.device).index_add_(0, segments, tokens)
    rows = sums / torch.zeros(count, dtype=torch.float32, device=tokens.device).index_add_(0, segments, pool_mask.float()).unsqueeze(-1)
    return F.normalize(rows, dim=-1) if pooling.output_normalize else rows
