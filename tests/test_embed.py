"""The frozen text encoder and the embed run: pooling, truncation, identity, bad captions, ranks."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lift_fast.config import ConfigError, EmbedConfig
from lift_fast.data.shards import ShardError, ShardWriter
from lift_fast.embed import embed_shards, load_encoder, load_store
from lift_fast.embed.encoder import resolve_model

JPEG = b"\xff\xd8\xff\xe0 not a real image \xff\xd9"
WORDS = [
    "red", "green", "blue", "small", "large", "square", "circle", "triangle", "left", "right",
    "above", "below", "of", "the", "a", "dog", "cat", "photo", "sitting", "next", "to", "under",
    "on", "wooden", "table", "bright", "sunny", "street",
]


def random_captions(rng: np.random.Generator, n: int, max_words: int = 30) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, max_words + 1))) for _ in range(n)]


def write_shards(data_dir, samples: list[tuple[str, dict]], per_shard: int) -> None:
    with ShardWriter(data_dir, samples_per_shard=per_shard) as writer:
        for key, files in samples:
            writer.write(key, {"jpg": JPEG, **files})


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(EmbedConfig(model="all-minilm-l6-v2", max_length=77))


@pytest.fixture(scope="module")
def tiny_decoders(tmp_path_factory):
    """Two folders holding the same tiny random Qwen3 model, with left and with right padding."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2")[0])
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Qwen3Model(config)
    folders = {}
    for side in ("left", "right"):
        folder = tmp_path_factory.mktemp(f"qwen3_{side}")
        model.save_pretrained(folder)
        tokenizer.padding_side = side
        tokenizer.save_pretrained(folder)
        folders[side] = folder
    return folders


# ------------------------------------------------------------------------------------------ encoder


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    rng = np.random.default_rng()
    captions = [
        "a photo of a dog",
        "Two red squares to the LEFT of a small blue circle.",
        "x",
        "Ein Hund läuft über die grüne Wiese 🐕",
        "名古屋の夜景",
        "a cat, a hat; a bat!? (and 3 more)",
        "word " * 120,  # far past 77 tokens: cut
        "the quick brown fox jumps over the lazy dog " * 12,
        *random_captions(rng, 4, max_words=90),
    ]
    reference_model = SentenceTransformer(str(minilm.path), device="cpu")
    reference_model.max_seq_length = 77
    reference = torch.from_numpy(reference_model.encode(captions, normalize_embeddings=True, batch_size=5))

    ours, truncated = minilm.encode(captions, batch_size=3, return_truncated=True)

    assert ours.shape == (len(captions), 384) and ours.dtype == torch.float32
    cosine = F.cosine_similarity(ours, reference, dim=-1)
    assert (cosine >= 0.9999).all(), list(zip(captions, cosine.tolist()))
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(captions)))
    lengths = [len(ids) for ids in minilm.tokenizer(captions)["input_ids"]]
    assert truncated.tolist() == [n > 77 for n in lengths]
    assert truncated[6] and truncated[7] and not truncated[0]


def _unpadded_reference(folder, captions, pooling, max_length):
    """Each caption run alone (no padding) through the model, pooled by hand and normalised."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    rows = []
    with torch.no_grad():
        for caption in captions:
            ids = tokenizer(caption, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            hidden = model(input_ids=ids).last_hidden_state[0]  # [L, D]
            rows.append({"mean": hidden.mean(0), "cls": hidden[0], "last": hidden[-1]}[pooling])
    return F.normalize(torch.stack(rows), dim=-1)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_pooling_with_padding_equals_each_caption_alone(tiny_decoders, side, pooling):
    rng = np.random.default_rng()
    captions = random_captions(rng, 9, max_words=40)  # up to ~40 tokens: some cut at 24
    cfg = EmbedConfig(model=str(tiny_decoders[side]), pooling=pooling, max_length=24)
    encoder = load_encoder(cfg)
    assert encoder.tokenizer.padding_side == side

    ours, truncated = encoder.encode(captions, batch_size=4, return_truncated=True)

    reference = _unpadded_reference(tiny_decoders[side], captions, pooling, 24)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    assert truncated.tolist() == [len(encoder.tokenizer(c)["input_ids"]) > 24 for c in captions]


def test_prompt_is_prepended(minilm):
    prompted = load_encoder(EmbedConfig(prompt="Instruct: describe\nQuery: "))
    caption = ["a blue triangle above a red square"]
    expected = minilm.encode(["Instruct: describe\nQuery: " + caption[0]])
    torch.testing.assert_close(prompted.encode(caption), expected)
    assert not torch.allclose(minilm.encode(caption), expected)
    assert prompted.identity["prompt"] == "Instruct: describe\nQuery: "


def test_identity_hashes_weights_not_folder(tiny_decoders, tmp_path):
    from transformers import AutoModel

    left = load_encoder(EmbedConfig(model=str(tiny_decoders["left"]), pooling="last", max_length=24)).identity
    copy = tmp_path / "copy"
    shutil.copytree(tiny_decoders["left"], copy)
    same = load_encoder(EmbedConfig(model=str(copy), pooling="last", max_length=24)).identity
    model = AutoModel.from_pretrained(copy)
    with torch.no_grad():
        model.norm.weight.add_(1e-3)
    model.save_pretrained(copy)
    changed = load_encoder(EmbedConfig(model=str(copy), pooling="last", max_length=24)).identity

    assert same["weights_sha256"] == left["weights_sha256"] and same["path"] != left["path"]
    assert changed["weights_sha256"] != left["weights_sha256"]
    assert left["dim"] == 32 and left["pooling"] == "last" and left["model"] == str(tiny_decoders["left"])
    assert set(left) >= {"model", "path", "weights_sha256", "pooling", "prompt", "max_length", "normalize", "dim"}


def test_bad_model_settings_are_named(tmp_path, tiny_decoders):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_encoder(EmbedConfig(model=str(tmp_path / "no_such_model")))
    with pytest.raises(FileNotFoundError, match="embed.model='not a hub id'"):  # invalid as a hub id too
        resolve_model("not a hub id")
    with pytest.raises(ConfigError, match="embed.max_length=65 exceeds the 64 positions"):
        load_encoder(EmbedConfig(model=str(tiny_decoders["left"]), max_length=65))


# ------------------------------------------------------------------------------------------ embed run


def test_bad_captions_error_or_counted_skip(tmp_path, minilm):
    data = tmp_path / "data"
    samples = [(f"{i:04d}", {"txt": f"caption number {i}"}) for i in range(10)]
    samples[2] = ("0002", {})  # no .txt
    samples[5] = ("0005", {"txt": b"caf\xe9 latin-1"})  # not UTF-8
    samples[7] = ("0007", {"txt": "   \n"})  # empty once stripped
    write_shards(data, samples, per_shard=100)

    with pytest.raises(ShardError, match=r"00000\.tar.*'0002'.*no caption"):
        embed_shards(data, tmp_path / "store_error", EmbedConfig(on_error="error"), encoder=minilm, progress=False)

    cfg = EmbedConfig(on_error="skip")
    summary = embed_shards(data, tmp_path / "store", cfg, encoder=minilm, progress=False)
    keys, embeddings, manifest = load_store(tmp_path / "store")

    assert summary["skipped"] == 3 and summary["rows"] == 7 and summary["captions"] == 10
    assert keys == [k for k, _ in samples if k not in ("0002", "0005", "0007")]
    shard = manifest["shards"]["00000"]
    assert shard["skipped"] == 3 and shard["count"] == 7
    reasons = {s["key"]: s["reason"] for s in shard["skipped_samples"]}
    assert "missing" in reasons["0002"] and "UTF-8" in reasons["0005"] and "empty" in reasons["0007"]
    expected = minilm.encode([f"caption number {int(k)}" for k in keys]).numpy()
    np.testing.assert_allclose(embeddings.astype(np.float32), expected, atol=2e-3)


@pytest.mark.parametrize("bad", [{"txt": b"\xff\xfe"}, {"txt": ""}])
def test_each_bad_caption_kind_raises_naming_shard_and_key(tmp_path, minilm, bad):
    data = tmp_path / "data"
    write_shards(data, [("a", {"txt": "fine"}), ("b", bad)], per_shard=10)
    with pytest.raises(ShardError, match=r"00000\.tar.*b\.txt"):
        embed_shards(data, tmp_path / "store", EmbedConfig(), encoder=minilm, progress=False)


def test_duplicate_captions_embedded_once(tmp_path, minilm):
    data = tmp_path / "data"
    captions = ["a red circle", "a blue square", "a red circle", "a red circle", "a green cat", "a blue square"]
    write_shards(data, [(f"k{i}", {"txt": c}) for i, c in enumerate(captions)], per_shard=100)
    encoded = []
    original = minilm.encode_tokenized

    def counting_encode(tokenized, *args, **kwargs):
        encoded.extend(tokenized.texts)
        return original(tokenized, *args, **kwargs)

    minilm.encode_tokenized = counting_encode
    try:
        summary = embed_shards(data, tmp_path / "store", EmbedConfig(), encoder=minilm, progress=False)
    finally:
        del minilm.encode_tokenized
    _keys, embeddings, _ = load_store(tmp_path / "store")

    assert sorted(encoded) == sorted(set(captions))
    assert summary["duplicates"] == 3 and summary["embedded"] == 3 and summary["rows"] == 6
    for i, caption in enumerate(captions):
        j = captions.index(caption)
        np.testing.assert_array_equal(embeddings[i], embeddings[j])
    assert not np.array_equal(embeddings[0], embeddings[1])


def test_ranks_take_disjoint_shards(tmp_path, minilm):
    data = tmp_path / "data"
    write_shards(data, [(f"{i:05d}", {"txt": f"shape {i} of many"}) for i in range(25)], per_shard=5)
    store_dir = tmp_path / "store"

    first = embed_shards(data, store_dir, EmbedConfig(), encoder=minilm, rank=0, world_size=2, progress=False)
    assert sorted(p.name for p in store_dir.glob("?????.npy")) == ["00000.npy", "00002.npy", "00004.npy"]
    assert sorted(p.name for p in store_dir.glob("*.caption_hash.npy")) == [
        "00000.caption_hash.npy", "00002.caption_hash.npy", "00004.caption_hash.npy"]
    with pytest.raises(Exception, match="unfinished"):
        load_store(store_dir)
    second = embed_shards(data, store_dir, EmbedConfig(), encoder=minilm, rank=1, world_size=2, progress=False)
    keys, embeddings, manifest = load_store(store_dir)

    assert (first["shards"], second["shards"]) == (3, 2)
    assert first["rows"] + second["rows"] == 25 and second["shards_resumed"] == 0
    assert keys == [f"{i:05d}" for i in range(25)] and list(manifest["shards"]) == [f"{i:05d}" for i in range(5)]
    single = embed_shards(data, tmp_path / "single", EmbedConfig(), encoder=minilm, progress=False)
    np.testing.assert_array_equal(load_store(tmp_path / "single")[1], embeddings)
    assert single["rows"] == 25
    with pytest.raises(ValueError, match="rank 2"):
        embed_shards(data, store_dir, EmbedConfig(), encoder=minilm, rank=2, world_size=2, progress=False)
