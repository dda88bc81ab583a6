"""One hash of the encoder's weights per job: the store manifest's hash is used while the weight files'
paths, sizes, times and inodes match the fingerprint recorded beside it, a changed file is hashed again, and
under torch.distributed rank 0 alone reads the weights and broadcasts what it found."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from lift_fast.config import load_config
from lift_fast.embed import encoder
from lift_fast.embed.encoder import weights_fingerprint, weights_sha256
from lift_fast.train import store_check


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The weight files read for their content hash (names, in order), with the per-process cache emptied."""
    calls: list[str] = []
    real = encoder._file_sha256

    def counting(path):
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(encoder, "_file_sha256", counting)
    monkeypatch.setattr(encoder, "_weights_hash_cache", {})
    return calls


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights " * 1000)
    (folder / "pytorch_model.bin").write_bytes(b"more weights")
    (folder / "config.json").write_text("{}")  # not a weight file: neither hashed nor fingerprinted
    return folder


def expected_hash(folder) -> str:
    """weights_sha256's definition, computed here independently."""
    lines = "".join(f"{name}:{hashlib.sha256((folder / name).read_bytes()).hexdigest()}\n"
                    for name in ("model.safetensors", "pytorch_model.bin"))
    return hashlib.sha256(lines.encode()).hexdigest()


def test_recorded_hash_is_used_while_the_fingerprint_matches(model_folder, hashed):
    recorded = {"weights_sha256": "f" * 64, "weights_fingerprint": weights_fingerprint(model_folder)}
    assert weights_sha256(model_folder, recorded) == "f" * 64 and hashed == []  # taken, not computed
    assert weights_sha256(model_folder) == "f" * 64 and hashed == []  # and cached for the process

    encoder._weights_hash_cache.clear()
    assert weights_sha256(model_folder) == expected_hash(model_folder)
    assert hashed == ["model.safetensors", "pytorch_model.bin"]


@pytest.mark.parametrize("change", ["mtime", "size", "new file", "rewritten, mtime kept", "replaced, mtime kept"])
def test_a_changed_weight_file_is_hashed_again(model_folder, hashed, change):
    recorded = {"weights_sha256": "f" * 64, "weights_fingerprint": weights_fingerprint(model_folder)}
    weights = model_folder / "model.safetensors"
    stat = weights.stat()
    if change == "mtime":
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    elif change == "size":
        weights.write_bytes(weights.read_bytes() + b"!")
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same mtime: the size alone tells
    elif change == "new file":
        (model_folder / "model-00002.safetensors").write_bytes(b"a second part")
    else:  # a fine-tuned model's file of the same size under a fixed mtime, as reproducible builds leave them
        other = weights.read_bytes().replace(b"weights", b"tuned!!")
        if change.startswith("replaced"):
            (model_folder / "new.tmp").write_bytes(other)
            os.replace(model_folder / "new.tmp", weights)
        else:
            time.sleep(0.05)  # past the kernel's coarse clock tick (up to 10 ms), as any real rewrite is
            weights.write_bytes(other)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert weights_fingerprint(model_folder) != recorded["weights_fingerprint"]
    assert weights_sha256(model_folder, recorded) != "f" * 64 and hashed


def test_train_and_eval_check_a_real_store_without_reading_the_weights(stores, hashed):
    manifest = json.loads((stores / "train" / "manifest.json").read_text())
    assert manifest["encoder"]["weights_fingerprint"]
    checked = store_check.check_store(stores / "train", load_config())
    assert checked["encoder"]["weights_sha256"] == manifest["encoder"]["weights_sha256"] and hashed == []

    from lift_fast.eval import run as eval_run
    from lift_fast.train import loop

    assert eval_run.check_store is loop.check_store is store_check.check_store


def test_embed_into_an_existing_store_takes_the_recorded_hash(synth_data, stores, tmp_path, hashed):
    """A rerun (or another rank of the embed job) with a freshly loaded encoder reads no weights for its identity."""
    import shutil

    from lift_fast.config import EmbedConfig
    from lift_fast.embed import embed_shards, load_encoder

    store = shutil.copytree(stores / "eval", tmp_path / "store")
    fresh = load_encoder(EmbedConfig())
    summary = embed_shards(synth_data / "eval", store, EmbedConfig(), encoder=fresh, progress=False)
    assert summary["shards_resumed"] == summary["shards"] and hashed == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, folder: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        calls: list[str] = []
        real = encoder._file_sha256
        encoder._file_sha256 = lambda path: calls.append(path.name) or real(path)
        encoder._weights_hash_cache.clear()
        expected = store_check.expected_store(load_config(None, [f"embed.model={folder}"]))
        result = {"calls": calls, "weights_sha256": expected.get("weights_sha256")}

        def unreadable(path):
            raise PermissionError(13, "Permission denied", str(path))

        encoder._file_sha256 = unreadable
        encoder._weights_hash_cache.clear()
        try:
            store_check.expected_store(load_config(None, [f"embed.model={folder}"]))
        except store_check.StoreError as err:
            result["error"] = str(err)
        with open(f"{out}.rank{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_hash_once_on_rank_0(model_folder, tmp_path):
    out = tmp_path / "result"
    # fork: the children inherit the imported torch instead of importing it again
    mp.start_processes(_rank, args=(_free_port(), str(model_folder), str(out)), nprocs=2, join=True,
                       start_method="fork")
    rank0, rank1 = (json.loads((tmp_path / f"result.rank{rank}").read_text()) for rank in range(2))
    assert rank0["calls"] == ["model.safetensors", "pytorch_model.bin"] and rank1["calls"] == []
    assert rank0["weights_sha256"] == rank1["weights_sha256"] == expected_hash(model_folder)
    # rank 0 could not read the weights: every rank raises (none waits forever), naming rank 0's error
    assert rank0["error"] == rank1["error"] and "rank 0 could not hash" in rank1["error"]
    assert "Permission denied" in rank1["error"]
