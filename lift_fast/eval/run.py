"""`lift-fast eval`: held-out retrieval and SugarCrepe-style compositional accuracy of a trained run.

Image features come from the run's newest checkpoint; caption embeddings come from the eval
store (checked against the run's embed settings), and the compositional captions and negatives
are embedded by the same frozen encoder, whose weights must be the ones the store was made with.
Writes `eval.json` in the run folder: a flat {metric: number} object.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from lift_fast.config import Config, load_config
from lift_fast.data.loader import build_loader
from lift_fast.data.shards import iter_samples, list_shards
from lift_fast.embed import check_manifest, load_encoder
from lift_fast.eval.metrics import compositional_accuracy, retrieval_metrics, unique_captions
from lift_fast.eval.sugarcrepe import load_sugarcrepe
from lift_fast.models.vit import build_model
from lift_fast.train.checkpoint import latest_checkpoint, load_weights
from lift_fast.train.loop import check_store

log = logging.getLogger(__name__)


@torch.inference_mode()
def image_features(model, loader, device, progress: bool) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Run the tower over an eval loader: (keys, image features [N, D], store rows [N, D])."""
    keys, features, rows = [], [], []
    for batch in tqdm(loader, desc="eval images", unit="batch", disable=not progress):
        keys += batch["keys"]
        features.append(model(batch["images"].to(device)).float().cpu())
        rows.append(batch["text_embeddings"])
    return keys, torch.cat(features), torch.cat(rows)


def captions_by_key(data_dir: str | Path) -> dict[str, str]:
    """Every sample's caption text, read from the shards (retrieval dedupes repeated captions)."""
    return {sample.key: sample.caption() for shard in list_shards(data_dir) for sample in iter_samples(shard)}


def evaluate(run_dir: str | Path, data_dir: str | Path, embeddings_dir: str | Path, *,
             cfg: Config | None = None, checkpoint: str | Path | None = None, progress: bool = True) -> dict[str, float]:
    """Evaluate a run; returns and writes `run_dir/eval.json`.

    data_dir: eval shards (with an optional `sugarcrepe/` folder of negatives beside them);
    embeddings_dir: their store. cfg defaults to the run's config.yaml. Raises StoreError,
    ShardError, SugarCrepeError or FileNotFoundError naming what is missing or wrong.
    """
    run_dir = Path(run_dir)
    cfg = cfg or load_config(run_dir / "config.yaml")
    checkpoint = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"run folder {run_dir} has no complete checkpoint to evaluate")
    manifest = check_store(embeddings_dir, cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model, cfg.data.image_size, int(manifest["dim"])).to(device)
    if cfg.train.loss == "siglip":
        model.register_parameter("logit_bias", torch.nn.Parameter(torch.zeros(())))
    load_weights(model, checkpoint)
    model.eval()
    loader = build_loader(data_dir, embeddings_dir, split="eval", batch_size=cfg.eval.batch_size,
                          image_size=cfg.data.image_size, backend=cfg.data.backend, num_workers=cfg.data.num_workers,
                          on_error=cfg.data.on_error)
    keys, features, rows = image_features(model, loader, device, progress)

    # Retrieval over unique captions: a synthetic set repeats captions, and an image whose caption
    # text is retrieved has found its caption, whichever copy it is.
    captions = captions_by_key(data_dir)
    unique, caption_index = unique_captions([captions[k] for k in keys])
    first_row = {}
    for row, index in enumerate(caption_index):
        first_row.setdefault(index, row)
    text_features = torch.nn.functional.normalize(rows[[first_row[i] for i in range(len(unique))]], dim=-1)
    results = retrieval_metrics(features, text_features, torch.tensor(caption_index))
    results.update({"num_images": len(keys), "num_captions": len(unique), "checkpoint_step": _step_of(checkpoint)})

    negatives_dir = Path(data_dir) / "sugarcrepe"
    if cfg.eval.compositional and negatives_dir.is_dir():
        results.update(compositional(negatives_dir, keys, features, cfg, manifest, embeddings_dir, progress))
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def compositional(negatives_dir: Path, keys: list[str], features: torch.Tensor, cfg: Config, manifest: dict,
                  embeddings_dir, progress: bool) -> dict[str, float]:
    """Accuracy per SugarCrepe category: the image is closer to its caption than to the negative."""
    encoder = load_encoder(cfg.embed)
    check_manifest(manifest, encoder.identity, Path(embeddings_dir))
    row_of = {key: row for row, key in enumerate(keys)}
    out = {}
    for category, items in tqdm(load_sugarcrepe(negatives_dir).items(), desc="eval compositional", disable=not progress):
        missing = [item["filename"] for item in items if item["key"] not in row_of]
        if missing:
            raise KeyError(f"{negatives_dir / (category + '.json')}: {len(missing)} image(s) are not in the eval "
                           f"shards, e.g. {missing[0]}")
        rows = torch.tensor([row_of[item["key"]] for item in items])
        positive = torch.nn.functional.normalize(encoder.encode([item["caption"] for item in items]), dim=-1)
        negative = torch.nn.functional.normalize(encoder.encode([item["negative_caption"] for item in items]), dim=-1)
        out[f"compositional/{category}"] = compositional_accuracy(features[rows], positive, negative)
    return out


def _step_of(checkpoint: Path) -> int:
    name = Path(checkpoint).name
    return int(name.split("_")[-1]) if name.startswith("step_") else -1
