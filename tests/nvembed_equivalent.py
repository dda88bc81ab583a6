"""An NV-Embed-v2-shaped model for tests, written here from the published architecture.

NV-Embed-v2's code (modeling_nvembed.py in hf.co/nvidia/NV-Embed-v2) runs only as trust_remote_code and
cannot be downloaded here, so this module follows its published architecture (arXiv 2405.17428, section
3, and the model card's config.json) with random weights:

- `embedding_model`: Mistral with bidirectional attention (each layer non-causal; the 2-D padding mask
  becomes a 4-D mask over keys), right padding, pad = EOS;
- `latent_attention_model`: `cross_attend_blocks` = [PreNorm(Attention: queries from the token states,
  keys and values from `latents` [512, 4096], 8 heads of 4096), PreNorm(FeedForward: GEGLU, 4x)],
  each with a residual, then the mean over the pool mask and an L2 norm (output_normalize);
- `encode(prompts, instruction, max_length)`: tokenizes `instruction + prompt + eos_token` (truncated at
  max_length, padded), masks the first len(tokenizer.tokenize(instruction)) positions out of the mean.

`NV_EMBED_V2` holds the published config's shape fields; `scaled_config` divides its widths for a model
that runs in a test (the heads, the latent-to-hidden and head ratios and the 4x feed-forward are kept).
With honour_packing=True the encoder reads packed position ids (a block-diagonal mask), which the
published one does not: that variant tests the packed latent pooling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MistralConfig, MistralModel

# hf.co/nvidia/NV-Embed-v2 config.json (text_config: Mistral-7B; latent_attention_config)
NV_EMBED_V2 = {
    "text_config": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 32000, "rms_norm_eps": 1e-5,
                    "rope_theta": 10000.0, "max_position_embeddings": 32768},
    "latent_attention_config": {"hidden_dim": 4096, "latent_dim": 4096, "num_latents_value": 512,
                                "num_cross_heads": 8, "cross_dim_head": 4096, "output_normalize": True},
    "padding_side": "right", "add_eos": True, "is_mask_instruction": True,
}


def scaled_config(divide: int = 64, layers: int = 2, latents: int = 16) -> dict:
    """NV_EMBED_V2 with every width divided by `divide`, `layers` layers and `latents` latents."""
    text = dict(NV_EMBED_V2["text_config"])
    for key in ("hidden_size", "intermediate_size"):
        text[key] //= divide
    text.update(num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=layers, max_position_embeddings=512)
    latent = dict(NV_EMBED_V2["latent_attention_config"])
    for key in ("hidden_dim", "latent_dim", "cross_dim_head"):
        latent[key] //= divide
    latent["num_latents_value"] = latents
    return {"text_config": text, "latent_attention_config": latent}


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, context_dim: int | None = None):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if context_dim is not None else None

    def forward(self, x, context=None):
        if self.norm_context is not None:
            return self.fn(self.norm(x), context=self.norm_context(context))
        return self.fn(self.norm(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), GEGLU(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class GEGLU(nn.Module):
    def forward(self, x):
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class Attention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(context_dim, heads * dim_head * 2, bias=False)
        self.to_out = nn.Linear(heads * dim_head, query_dim, bias=False)

    def forward(self, x, context):
        # x: [B, N, D] token states; context: [B, R, D] latents
        q = self.to_q(x)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, heads, *, hd]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(-2))


class LatentAttentionModel(nn.Module):
    def __init__(self, hidden_dim, latent_dim, num_latents_value, num_cross_heads, cross_dim_head, output_normalize):
        super().__init__()
        self.cross_attend_blocks = nn.ModuleList([
            PreNorm(latent_dim, Attention(latent_dim, hidden_dim, num_cross_heads, cross_dim_head), context_dim=hidden_dim),
            PreNorm(latent_dim, FeedForward(latent_dim)),
        ])
        self.output_normalize = output_normalize
        self.latents = nn.Parameter(torch.randn(num_latents_value, latent_dim))

    def forward(self, hiddens, attention_mask):
        cross_attn, cross_ff = self.cross_attend_blocks
        latents = self.latents.unsqueeze(0).expand(hiddens.shape[0], -1, -1)  # recomputed per caption, as published
        hiddens = cross_attn(hiddens, context=latents) + hiddens
        hiddens = cross_ff(hiddens) + hiddens
        weights = attention_mask.unsqueeze(-1).float()
        rows = (hiddens * weights).sum(1) / weights.sum(1)
        return F.normalize(rows, dim=-1) if self.output_normalize else rows


class BidirectionalMistralModel(MistralModel):
    """Mistral whose every token sees every (real) token of its caption."""

    def __init__(self, config: MistralConfig, honour_packing: bool = False):
        super().__init__(config)
        for layer in self.layers:
            layer.self_attn.is_causal = False
        self.honour_packing = honour_packing

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, **kwargs):
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keys = attention_mask.bool()[:, None, None, :].expand(batch, 1, length, length)  # [B, 1, L, L]
        if self.honour_packing and position_ids is not None:
            caption = (position_ids == 0).cumsum(-1)  # [B, L]: which caption of the pack each token is
            keys = keys & (caption[:, None, :, None] == caption[:, None, None, :])
        return super().forward(input_ids=input_ids, attention_mask=keys, position_ids=position_ids, use_cache=False)


class NVEmbedEquivalent(nn.Module):
    """embedding_model + latent_attention_model + encode(), as NV-Embed-v2 lays them out."""

    def __init__(self, config: dict, tokenizer, honour_packing: bool = False):
        super().__init__()
        text = config["text_config"]
        self.embedding_model = BidirectionalMistralModel(
            MistralConfig(**{**text, "vocab_size": len(tokenizer)}, attn_implementation="sdpa"), honour_packing)
        self.latent_attention_model = LatentAttentionModel(**config["latent_attention_config"])
        self.tokenizer = tokenizer
        self.config = self.embedding_model.config

    @torch.no_grad()
    def encode(self, prompts: list[str], instruction: str = "", max_length: int = 4096, **kwargs) -> torch.Tensor:
        skip = len(self.tokenizer.tokenize(instruction)) if instruction else 0
        batch = self.tokenizer([instruction + p + self.tokenizer.eos_token for p in prompts], max_length=max_length,
                               padding=True, truncation=True, return_token_type_ids=False, return_tensors="pt")
        pool_mask = batch["attention_mask"].clone()
        pool_mask[:, :skip] = 0
        hidden = self.embedding_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return self.latent_attention_model(hidden, pool_mask)


def llama_style_tokenizer():
    """The bundled MiniLM word pieces behaving as a Llama/Mistral tokenizer: BOS ([CLS]) prepended, no EOS
    added ([SEP] is the EOS, appended as text by NV-Embed's encode), pad = EOS, right padding."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from lift_fast.embed.encoder import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2")[0])
    cls = tokenizer.cls_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="[CLS] $A", pair="[CLS] $A $B",
                                                                    special_tokens=[("[CLS]", cls)])
    tokenizer.eos_token = "[SEP]"
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
