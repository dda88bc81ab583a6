"""Padding-free batches (packed and exact-length) and rows gathered without a host wait per batch.

Packed and exact-length rows are compared with the padded path (embed.packing=off) on the bundled
MiniLM (mean pooling) and on random-weight models with the shapes of Qwen3-Embedding and Mistral
(last-token pooling, left padding), scaled down from their config.json; NV-Embed's latent pooling is
tested in test_embed_nvembed.py.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_embed import WORDS, write_shards

from lift_fast.config import EmbedConfig
from lift_fast.embed import embed_shards, load_encoder
from lift_fast.embed.batching import MAX_PADDING, plan_batches, plan_exact, plan_packs
from lift_fast.embed.encoder import resolve_model
from lift_fast.embed.packing import HostRows

# Qwen3-Embedding-0.6B and Mistral-7B (its config.json) with their widths divided by 32 (heads, KV heads,
# head dim ratios and activation kept), two layers: the shapes, not the sizes, are what packing meets.
QWEN3_SHAPE = {"hidden_size": 32, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 8, "num_hidden_layers": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}
MISTRAL_SHAPE = {"hidden_size": 128, "intermediate_size": 448, "num_attention_heads": 4, "num_key_value_heads": 1,
                 "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": None}


def lognormal_captions(rng: np.random.Generator, n: int, median_words: float = 12.0) -> list[str]:
    """Captions of log-normal word counts (median 12 words, about 14 MiniLM tokens with [CLS]/[SEP])."""
    counts = np.clip(np.round(rng.lognormal(np.log(median_words), 0.5, n)), 1, 90).astype(int)
    return [" ".join(rng.choice(WORDS, size=count)) for count in counts]


def cosines(rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(rows.double(), reference.double(), dim=-1)


# ------------------------------------------------------------------------------------------ plans


def lognormal_lengths(n: int = 100_000, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(14), 0.5, n)), 1, 77).astype(int).tolist()


@pytest.mark.parametrize("batch_size,max_tokens", [(128, 0), (128, 1024), (512, 16384), (7, 100)])
def test_exact_plan_holds_at_most_five_percent_padding(batch_size, max_tokens):
    lengths = lognormal_lengths()
    plan = plan_exact(lengths, batch_size=batch_size, max_tokens=max_tokens)

    assert sorted(i for batch in plan for i in batch.rows) == list(range(len(lengths)))
    for batch in plan:
        real = sum(lengths[i] for i in batch.rows)
        assert batch.length == max(lengths[i] for i in batch.rows)
        assert len(batch.rows) == 1 or len(batch.rows) * batch.length <= MAX_PADDING * real
        assert len(batch.rows) <= batch_size and (max_tokens == 0 or len(batch.rows) == 1
                                                  or len(batch.rows) * batch.length <= max_tokens)
    padded = sum(len(batch.rows) * batch.length for batch in plan)
    assert padded <= 1.05 * sum(lengths)
    # The 5 % cap costs few extra forward passes over exact lengths without it (plan_batches, step 1).
    uncapped = plan_batches(lengths, batch_size=batch_size, max_tokens=max_tokens, length_step=1, max_length=77)
    assert len(plan) <= 1.1 * len(uncapped) + 60


def test_packs_hold_every_caption_once_within_the_budget():
    lengths = lognormal_lengths(20_000, seed=1) + [300]  # one caption longer than a pack
    plan = plan_packs(lengths, max_tokens=256)

    assert sorted(i for batch in plan for i in batch.rows) == list(range(len(lengths)))
    assert all(batch.length == sum(lengths[i] for i in batch.rows) for batch in plan)
    assert all(batch.length <= 256 or len(batch.rows) == 1 for batch in plan)
    assert sum(batch.length for batch in plan) == sum(lengths)  # no padding at all
    assert len(plan) <= sum(lengths) / (256 - 77) + 2  # packs run nearly full


# ------------------------------------------------------------------------------------------ rows


@pytest.fixture(scope="module")
def minilm_padded():
    return load_encoder(EmbedConfig(packing="off"))


@pytest.mark.parametrize("packing", ["packed", "exact", "auto"])
def test_minilm_rows_equal_the_padded_path(minilm_padded, packing):
    captions = lognormal_captions(np.random.default_rng(), 160)
    encoder = load_encoder(EmbedConfig(packing=packing, max_tokens=512))

    rows = encoder.encode(captions)

    assert encoder.packing_mode() == ("packed" if packing == "packed" else "exact")  # auto: exact under sdpa
    assert cosines(rows, minilm_padded.encode(captions)).min() >= 0.9999
    assert encoder.padded_tokens <= 1.05 * encoder.tokenize(captions).tokens
    assert minilm_padded.padded_tokens > encoder.padded_tokens or packing == "exact"


def decoder_folder(tmp_path_factory, shape: dict, kind: str):
    """A random-weight Qwen3 or Mistral of `shape` with MiniLM's tokenizer (left padding, an EOS it never adds)."""
    from transformers import AutoTokenizer, MistralConfig, MistralModel, Qwen3Config, Qwen3Model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2")[0])
    tokenizer.padding_side = "left"
    tokenizer.eos_token = "[unused1]"
    config_class, model_class = {"qwen3": (Qwen3Config, Qwen3Model), "mistral": (MistralConfig, MistralModel)}[kind]
    config = config_class(vocab_size=len(tokenizer), max_position_embeddings=128, **shape)
    torch.manual_seed(5)
    folder = tmp_path_factory.mktemp(kind)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["qwen3", "mistral"])
def decoder(request, tmp_path_factory):
    shape = QWEN3_SHAPE if request.param == "qwen3" else MISTRAL_SHAPE
    return decoder_folder(tmp_path_factory, shape, request.param)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_decoder_rows_equal_the_padded_path(decoder, pooling):
    captions = lognormal_captions(np.random.default_rng(), 48)
    common = dict(model=str(decoder), pooling=pooling, max_length=60, max_tokens=400, prompt="Instruct: describe\n")
    reference = load_encoder(EmbedConfig(packing="off", **common)).encode(captions)
    for packing in ("packed", "exact"):
        encoder = load_encoder(EmbedConfig(packing=packing, **common))
        rows = encoder.encode(captions)
        assert encoder.packing_mode() == packing, encoder.packing_note
        assert cosines(rows, reference).min() >= 0.9999, packing
        assert encoder.padded_tokens <= 1.05 * encoder.tokenize(captions).tokens


def test_a_model_that_ignores_packed_positions_falls_back_to_exact_lengths(monkeypatch):
    # A forward that drops position_ids lets packed captions attend to each other: the probe sees it.
    encoder = load_encoder(EmbedConfig(packing="packed"))
    model_forward = encoder.backbone.forward
    monkeypatch.setattr(encoder.backbone, "forward",
                        lambda input_ids, position_ids=None, **kw: model_forward(input_ids=input_ids, **kw))
    captions = lognormal_captions(np.random.default_rng(), 20)

    encoder.encode(captions)

    assert encoder.packing_mode() == "exact" and "attend to each other" in encoder.packing_note


# ------------------------------------------------------------------------------------------ host waits


def count_host_reads(monkeypatch) -> dict:
    """Counts of the calls by lift_fast/embed code that make the host wait for a device tensor."""
    counts: dict[str, int] = {}
    for name in ("cpu", "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "synchronize"):
        original = getattr(torch.Tensor, name, None) or getattr(torch.cuda, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "lift_fast/embed" in caller:
                counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor if hasattr(torch.Tensor, name) else torch.cuda, name, counting)
    return counts


@pytest.mark.parametrize("packing", ["packed", "exact", "off"])
def test_one_host_wait_per_call_not_per_batch(monkeypatch, packing):
    encoder = load_encoder(EmbedConfig(packing=packing, max_tokens=128))
    captions = lognormal_captions(np.random.default_rng(0), 60)
    tokenized = encoder.tokenize(captions)
    encoder.packing_mode()  # the packing probe (once per encoder) reads its rows on the host
    batches = []
    waits_before = HostRows.waits
    counts = count_host_reads(monkeypatch)

    rows = encoder.encode_tokenized(tokenized, on_batch=lambda n, tokens: batches.append(n))

    assert len(batches) >= 6
    assert counts == {} and HostRows.waits - waits_before == 1
    monkeypatch.undo()
    torch.testing.assert_close(rows, load_encoder(EmbedConfig(packing="off")).encode(captions), atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------------ the embed run


@pytest.mark.parametrize("packing", [pytest.param("auto", marks=pytest.mark.slow), "packed"])  # auto: 35 s
def test_compiled_embed_run_reports_padding_within_five_percent(tmp_path, synth_data, packing):
    rng = np.random.default_rng(3)
    varied = [(f"{i:05d}", {"txt": caption.encode()}) for i, caption in enumerate(lognormal_captions(rng, 90))]
    write_shards(tmp_path / "varied", varied, per_shard=40)
    cfg = EmbedConfig(compile="on", packing=packing)
    encoder = load_encoder(cfg)
    encoder.compile(backend="eager")  # dynamo with symbolic lengths, without inductor's C++ build
    for data in (synth_data / "train", tmp_path / "varied"):
        summary = embed_shards(data, tmp_path / f"store_{data.name}", cfg, encoder=encoder, progress=False)
        assert summary["compiled"] and summary["packing"] == ("exact" if packing == "auto" else "packed")
        assert summary["tokens"] <= summary["padded_tokens"] <= 1.05 * summary["tokens"], summary


@pytest.mark.slow  # inductor compiles MiniLM on the CPU: about 4 minutes on 2 cores
def test_cli_embed_compiled_on_the_cpu_reports_padded_tokens_within_five_percent(synth_data, tmp_path, capsys):
    import json

    from lift_fast.cli import main

    main(["-q", "embed", "--data", str(synth_data / "train"), "--out", str(tmp_path / "store"), "embed.compile=on"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["compiled"] and summary["packing"] == "exact"
    assert summary["tokens"] <= summary["padded_tokens"] <= 1.05 * summary["tokens"]
