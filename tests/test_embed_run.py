"""The embed run end to end: quantization with its fidelity check, int8 stores, settings never mixed in
one store, torchrun ranks from the command line, and a killed run resumed to byte-identical files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_embed import random_captions, write_shards

from lift_fast.config import ConfigError, EmbedConfig
from lift_fast.data.shards import ShardError
from lift_fast.embed import (
    StoreMismatchError,
    embed_shards,
    load_encoder,
    load_store,
    open_store,
)
from lift_fast.embed.quantize import FidelityError, cosine_fidelity
from lift_fast.embed.store import (
    StoreError,
    check_manifest,
    finished_shard,
    quantize_rows,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(EmbedConfig(max_length=77))


def make_data(data_dir, n: int, per_shard: int, seed: int | None = None) -> list[str]:
    captions = random_captions(np.random.default_rng(seed), n, max_words=40)
    write_shards(data_dir, [(f"{i:05d}", {"txt": c}) for i, c in enumerate(captions)], per_shard=per_shard)
    return captions


# ------------------------------------------------------------------------------------------ int8 store


def test_int8_rows_round_trip_within_half_a_step():
    rng = np.random.default_rng()
    rows = rng.standard_normal((37, 19)).astype(np.float32) * rng.uniform(0.01, 10, size=(37, 1)).astype(np.float32)
    rows[5] = 0.0  # an all-zero row keeps scale 1 and stays zero

    quantized, scales = quantize_rows(rows)

    assert quantized.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (37,)
    peak = np.abs(rows).max(axis=1)
    np.testing.assert_allclose(scales[peak > 0], peak[peak > 0] / 127, rtol=1e-6)
    error = np.abs(quantized.astype(np.float64) * scales[:, None] - rows)
    assert (error <= scales[:, None] / 2 * (1 + 1e-5)).all()
    assert np.abs(quantized).max() == 127 and not quantized[5].any()


def test_int8_store_reads_as_float32_through_the_store_api(tmp_path, minilm):
    captions = make_data(tmp_path / "data", n=13, per_shard=5)
    summary = embed_shards(tmp_path / "data", tmp_path / "store", EmbedConfig(dtype="int8"), encoder=minilm,
                           progress=False)
    _keys, embeddings, manifest = load_store(tmp_path / "store")

    assert summary["rows"] == 13 and manifest["dtype"] == "int8" and manifest["version"] == 5
    assert embeddings.dtype == np.float32 and embeddings.shape == (13, 384)
    expected = minilm.encode(captions).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=np.abs(expected).max() / 254 + 1e-6)
    assert F.cosine_similarity(torch.from_numpy(embeddings), torch.from_numpy(expected)).min() > 0.9995

    store = open_store(tmp_path / "store")
    rows = store.embeddings("00001")  # what the training loader indexes, row by row
    assert rows.shape == (5, 384) and len(rows) == 5
    row = store.row_index("00001")["00007"]
    np.testing.assert_array_equal(np.asarray(rows[row], dtype=np.float32), embeddings[7])
    np.testing.assert_array_equal(rows[1:3], embeddings[6:8])
    np.testing.assert_array_equal(rows[np.array([4, 0])], embeddings[[9, 5]])
    np.testing.assert_array_equal(rows[2, 10:20], embeddings[7, 10:20])
    np.testing.assert_array_equal(np.asarray(rows), embeddings[5:10])
    assert np.load(tmp_path / "store" / "00001.npy").dtype == np.int8

    scales = tmp_path / "store" / "00002.scales.npy"
    scales.unlink()
    with pytest.raises(StoreError, match="00002.scales.npy do not exist"):
        open_store(tmp_path / "store").embeddings("00002")
    assert finished_shard(tmp_path / "store", "00002") is None  # so a rerun embeds it again
    again = embed_shards(tmp_path / "data", tmp_path / "store", EmbedConfig(dtype="int8"), encoder=minilm, progress=False)
    assert (again["shards_resumed"], again["shards_embedded"]) == (2, 1) and scales.is_file()


# ------------------------------------------------------------------------------------------ quantization


def test_int8_quantized_encoder_reports_its_fidelity(tmp_path):
    captions = make_data(tmp_path / "data", n=24, per_shard=10)
    cfg = EmbedConfig(quantize="int8", min_fidelity=0.95, fidelity_sample=16, dtype="float32")

    summary = embed_shards(tmp_path / "data", tmp_path / "store", cfg, progress=False)
    _, rows, manifest = load_store(tmp_path / "store")

    report = manifest["fidelity"]
    assert summary["fidelity"] == report and summary["quantize"] == "int8"
    assert report["mode"] == "int8" and report["captions"] == 16 and report["min_fidelity"] == 0.95
    assert manifest["encoder"]["quantize"] == "int8"
    # The sample is the data's first 16 distinct captions: their stored (quantized) rows against a
    # fresh unquantized encoder give the reported figures.
    reference = load_encoder(EmbedConfig()).encode(captions[:16])
    mean, worst = cosine_fidelity(torch.from_numpy(rows[:16]), reference)
    assert abs(mean - report["cosine_mean"]) < 1e-4 and abs(worst - report["cosine_min"]) < 1e-4
    assert 0.95 <= worst < 0.99999  # quantized: close, but not the same rows


def test_low_fidelity_is_refused_before_any_shard_is_written(tmp_path):
    make_data(tmp_path / "data", n=12, per_shard=6)
    cfg = EmbedConfig(quantize="int8", min_fidelity=0.999999, fidelity_sample=8)
    with pytest.raises(FidelityError) as err:
        embed_shards(tmp_path / "data", tmp_path / "store", cfg, progress=False)
    message = str(err.value)
    assert "embed.quantize=int8" in message and "embed.min_fidelity=0.999999" in message
    assert "on 8 captions of 00000.tar" in message and "mean 0.99" in message
    assert not (tmp_path / "store").exists()  # no manifest left to hold a later run to int8


def test_bf16_mixed_is_checked_against_fp32(tmp_path):
    make_data(tmp_path / "data", n=8, per_shard=8)
    summary = embed_shards(tmp_path / "data", tmp_path / "store", EmbedConfig(precision="bf16-mixed"), progress=False)
    manifest = load_store(tmp_path / "store")[2]
    report = manifest["precision_fidelity"]
    assert summary["precision_fidelity"] == report and summary["precision"] == "bf16-mixed"
    assert report["captions"] == 8 and 0.9999 <= report["cosine_min"] <= report["cosine_mean"] < 1.0
    with pytest.raises(FidelityError, match=r"embed.precision=bf16-mixed.*to the fp32 model's on 8 captions"):
        embed_shards(tmp_path / "data", tmp_path / "strict", EmbedConfig(precision="bf16-mixed", min_fidelity=1.0),
                     progress=False)


def test_unavailable_quantization_is_a_clear_error(tmp_path, monkeypatch):
    make_data(tmp_path / "data", n=3, per_shard=3)
    with pytest.raises(ConfigError, match=r"embed.quantize=fp8 needs a CUDA GPU .*compute capability >= 8.9"):
        embed_shards(tmp_path / "data", tmp_path / "store", EmbedConfig(quantize="fp8"), progress=False)
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"embed.quantize=int8 needs torchao.*pip install"):
        embed_shards(tmp_path / "data", tmp_path / "store", EmbedConfig(quantize="int8"), progress=False)
    assert not (tmp_path / "store").exists()


# ------------------------------------------------------------------------------------------ never mixed


def test_other_precision_quantization_or_dim_is_not_added_to_a_store(tmp_path, minilm):
    make_data(tmp_path / "data", n=6, per_shard=3)
    store_dir = tmp_path / "store"
    embed_shards(tmp_path / "data", store_dir, EmbedConfig(), encoder=minilm, progress=False)
    (store_dir / "00001.npy").unlink()  # a shard left to do
    before = sorted(p.name for p in store_dir.iterdir())

    with pytest.raises(StoreMismatchError, match=r"embed.precision: asked 'bf16', found 'fp32'"):
        embed_shards(tmp_path / "data", store_dir, EmbedConfig(precision="bf16"), progress=False)
    with pytest.raises(StoreMismatchError, match=r"embed.quantize: asked 'int8', found 'none'"):
        embed_shards(tmp_path / "data", store_dir, EmbedConfig(quantize="int8"), encoder=minilm, progress=False)
    with pytest.raises(StoreMismatchError, match=r"dim: asked 64, found 384"):
        embed_shards(tmp_path / "data", store_dir, EmbedConfig(dim=64), progress=False)
    assert sorted(p.name for p in store_dir.iterdir()) == before


def test_a_truncated_store_is_refused_where_the_full_width_is_asked(tmp_path):
    make_data(tmp_path / "data", n=4, per_shard=4)
    embed_shards(tmp_path / "data", tmp_path / "store", EmbedConfig(dim=128), progress=False)
    manifest = load_store(tmp_path / "store")[2]
    assert manifest["dim"] == 128 and manifest["encoder"]["model_dim"] == 384

    # what `train` asks: the embed settings of its config (embed.dim=0 is the model's full width)
    asked = {"model": "all-minilm-l6-v2", "pooling": "mean", "prompt": "", "max_length": 77, "normalize": True}
    check_manifest(manifest, {**asked, "dim": 128}, tmp_path / "store")
    with pytest.raises(StoreMismatchError, match=r"dim: asked 0 \(the model's full width, 384\), found 128"):
        check_manifest(manifest, {**asked, "dim": 0}, tmp_path / "store")


# ------------------------------------------------------------------------------------------ long captions


def test_long_captions_are_cut_skipped_or_an_error_as_asked(tmp_path, minilm):
    long = "a very long caption about a dog " * 30  # ~190 tokens
    captions = ["a red circle", long, "a blue square", long, "a green cat"]
    write_shards(tmp_path / "data", [(f"k{i}", {"txt": c}) for i, c in enumerate(captions)], per_shard=10)

    cut = embed_shards(tmp_path / "data", tmp_path / "cut", EmbedConfig(), encoder=minilm, progress=False)
    assert (cut["rows"], cut["truncated"], cut["skipped"]) == (5, 2, 0)

    skipped = embed_shards(tmp_path / "data", tmp_path / "skip", EmbedConfig(on_long="skip"), encoder=minilm,
                           progress=False)
    keys, rows, manifest = load_store(tmp_path / "skip")
    assert (skipped["rows"], skipped["skipped"], skipped["truncated"], skipped["captions"]) == (3, 2, 0, 5)
    assert keys == ["k0", "k2", "k4"] and manifest["encoder"]["on_long"] == "skip"
    reasons = {s["key"]: s["reason"] for s in manifest["shards"]["00000"]["skipped_samples"]}
    assert set(reasons) == {"k1", "k3"} and "k1.txt is longer than embed.max_length=77 tokens" in reasons["k1"]
    np.testing.assert_allclose(rows, load_store(tmp_path / "cut")[1][[0, 2, 4]], atol=1e-3)

    with pytest.raises(ShardError, match=r"00000\.tar: caption k1\.txt is longer than embed.max_length=77"):
        embed_shards(tmp_path / "data", tmp_path / "error", EmbedConfig(on_long="error"), encoder=minilm,
                     progress=False)
    with pytest.raises(StoreMismatchError, match=r"embed.on_long: asked 'truncate', found 'skip'"):
        embed_shards(tmp_path / "data", tmp_path / "skip", EmbedConfig(), encoder=minilm, progress=False)


# ------------------------------------------------------------------------------------------ command line


def test_torchrun_ranks_take_disjoint_shards(tmp_path, monkeypatch, capsys):
    from lift_fast.cli import main

    make_data(tmp_path / "data", n=10, per_shard=2)  # 5 shards
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["-q", "embed", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "store")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == 2 and summary["rows"] == 4
    assert sorted(p.name for p in (tmp_path / "store").glob("?????.npy")) == ["00001.npy", "00003.npy"]
    monkeypatch.setenv("RANK", "2")
    assert main(["-q", "embed", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "store")]) == 2
    assert "RANK=2 and WORLD_SIZE=2" in capsys.readouterr().err


def _embed_command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lift_fast", "-q", "embed", "--data", str(data), "--out", str(out), "--device", "cpu"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_killed_run_resumes_to_byte_identical_files(tmp_path):
    make_data(tmp_path / "data", n=12 * 25, per_shard=25, seed=7)  # 12 shards
    # The uninterrupted run in this process (one torch thread, as the command's OMP_NUM_THREADS=1 gives it)
    embed_shards(tmp_path / "data", tmp_path / "whole", EmbedConfig(), progress=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    killed_dir = tmp_path / "killed"
    run = subprocess.Popen(_embed_command(tmp_path / "data", killed_dir), env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while run.poll() is None and time.monotonic() < deadline:
        if any(killed_dir.glob("0000[1-9].keys.txt")):  # mid-way: the second shard is being written
            break
        time.sleep(0.002)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    finished = [name for name in (f"{i:05d}" for i in range(12)) if finished_shard(killed_dir, name)]
    assert len(finished) < 12
    with pytest.raises(StoreError):
        load_store(killed_dir)

    again = subprocess.run(_embed_command(tmp_path / "data", killed_dir), env=env, capture_output=True, text=True, check=False,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["shards_resumed"] == len(finished) and summary["shards_embedded"] == 12 - len(finished)
    assert _files(killed_dir) == _files(tmp_path / "whole")
