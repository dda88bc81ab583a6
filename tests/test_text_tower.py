"""The CLIP baseline's text tower against open_clip's TextTransformer, and its offline tokenizers."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from lift_fast.config import ConfigError, load_config
from lift_fast.models.text_tower import TextSpec, TextTransformer, build_text_tower, trim_padding
from lift_fast.models.tokenizer import CaptionTokenizer

open_clip_transformer = pytest.importorskip("open_clip.transformer")

SPEC = TextSpec(width=48, layers=3, heads=4, context_length=77, vocab_size=500)
EMBED_DIM = 40
LONG_CAPTION = " ".join(["a small red square to the left of a large blue circle"] * 12)  # ~130 tokens


@pytest.fixture(scope="module")
def wordpiece():
    return CaptionTokenizer("wordpiece", 77)


def reference_tower(spec: TextSpec, embed_dim: int, **options) -> torch.nn.Module:
    return open_clip_transformer.TextTransformer(context_length=spec.context_length, vocab_size=spec.vocab_size,
                                                 width=spec.width, heads=spec.heads, layers=spec.layers,
                                                 output_dim=embed_dim, **options).eval()


def copy_weights(reference: torch.nn.Module, tower: TextTransformer) -> None:
    """open_clip's parameters into ours (qkv is MultiheadAttention's stacked in_proj; the projection transposed)."""
    state = {"token_embedding.weight": reference.token_embedding.weight,
             "positional_embedding": reference.positional_embedding,
             "ln_final.weight": reference.ln_final.weight, "ln_final.bias": reference.ln_final.bias,
             "projection.weight": reference.text_projection.T}
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.qkv": "attn.in_proj", "attn.proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for index, block in enumerate(reference.transformer.resblocks):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                source = (getattr(block.attn, f"in_proj_{kind}") if theirs == "attn.in_proj"
                          else block.get_submodule(theirs).get_parameter(kind))
                state[f"blocks.{index}.{ours}.{kind}"] = source
    tower.load_state_dict({name: value.detach().clone() for name, value in state.items()}, strict=True)


def random_tokens(batch: int, spec: TextSpec, eot: int, *, generator: torch.Generator, start: int | None = None) -> torch.Tensor:
    """Captions of random lengths (2 to the context), eot at the end, then 0 padding, as a tokenizer gives."""
    tokens = torch.zeros(batch, spec.context_length, dtype=torch.long)
    lengths = torch.randint(2, spec.context_length + 1, (batch,), generator=generator)
    lengths[0] = spec.context_length  # one caption fills the whole context
    for row, length in enumerate(lengths.tolist()):
        tokens[row, :length] = torch.randint(1, eot, (length,), generator=generator)
        if start is not None:
            tokens[row, 0] = start
        tokens[row, length - 1] = eot
    return tokens


@pytest.mark.parametrize("batch", [1, 7, 12])
@pytest.mark.parametrize("math", [False, True])
def test_forward_and_gradients_match_open_clip(batch, math):
    """CLIP BPE layout (end-of-text is the highest id, open_clip's argmax pooling), fresh weights and lengths."""
    generator = torch.Generator().manual_seed(batch)
    torch.manual_seed(batch)
    reference = reference_tower(SPEC, EMBED_DIM, pool_type="argmax")
    for param in reference.parameters():  # not the init: biases and norms away from 0 and 1 too
        param.data.normal_(0, 0.3, generator=generator)
    tower = TextTransformer(SPEC, EMBED_DIM, eot_token_id=SPEC.vocab_size - 1).set_math_attention(math)
    copy_weights(reference, tower)
    tokens = random_tokens(batch, SPEC, SPEC.vocab_size - 1, generator=generator)
    weights = torch.randn(batch, EMBED_DIM, generator=generator)
    expected = F.normalize(reference(tokens), dim=-1)
    features = tower(tokens)
    assert features.shape == (batch, EMBED_DIM)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)
    (expected * weights).sum().backward()
    (features * weights).sum().backward()
    torch.testing.assert_close(tower.token_embedding.weight.grad, reference.token_embedding.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tower.blocks[0].attn.qkv.weight.grad, reference.transformer.resblocks[0].attn.in_proj_weight.grad,
                               rtol=1e-4, atol=1e-5)


def test_wordpiece_tokens_pool_at_sep_like_open_clips_eos_pooling(wordpiece):
    """[SEP] (102) is not the highest id, so argmax would be wrong: the tower pools at the token itself."""
    captions = ["a red square left of a blue circle", "two green triangles", LONG_CAPTION, "x"]
    tokens = wordpiece(captions)
    spec = TextSpec(48, 2, 4, 77, wordpiece.vocab_size)
    torch.manual_seed(1)
    reference = reference_tower(spec, EMBED_DIM, pool_type="eos", eos_id=wordpiece.eot_token_id)
    tower = TextTransformer(spec, EMBED_DIM, wordpiece.eot_token_id)
    copy_weights(reference, tower)
    with torch.no_grad():
        torch.testing.assert_close(tower(tokens), F.normalize(reference(tokens), dim=-1), rtol=0, atol=1e-5)
        argmax = reference_tower(spec, EMBED_DIM, pool_type="argmax")
        argmax.load_state_dict(reference.state_dict())
        assert not torch.allclose(tower(tokens), F.normalize(argmax(tokens), dim=-1), atol=1e-3)


def test_padding_does_not_change_a_caption_and_trimming_it_changes_nothing():
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    tower = TextTransformer(SPEC, EMBED_DIM, eot_token_id=SPEC.vocab_size - 1).eval()
    tokens = random_tokens(5, SPEC, SPEC.vocab_size - 1, generator=generator)
    tokens[:, 30:] = 0  # every caption ends within 30 tokens
    tokens[:, 29] = torch.where(tokens[:, 29] != 0, SPEC.vocab_size - 1, 0)
    tokens[0, :30] = torch.randint(1, SPEC.vocab_size - 1, (30,), generator=generator)
    tokens[0, 29] = SPEC.vocab_size - 1
    with torch.no_grad():
        padded = tower(tokens)
        trimmed = trim_padding(tokens, pad_token_id=0)
        assert trimmed.shape == (5, 30)
        torch.testing.assert_close(tower(trimmed), padded, rtol=0, atol=1e-5)
        alone = torch.cat([tower(tokens[row:row + 1]) for row in range(5)])  # no batch neighbours
        torch.testing.assert_close(alone, padded, rtol=0, atol=1e-5)
        changed = tokens.clone()
        changed[2, 40:] = 7  # tokens after the end-of-text token are never seen (causal mask)
        torch.testing.assert_close(tower(changed)[2], padded[2], rtol=0, atol=1e-5)
    assert trim_padding(torch.zeros(2, 77, dtype=torch.long), 0).shape == (2, 1)


def test_token_ids_longer_than_the_context_are_refused():
    tower = TextTransformer(SPEC, EMBED_DIM, eot_token_id=SPEC.vocab_size - 1)
    with pytest.raises(ValueError, match=r"at most 77"):
        tower(torch.zeros(2, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TextTransformer(SPEC, EMBED_DIM, eot_token_id=SPEC.vocab_size)


@pytest.mark.parametrize("name", ["wordpiece", "clip_bpe"])
def test_tokenizer_pads_to_the_context_and_keeps_the_end_of_text_token_of_a_long_caption(name):
    tokenizer = CaptionTokenizer(name, 77)
    tokens = tokenizer(["a red square", LONG_CAPTION, ""])
    assert tokens.dtype == torch.long and tokens.shape == (3, 77)
    assert ((tokens == tokenizer.eot_token_id).sum(dim=1) == 1).all()  # exactly one each, also when cut
    assert tokens[1, -1] == tokenizer.eot_token_id  # the long caption fills the context and ends with EOT
    length = int((tokens[0] != tokenizer.pad_token_id).sum())
    assert tokens[0, length - 1] == tokenizer.eot_token_id and (tokens[0, length:] == tokenizer.pad_token_id).all()
    assert 3 <= length <= 6
    assert tokens.max() < tokenizer.vocab_size
    assert tokenizer([]).shape == (0, 77)
    long = CaptionTokenizer(name, 323)(["word " * 400])
    assert long.shape == (1, 323) and long[0, -1] == tokenizer.eot_token_id


def test_tokenizer_errors_name_the_setting(monkeypatch):
    with pytest.raises(ConfigError, match="model.text_tokenizer='gpt2'"):
        CaptionTokenizer("gpt2")
    with pytest.raises(ConfigError, match="model.text_context=1"):
        CaptionTokenizer("wordpiece", 1)
    with pytest.raises(TypeError, match="caption 1 is int"):
        CaptionTokenizer("wordpiece")(["fine", 3])
    monkeypatch.setitem(sys.modules, "open_clip.tokenizer", None)  # as if open_clip were not installed
    with pytest.raises(ConfigError, match="clip_bpe needs open_clip.*model.text_tokenizer=wordpiece"):
        CaptionTokenizer("clip_bpe")


def test_build_text_tower_from_the_config():
    cfg = load_config(overrides=["model.text_tower=transformer", "model.text_width=64", "model.text_layers=2",
                                 "model.text_heads=4", "model.text_context=40"])
    tower, tokenizer = build_text_tower(cfg.model, embed_dim=24)
    assert (tower.spec.width, tower.spec.layers, tower.spec.heads, tower.spec.context_length) == (64, 2, 4, 40)
    assert tower.token_embedding.num_embeddings == tokenizer.vocab_size == 30522
    tokens = tokenizer(["a red square left of a blue circle", LONG_CAPTION])
    assert tokens.shape == (2, 40)
    features = tower(tokens)
    assert features.shape == (2, 24)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))
    default = load_config().model
    assert (default.text_tower, default.text_width, default.text_layers, default.text_heads, default.text_context) == (
        "frozen", 512, 12, 8, 77)
    with pytest.raises(ConfigError, match="model.text_width=64 is not divisible by model.text_heads=5"):
        build_text_tower(load_config(overrides=["model.text_width=64", "model.text_heads=5"]).model, 24)
    with pytest.raises(ConfigError, match="model.text_tower"):
        load_config(overrides=["model.text_tower=bert"])


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(5)
    tokens = random_tokens(3, SPEC, SPEC.vocab_size - 1, generator=torch.Generator().manual_seed(5))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(5)
        tower = TextTransformer(SPEC, EMBED_DIM, SPEC.vocab_size - 1, grad_checkpointing=recompute)
        tower(tokens).sum().backward()
        grads.append(tower.blocks[1].mlp.fc1.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
