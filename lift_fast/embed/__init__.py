"""Embed stage: the frozen text encoder, the embedding store, and the run over all shards.

The store itself (format, reader, writer) is the package lift_fast.store, below both this stage and
the data loader; its reader's names are re-exported here (`lift_fast.embed.load_store` etc.).
"""

from lift_fast.store import (
    EmbeddingStore,
    StoreError,
    StoreMismatchError,
    check_manifest,
    load_store,
    open_store,
)

__all__ = [
    "EmbeddingStore",
    "StoreError",
    "StoreMismatchError",
    "TextEncoder",
    "check_manifest",
    "embed_shards",
    "load_encoder",
    "load_store",
    "open_store",
]


def __getattr__(name: str):
    # The encoder and the embed run import torch and transformers on first use only, so that the
    # store (and its errors, which the command line catches) can be imported without them.
    if name in ("TextEncoder", "load_encoder"):
        from lift_fast.embed import encoder

        return getattr(encoder, name)
    if name == "embed_shards":
        from lift_fast.embed.run import embed_shards

        return embed_shards
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
