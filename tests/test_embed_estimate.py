"""`lift-fast embed --estimate`: tokens, padded tokens, FLOPs, GPU-hours and store bytes, from config.json and
tokenizer only, checked against counts made here from the captions and the model shapes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from nvembed_equivalent import NV_EMBED_V2
from test_embed import write_shards
from test_embed_packing import lognormal_captions

from lift_fast.cli import main
from lift_fast.config import EmbedConfig
from lift_fast.device import DENSE_BF16_TFLOPS
from lift_fast.embed.encoder import load_encoder, resolve_model
from lift_fast.embed.estimate import estimate
from lift_fast.embed.run import read_captions

# Qwen3-Embedding-8B's config.json (shape fields)
QWEN3_8B = {"model_type": "qwen3", "architectures": ["Qwen3Model"], "hidden_size": 4096, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 12288, "head_dim": 128,
            "vocab_size": 151665, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6}


def decoder_flops(shape: dict, length: int) -> float:
    """Forward FLOPs of a Llama-style decoder over one caption, from its config fields alone."""
    h, heads, kv = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape.get("head_dim") or h // heads
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * shape["intermediate_size"]
    return shape["num_hidden_layers"] * (2 * length * per_layer + 4 * length * length * heads * head_dim)


def config_only_folder(tmp_path, config: dict):
    """A model folder with config.json and MiniLM's tokenizer files, no weights."""
    folder = tmp_path / "model"
    folder.mkdir()
    for path in resolve_model("all-minilm-l6-v2")[0].iterdir():
        if path.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(path, folder / path.name)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_estimate_of_the_synthetic_set_counts_every_caption(synth_data, tmp_path):
    out = tmp_path / "estimate.json"
    main(["-q", "embed", "--data", str(synth_data / "train"), "--out", str(tmp_path / "store"), "--estimate",
          "--json", str(out)])
    report = json.loads(out.read_text())

    encoder = load_encoder(EmbedConfig())
    lengths, keys = [], []
    for shard in sorted((synth_data / "train").glob("*.tar")):
        captions = read_captions(shard, "error")
        lengths += [len(ids) for ids in encoder.tokenize(list(dict.fromkeys(captions.captions))).ids]
        keys += captions.keys
    assert report["captions"] == 64 and report["embedded"] == len(lengths) and report["scaled_by"] == 1
    assert report["tokens"] == sum(lengths)
    assert report["plan"] == "packed" and report["padded_tokens"] == sum(lengths)
    assert report["plans"]["exact"] <= 1.05 * sum(lengths) < report["plans"]["padded"]
    from lift_fast.models.flops import encoder_flops_per_caption

    assert report["flops"] == pytest.approx(sum(encoder_flops_per_caption(encoder.model, n) for n in lengths), rel=1e-9)
    for gpu in ("H100", "H200", "B200"):
        assert report["gpu_hours"][gpu] == pytest.approx(report["flops"] / (DENSE_BF16_TFLOPS[gpu] * 1e12 * 0.4) / 3600)
    key_bytes = sum(len(key) + 1 for key in keys) / len(keys)  # a key and its newline in NAME.keys.txt
    assert report["store_bytes"]["float16"] == round(64 * (384 * 2 + 8 + key_bytes))
    assert report["store_bytes"]["int8"] == round(64 * (384 + 4 + 8 + key_bytes))
    assert set(report["store_bytes_by_dim"]) == {"384", "256"}


def test_estimate_from_a_config_json_alone_scales_a_sample(tmp_path):
    folder = config_only_folder(tmp_path, QWEN3_8B)
    rng = np.random.default_rng(0)
    samples = [(f"{i:06d}", {"txt": c.encode()}) for i, c in enumerate(lognormal_captions(rng, 400))]
    write_shards(tmp_path / "data", samples, per_shard=100)

    report = estimate(tmp_path / "data", EmbedConfig(model=str(folder), pooling="last", dim=1024), sample=100)

    assert report["sample"]["shards_read"] == 1 and report["scaled_by"] == pytest.approx(4, rel=0.05)
    assert report["captions"] == pytest.approx(400, rel=0.05)
    assert report["model_dim"] == 4096 and report["dim"] == 1024
    assert report["store_bytes"]["float16"] < report["store_bytes_by_dim"]["4096"]["float16"] / 3.9
    per_caption = report["flops"] / report["embedded"]
    mean_length = report["tokens"] / report["embedded"]
    assert per_caption == pytest.approx(decoder_flops(QWEN3_8B, mean_length), rel=0.02)  # attention is ~1 %
    assert report["padded_tokens"] == report["tokens"]


def test_nv_embed_config_counts_mistral_and_the_latent_pooling(tmp_path):
    config = {**NV_EMBED_V2, "model_type": "nvembed", "auto_map": {"AutoModel": "modeling_nvembed.NVEmbedModel"}}
    folder = config_only_folder(tmp_path, config)
    write_shards(tmp_path / "data", [("a", {"txt": b"a red cube"}), ("b", {"txt": b"a blue ball on a table"})],
                 per_shard=10)

    report = estimate(tmp_path / "data", EmbedConfig(model=str(folder), pooling="model"))

    assert report["nv_embed"] and report["plan"] == "exact" and report["model_dim"] == 4096
    text = NV_EMBED_V2["text_config"]
    latent = 2 * (2 * 4096 * 8 * 4096 + 4096 * 8 * 4096 + 4 * 4096 * 4096) + 4 * 512 * 8 * 4096
    lengths = [len(ids) for ids in load_encoder(EmbedConfig(pooling="last")).tokenize(["a red cube",
                                                                                        "a blue ball on a table"]).ids]
    assert report["useful_flops"] == pytest.approx(sum(decoder_flops(text, n) + latent * n for n in lengths), rel=1e-6)
    # the figure: ~1.08 TFLOPs per 77-token caption for the Mistral-7B part
    assert decoder_flops(text, 77) == pytest.approx(1.08e12, rel=0.01)
