"""The encoder's speed machinery and settings: token-budget batches, length buckets, EOS for last-token
pooling, Matryoshka truncation, precision, compilation, and remote-code models (NV-Embed's encode)."""

from __future__ import annotations

import json
import os
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_embed import random_captions

from lift_fast.config import ConfigError, EmbedConfig
from lift_fast.embed import load_encoder
from lift_fast.embed.batching import auto_length_step, bucket_length, plan_batches
from lift_fast.embed.encoder import resolve_model


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(EmbedConfig(max_length=77))


@pytest.fixture(scope="module")
def tiny_qwen3_with_eos(tmp_path_factory):
    """A tiny random Qwen3 model whose tokenizer (BERT's, left padding) has an EOS token it never adds."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2")[0])
    tokenizer.padding_side = "left"
    tokenizer.eos_token = "[unused1]"
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("qwen3_eos")
    Qwen3Model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------ batching


def reference_plan(lengths, batch_size, max_tokens, step, max_length):
    """The batching rule written out the slow way: longest first, greedy fill."""
    pending = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = []
    while pending:
        first = lengths[pending[0]]
        padded = first if step <= 1 else max(first, min(max_length, -(-first // step) * step))
        rows = []
        while pending and len(rows) < batch_size and (not max_tokens or not rows or (len(rows) + 1) * padded <= max_tokens):
            rows.append(pending.pop(0))
        batches.append((rows, padded))
    return batches


@pytest.mark.parametrize("batch_size, max_tokens, step", [(7, 0, 1), (128, 100, 1), (5, 64, 16), (1, 0, 16), (64, 3, 8)])
def test_plan_matches_the_rule_and_bounds_every_batch(batch_size, max_tokens, step):
    rng = np.random.default_rng()
    lengths = rng.integers(1, 78, size=int(rng.integers(1, 300))).tolist()

    plan = plan_batches(lengths, batch_size=batch_size, max_tokens=max_tokens, length_step=step, max_length=77)

    assert [(b.rows, b.length) for b in plan] == reference_plan(lengths, batch_size, max_tokens, step, 77)
    assert sorted(r for b in plan for r in b.rows) == list(range(len(lengths)))
    for batch in plan:
        assert 1 <= len(batch.rows) <= batch_size
        assert batch.length >= max(lengths[r] for r in batch.rows)
        assert len(batch.rows) == 1 or not max_tokens or len(batch.rows) * batch.length <= max_tokens
    if step > 1:
        assert {b.length for b in plan} <= {*range(step, 77, step), 77}


def test_buckets_are_few_and_grow_with_max_length():
    assert auto_length_step(77, compiled=False) == 1 and auto_length_step(77, compiled=True) == 16
    assert auto_length_step(323, compiled=True) == 48  # 7 buckets up to 323
    for max_length in (16, 77, 128, 323, 512, 8192):
        step = auto_length_step(max_length, compiled=True)
        buckets = {bucket_length(n, step, max_length) for n in range(1, max_length + 1)}
        assert len(buckets) <= 9 and max(buckets) == max_length
    assert bucket_length(5, 1, 77) == 5 and bucket_length(70, 16, 77) == 77 and bucket_length(90, 16, 77) == 90


def test_token_budget_and_buckets_do_not_change_rows(minilm):
    captions = random_captions(np.random.default_rng(), 40, max_words=60)
    reference = minilm.encode(captions, batch_size=1)  # one caption per pass: no padding at all
    budget = load_encoder(EmbedConfig(max_length=77, max_tokens=96, length_step=16, batch_size=64, packing="off"))

    rows = budget.encode(captions)

    torch.testing.assert_close(rows, reference, atol=2e-6, rtol=0)
    shapes = budget._shapes
    assert all(length in (16, 32, 48, 64, 77) or length > 77 for _, length in shapes)
    assert all(batch * length <= 96 or batch == 1 for batch, length in shapes)
    assert budget.padded_tokens >= budget.tokenize(captions).tokens


# ------------------------------------------------------------------------------------------ LLM embedders


def test_last_token_pooling_appends_eos_and_matches_each_caption_alone(tiny_qwen3_with_eos):
    from transformers import AutoModel, AutoTokenizer

    rng = np.random.default_rng()
    captions = random_captions(rng, 11, max_words=40)  # some cut at 24
    encoder = load_encoder(EmbedConfig(model=str(tiny_qwen3_with_eos), pooling="last", max_length=24,
                                       batch_size=4, length_step=8))
    eos = encoder.tokenizer.eos_token_id
    assert encoder.append_eos and encoder.identity["append_eos"] is True

    ours, truncated = encoder.encode(captions, return_truncated=True)

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_with_eos)
    model = AutoModel.from_pretrained(tiny_qwen3_with_eos).eval()
    reference, cut = [], []
    with torch.no_grad():
        for caption in captions:
            ids = tokenizer(caption, truncation=True, max_length=23)["input_ids"] + [eos]  # [CLS] ... [SEP] EOS
            cut.append(len(tokenizer(caption)["input_ids"]) + 1 > 24)
            reference.append(model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1])
    torch.testing.assert_close(ours, F.normalize(torch.stack(reference), dim=-1), atol=2e-5, rtol=1e-4)
    assert truncated.tolist() == cut and any(cut) and not all(cut)
    assert all(seq[-1] == eos and len(seq) <= 24 for seq in encoder.tokenize(captions).ids)


def test_eos_is_not_appended_twice_nor_without_asking(tiny_qwen3_with_eos):
    off = load_encoder(EmbedConfig(model=str(tiny_qwen3_with_eos), pooling="last", max_length=24, append_eos="off"))
    mean = load_encoder(EmbedConfig(model=str(tiny_qwen3_with_eos), pooling="mean", max_length=24))
    eos = off.tokenizer.eos_token_id
    assert off.tokenize(["a red cat"]).ids[0][-1] != eos and mean.tokenize(["a red cat"]).ids[0][-1] != eos
    assert not mean.identity["append_eos"]
    on = load_encoder(EmbedConfig(model=str(tiny_qwen3_with_eos), pooling="mean", max_length=24,
                                  prompt="x [unused1]", append_eos="on"))  # the prompt cannot fake an EOS end
    assert on.tokenize(["a"]).ids[0][-2:] == [on.tokenizer.sep_token_id, eos]
    with pytest.raises(ConfigError, match="embed.append_eos=on.*no EOS token"):
        load_encoder(EmbedConfig(append_eos="on"))  # MiniLM's BERT tokenizer has none


# ------------------------------------------------------------------------------------------ settings


def test_matryoshka_dim_truncates_then_renormalises(minilm):
    captions = random_captions(np.random.default_rng(), 9)
    raw = load_encoder(EmbedConfig(normalize=False)).encode(captions)  # [9, 384] pooled, not normalised
    short = load_encoder(EmbedConfig(dim=100))

    rows = short.encode(captions)

    expected = raw[:, :100] / raw[:, :100].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(rows, expected, atol=1e-6, rtol=0)
    assert short.dim == 100 and short.model_dim == 384
    assert short.identity["dim"] == 100 and short.identity["model_dim"] == 384
    with pytest.raises(ConfigError, match=r"embed.dim=385 is larger than the 384 features"):
        load_encoder(EmbedConfig(dim=385))


def test_bf16_precision_stays_close_to_fp32(minilm):
    captions = random_captions(np.random.default_rng(), 12, max_words=50)
    bf16 = load_encoder(EmbedConfig(precision="bf16"))
    assert bf16.precision == "bf16" and next(bf16.model.parameters()).dtype == torch.bfloat16
    assert minilm.precision == "fp32" and bf16.identity["precision"] == "bf16"
    cosine = F.cosine_similarity(bf16.encode(captions), minilm.encode(captions), dim=-1)
    assert cosine.min() > 0.999  # measured ~0.9999 on the benchmark's captions


def test_bf16_mixed_keeps_fp32_weights_and_matches_to_four_nines(minilm):
    captions = random_captions(np.random.default_rng(), 12, max_words=50)
    mixed = load_encoder(EmbedConfig(precision="bf16-mixed"))
    assert next(mixed.model.parameters()).dtype == torch.float32 and mixed.autocast_dtype == torch.bfloat16

    rows, reference = mixed.encode(captions), minilm.encode(captions)

    cosine = F.cosine_similarity(rows.double(), reference.double(), dim=-1)
    assert cosine.min() >= 0.9999 and not torch.equal(rows, reference)  # bf16 matmuls ran, and stayed close


def test_compiled_encoder_buckets_lengths_and_gives_the_same_rows(minilm):
    captions = random_captions(np.random.default_rng(), 30, max_words=50)
    compiled = load_encoder(EmbedConfig(max_length=77, batch_size=8, packing="off"))  # the bucketed plan
    compiled.compile(backend="eager")  # dynamo tracing without inductor's C++ build: seconds, not minutes
    assert compiled.compiled and compiled.length_step == 16

    rows = compiled.encode(captions)

    torch.testing.assert_close(rows, minilm.encode(captions), atol=2e-6, rtol=0)
    assert {length for _, length in compiled._shapes} <= {16, 32, 48, 64, 77}
    assert compiled.warmup_seconds > 0


# ------------------------------------------------------------------------------------------ remote code

FAKE_CONFIG = '''
from transformers import PretrainedConfig


class FakeEmbedderConfig(PretrainedConfig):
    model_type = "fake_embedder"

    def __init__(self, vocab_size=8, hidden_size=12, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
'''

FAKE_MODEL = '''
import torch
from transformers import AutoTokenizer, PreTrainedModel

from .configuration_fake import FakeEmbedderConfig


class FakeEmbedder(PreTrainedModel):
    """Like NV-Embed-v2: pooling lives in encode(prompts, instruction, max_length), which tokenizes itself."""

    config_class = FakeEmbedderConfig

    def __init__(self, config):
        super().__init__(config)
        self.table = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.post_init()

    def encode(self, prompts, instruction="", max_length=4096, **kwargs):
        tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        rows = [self.table(torch.tensor(tokenizer(instruction + text, truncation=True, max_length=max_length)
                                        ["input_ids"])).mean(0) * 3.0 for text in prompts]
        return torch.stack(rows)
'''


@pytest.fixture(scope="module")
def remote_model(tmp_path_factory):
    """A folder whose model class and encode() are code in the folder (auto_map), as NV-Embed-v2's are."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("fake_nv_embed")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2")[0])
    tokenizer.save_pretrained(folder)
    (folder / "configuration_fake.py").write_text(textwrap.dedent(FAKE_CONFIG))
    (folder / "modeling_fake.py").write_text(textwrap.dedent(FAKE_MODEL))
    config = {"model_type": "fake_embedder", "architectures": ["FakeEmbedder"], "vocab_size": len(tokenizer),
              "hidden_size": 12, "auto_map": {"AutoConfig": "configuration_fake.FakeEmbedderConfig",
                                              "AutoModel": "modeling_fake.FakeEmbedder"}}
    (folder / "config.json").write_text(json.dumps(config))
    table = torch.randn(len(tokenizer), 12, generator=torch.Generator().manual_seed(3))
    save_file({"table.weight": table}, str(folder / "model.safetensors"))
    return folder, table, tokenizer


def test_remote_code_model_is_refused_without_the_flag(remote_model):
    folder = remote_model[0]
    with pytest.raises(ConfigError, match=r"auto_map.*embed.trust_remote_code=true"):
        load_encoder(EmbedConfig(model=str(folder), pooling="model"))
    with pytest.raises(ConfigError, match=r"auto_map.*embed.trust_remote_code=true"):
        load_encoder(EmbedConfig(model=str(folder), pooling="mean"))
    with pytest.raises(ConfigError, match=r"embed.pooling=model.*embed.trust_remote_code=true"):
        load_encoder(EmbedConfig(pooling="model"))  # MiniLM has no encode() of its own either


def test_remote_code_model_runs_through_its_own_encode(remote_model):
    folder, table, tokenizer = remote_model
    captions = random_captions(np.random.default_rng(), 7, max_words=40)
    encoder = load_encoder(EmbedConfig(model=str(folder), pooling="model", trust_remote_code=True,
                                       prompt="Instruct: caption\nQuery: ", max_length=20, dim=8, batch_size=3))

    rows, truncated = encoder.encode(captions, return_truncated=True)

    expected = []
    for caption in captions:
        ids = tokenizer("Instruct: caption\nQuery: " + caption, truncation=True, max_length=20)["input_ids"]
        expected.append(table[ids].mean(0)[:8])
    torch.testing.assert_close(rows, F.normalize(torch.stack(expected), dim=-1), atol=1e-5, rtol=1e-5)
    assert encoder.model_dim == 12 and encoder.identity["dim"] == 8 and encoder.identity["pooling"] == "model"
    assert truncated.tolist() == [len(tokenizer("Instruct: caption\nQuery: " + c)["input_ids"]) > 20 for c in captions]
