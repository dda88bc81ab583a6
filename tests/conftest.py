"""Shared fixtures: a tiny synthetic set and its embedding stores, made once per test session.

The text encoder is the bundled all-MiniLM-L6-v2, read from disk only (HF_HUB_OFFLINE).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The Triton loss kernels run on CPU tensors under the interpreter; it must be on before
# lift_fast.kernels is imported (triton.jit decides at decoration time).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for subprocesses started by tests

import pytest
import torch

# One intra-op thread: tests run on small CPU boxes shared with other jobs, where torch's default
# thread pool spins against them and a 10-step training run takes 30x longer than with one thread.
torch.set_num_threads(1)

# A forked child (the tests' gloo ranks, loader workers) must never run the finaliser of garbage it inherited,
# such as a DALI pipeline an earlier test left for the collector: its worker threads do not exist in the child,
# and DALI's _shutdown crashed a forked rank with a segmentation fault in a full run. Everything alive at the
# fork is frozen (the child's collector skips it; a constant-time move), and thawed again in the parent.
os.register_at_fork(before=gc.freeze, after_in_parent=gc.unfreeze)

TINY = {"num_train": 64, "num_eval": 32, "image_size": 32, "samples_per_shard": 16, "seed": 0,
        "num_zeroshot": 24, "num_retrieval": 12}


@pytest.fixture(scope="session")
def text_encoder():
    """The default encoder (EmbedConfig()), loaded once."""
    from lift_fast.config import EmbedConfig
    from lift_fast.embed import load_encoder

    return load_encoder(EmbedConfig())


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """data/{train,eval}/ of the synthetic set: 64 train and 32 eval samples at 32 px, 16 per shard."""
    from lift_fast.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic(out, progress=False, **TINY)
    return out


@pytest.fixture(scope="session")
def stores(synth_data, text_encoder, tmp_path_factory) -> Path:
    """stores/{train,eval}/: the embedding stores of `synth_data` made with EmbedConfig() defaults.

    Shared by many tests: copy a store before changing anything in it.
    """
    from lift_fast.config import EmbedConfig
    from lift_fast.embed import embed_shards

    out = tmp_path_factory.mktemp("stores")
    for split in ("train", "eval"):
        embed_shards(synth_data / split, out / split, EmbedConfig(), progress=False, encoder=text_encoder)
    return out
