"""Does an embedding store hold the rows a run's config asks for? Checked by `train` and `eval`
before they build anything.

The encoder's weights are identified by their sha256, which for an LLM embedder means reading
GBs. It is computed once per job: rank 0 takes it from the store's manifest when the encoder
folder's weight files still have the paths, sizes, times and inodes recorded there (`weights_fingerprint`),
and hashes the files only otherwise; the other ranks receive rank 0's answer over torch.distributed
(when a process group is initialised), so 64 ranks never read a 15 GB folder 64 times.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from lift_fast.config import Config
from lift_fast.embed.encoder import resolve_model, weights_sha256
from lift_fast.embed.manifest import EMBED_SETTINGS, StoreError, check_manifest, read_manifest


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _weights_identity(cfg: Config, recorded: dict) -> dict:
    """{"path", "weights_sha256"} of embed.model on this machine, or {} when it is not here (name only)."""
    try:
        path, _ = resolve_model(cfg.embed.model)
        return {"path": str(path), "weights_sha256": weights_sha256(path, recorded)}
    except FileNotFoundError:  # not on this machine: only the name is known
        return {}


def expected_store(cfg: Config, manifest: dict | None = None) -> dict:
    """What the run's config asks of an embedding store, in manifest terms.

    The embed settings (EMBED_SETTINGS), and when embed.model resolves to a folder (as the encoder
    loader resolves it) that folder and the sha256 of its weights: the same weights named differently
    (the bundled alias, a path) make the same rows. Otherwise the name is compared. manifest: the
    store's, whose recorded hash is used when the weights' fingerprint matches (see the module docstring).
    Under torch.distributed rank 0 finds the hash and broadcasts it (every rank must call this).
    Raises StoreError on every rank when rank 0 failed to read the weights (naming its error).
    """
    expected = {name: getattr(cfg.embed, name) for name in EMBED_SETTINGS}
    recorded = (manifest or {}).get("encoder") or {}
    if not _distributed():
        return {**expected, **_weights_identity(cfg, recorded)}
    answer: list = [None]
    if dist.get_rank() == 0:
        try:
            answer[0] = {"identity": _weights_identity(cfg, recorded)}
        except OSError as err:  # unreadable weights: every rank must hear of it, or the others would wait forever
            answer[0] = {"error": f"rank 0 could not hash the weights of embed.model={cfg.embed.model!r}: {err}"}
    dist.broadcast_object_list(answer, src=0)
    if "error" in answer[0]:
        raise StoreError(answer[0]["error"])
    return {**expected, **answer[0]["identity"]}


def check_store(embeddings_dir: str | Path, cfg: Config) -> dict:
    """The store's manifest, after checking it against cfg.embed (see `expected_store`; under
    torch.distributed every rank calls this). Raises StoreError/StoreMismatchError naming the file
    and each field that differs."""
    manifest = read_manifest(embeddings_dir)
    check_manifest(manifest, expected_store(cfg, manifest), Path(embeddings_dir))
    return manifest
