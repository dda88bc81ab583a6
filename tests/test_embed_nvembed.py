"""NV-Embed-v2 on the fast path: latent-attention pooling on the batch tokenized once, equal rows to the
model's own encode(), exact-length batches (its encoder ignores packed positions), compiled and quantized.

The model is tests/nvembed_equivalent.py: NV-Embed-v2's published architecture and config with random
weights and its widths divided by 64 (the real code is remote code and not downloadable here).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nvembed_equivalent import NV_EMBED_V2, NVEmbedEquivalent, llama_style_tokenizer, scaled_config
from test_embed_packing import lognormal_captions

from lift_fast.config import EmbedConfig
from lift_fast.embed.encoder import TextEncoder, resolve_model

PROMPT = "Instruct: Given a caption, retrieve the image\nQuery: "


def nv_encoder(honour_packing: bool = False, seed: int = 7, **settings) -> tuple[TextEncoder, NVEmbedEquivalent]:
    torch.manual_seed(seed)
    tokenizer = llama_style_tokenizer()
    model = NVEmbedEquivalent(scaled_config(), tokenizer, honour_packing).eval().requires_grad_(False)
    cfg = EmbedConfig(model="nv-embed-equivalent", pooling="model", trust_remote_code=True, **settings)
    folder = resolve_model("all-minilm-l6-v2")[0]  # the identity's weights hash is not used here
    return TextEncoder(model, tokenizer, cfg, path=folder, revision=None, device="cpu"), model


def cosines(rows, reference):
    return F.cosine_similarity(rows.double(), reference.double(), dim=-1)


def test_config_is_the_published_shape():
    latent = NV_EMBED_V2["latent_attention_config"]
    assert (latent["num_latents_value"], latent["num_cross_heads"], latent["cross_dim_head"]) == (512, 8, 4096)
    assert scaled_config()["latent_attention_config"]["cross_dim_head"] == scaled_config()["text_config"]["hidden_size"]


@pytest.mark.parametrize("prompt", ["", PROMPT])
def test_rows_equal_the_models_own_encode_without_a_second_tokenization(prompt, monkeypatch):
    encoder, model = nv_encoder(prompt=prompt, max_length=200, max_tokens=600, packing="packed")
    captions = lognormal_captions(np.random.default_rng(), 40)
    reference = model.encode(captions, instruction=prompt, max_length=200)
    tokenized = encoder.tokenize(captions)
    calls = []
    monkeypatch.setattr(type(encoder.tokenizer), "__call__", lambda *a, **k: calls.append(1))

    rows = encoder.encode_tokenized(tokenized)

    assert calls == []  # the batch tokenized once (in the reader thread) is all the fast path reads
    assert cosines(rows, reference).min() >= 0.9999
    assert encoder.latent is not None and encoder.dim == 64 and encoder.append_eos
    # NV-Embed's encoder builds its own mask from the padding mask: packed captions would see each other.
    assert encoder.packing_mode() == "exact" and "attend to each other" in encoder.packing_note
    assert encoder.padded_tokens <= 1.05 * tokenized.tokens


def test_packed_latent_pooling_equals_encode_where_the_encoder_reads_packing():
    encoder, model = nv_encoder(honour_packing=True, prompt=PROMPT, max_length=200, max_tokens=300, packing="packed")
    captions = lognormal_captions(np.random.default_rng(), 30)

    rows = encoder.encode(captions)

    assert encoder.packing_mode() == "packed"
    assert cosines(rows, model.encode(captions, instruction=PROMPT, max_length=200)).min() >= 0.9999
    assert encoder.padded_tokens == encoder.tokenize(captions).tokens


@pytest.mark.slow  # 30 s: dynamo traces the encoder and the pooling
def test_compiled_latent_path_gives_the_same_rows():
    encoder, model = nv_encoder(prompt=PROMPT, max_length=200, max_tokens=400)
    captions = lognormal_captions(np.random.default_rng(), 24)
    encoder.compile(backend="eager")

    rows = encoder.encode(captions)

    assert encoder.compiled and encoder.warmup_seconds > 0
    assert cosines(rows, model.encode(captions, instruction=PROMPT, max_length=200)).min() >= 0.9999


def test_int8_quantization_reaches_the_latent_layers():
    pytest.importorskip("torchao")
    from lift_fast.embed.quantize import quantize_model

    encoder, model = nv_encoder(max_length=200)
    captions = lognormal_captions(np.random.default_rng(1), 24)
    reference = model.encode(captions, max_length=200)
    before = type(model.latent_attention_model.cross_attend_blocks[0].fn.to_q.weight)

    quantize_model(encoder.model, "int8")

    assert type(encoder.latent.attention.to_q.weight) is not before  # the pooling runs the quantized weights
    rows = encoder.encode(captions)
    assert cosines(rows, reference).mean() >= 0.99
