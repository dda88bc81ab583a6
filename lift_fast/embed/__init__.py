"""Embed stage: the frozen text encoder, the embedding store, and the run over all shards."""

from lift_fast.embed.encoder import TextEncoder, load_encoder
from lift_fast.embed.run import embed_shards
from lift_fast.embed.store import (
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
