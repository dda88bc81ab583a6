"""`lift-fast eval`: held-out retrieval and SugarCrepe-style compositional accuracy of a trained run.

Image features come from the run's newest checkpoint; caption embeddings come from the eval
store (checked against the run's embed settings), and the compositional captions and negatives
are embedded by the same frozen encoder, whose weights must be the ones the store was made with.
Writes `eval.json` in the run folder: a flat {metric: number} object.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from lift_fast.atomic import write_json
from lift_fast.config import Config, check_changes, load_config, load_run_config
from lift_fast.data.loader import build_loader
from lift_fast.data.shards import iter_samples, list_shards
from lift_fast.embed import check_manifest, load_encoder
from lift_fast.eval.metrics import compositional_accuracy, retrieval_metrics, unique_captions
from lift_fast.eval.sugarcrepe import SugarCrepeError, load_sugarcrepe
from lift_fast.models.vit import build_model
from lift_fast.train.checkpoint import latest_checkpoint, load_weights
from lift_fast.train.loop import check_store

log = logging.getLogger(__name__)

# Settings eval may take other than the run's saved ones: how it is evaluated and how images are
# read. Anything else (model, image size, embed settings) must be what the run was trained with.
EVAL_SETTINGS = ("eval.*", "data.num_workers", "data.on_error", "data.backend")


@torch.inference_mode()
def image_features(model, loader, device, progress: bool) -> tuple[list[str], torch.Tensor, torch.Tensor, int]:
    """Run the tower over an eval loader: (keys, image features [N, D], store rows [N, D], samples skipped)."""
    keys, features, rows, skipped = [], [], [], 0
    for batch in tqdm(loader, desc="eval images", unit="batch", disable=not progress):
        keys += batch["keys"]
        features.append(model(batch["images"].to(device)).float().cpu())
        rows.append(batch["text_embeddings"])
        skipped += batch["skipped"]
    return keys, torch.cat(features), torch.cat(rows), skipped


def captions_by_key(data_dir: str | Path, keys: Iterable[str]) -> tuple[dict[str, str], set[str]]:
    """The caption text of each of `keys` (the samples the loader yielded, whose captions it has
    read), and the set of every key in the shards. Samples the loader skipped are not decoded, so
    a bad caption among them (data.on_error=skip) is no error here."""
    wanted, captions, every_key = set(keys), {}, set()
    for shard in list_shards(data_dir):
        for sample in iter_samples(shard):
            every_key.add(sample.key)
            if sample.key in wanted:
                captions[sample.key] = sample.caption()
    return captions, every_key


def eval_config(run_dir: str | Path, config_path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """The run's config.yaml, then the file at config_path, then dotted overrides; only EVAL_SETTINGS
    may differ from the saved config. Raises ConfigError naming the file or each key (saved vs asked)."""
    return load_run_config(Path(run_dir) / "config.yaml", config_path, overrides, allowed=EVAL_SETTINGS,
                           action="evaluating a run")


def evaluate(run_dir: str | Path, data_dir: str | Path, embeddings_dir: str | Path, *,
             cfg: Config | None = None, config_path: str | Path | None = None, overrides: Iterable[str] = (),
             checkpoint: str | Path | None = None, progress: bool = True) -> dict[str, float]:
    """Evaluate a run; returns and writes `run_dir/eval.json` (atomically).

    data_dir: eval shards (with an optional `sugarcrepe/` folder of negatives beside them);
    embeddings_dir: their store. The settings are the run's config.yaml with `config_path` and
    `overrides` on top (see `eval_config`), or `cfg`, held to the same rule when the run has a config.yaml.
    Besides the metrics, eval.json counts `skipped_images` (samples the loader skipped, with
    data.on_error=skip) and `compositional_items_skipped` (SugarCrepe items whose image was one).
    Raises ConfigError, StoreError, ShardError, SugarCrepeError or FileNotFoundError naming what
    is missing or wrong.
    """
    run_dir = Path(run_dir)
    if cfg is None:
        cfg = eval_config(run_dir, config_path, overrides)
    elif (run_dir / "config.yaml").is_file():
        saved = run_dir / "config.yaml"
        check_changes(load_config(saved), cfg, EVAL_SETTINGS, source=saved, action="evaluating a run")
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
    keys, features, rows, skipped = image_features(model, loader, device, progress)

    # Retrieval over unique captions: a synthetic set repeats captions, and an image whose caption
    # text is retrieved has found its caption, whichever copy it is.
    captions, every_key = captions_by_key(data_dir, keys)
    unique, caption_index = unique_captions([captions[k] for k in keys])
    first_row = {}
    for row, index in enumerate(caption_index):
        first_row.setdefault(index, row)
    text_features = torch.nn.functional.normalize(rows[[first_row[i] for i in range(len(unique))]], dim=-1)
    results = retrieval_metrics(features, text_features, torch.tensor(caption_index))
    results.update({"num_images": len(keys), "num_captions": len(unique), "checkpoint_step": _step_of(checkpoint),
                    "skipped_images": skipped})

    negatives_dir = Path(data_dir) / "sugarcrepe"
    if cfg.eval.compositional and negatives_dir.is_dir():
        results.update(compositional(negatives_dir, keys, every_key, features, cfg, manifest, embeddings_dir, progress))
    write_json(run_dir / "eval.json", results, indent=2)  # atomic: a crash never leaves half an eval.json
    return results


def compositional(negatives_dir: Path, keys: list[str], every_key: set[str], features: torch.Tensor, cfg: Config,
                  manifest: dict, embeddings_dir, progress: bool) -> dict[str, float]:
    """Accuracy per SugarCrepe category: the image is closer to its caption than to the negative.

    keys: the images evaluated (rows of `features`); every_key: all keys of the eval shards. Items
    whose image is in the shards but was skipped by the loader are left out and counted in
    `compositional_items_skipped`; an item whose image is not in the shards is a SugarCrepeError.
    """
    encoder = load_encoder(cfg.embed)
    check_manifest(manifest, encoder.identity, Path(embeddings_dir))
    row_of = {key: row for row, key in enumerate(keys)}
    out, skipped = {}, 0
    for category, items in tqdm(load_sugarcrepe(negatives_dir).items(), desc="eval compositional", disable=not progress):
        missing = [item for item in items if item["key"] not in every_key]
        if missing:
            raise SugarCrepeError(f"{negatives_dir / (category + '.json')}: {len(missing)} image(s) are not in the "
                                  f"eval shards, e.g. item {missing[0]['id']!r} ({missing[0]['filename']})")
        kept = [item for item in items if item["key"] in row_of]
        skipped += len(items) - len(kept)
        if not kept:
            log.warning("%s: every image was skipped by the loader; no accuracy for %s",
                        negatives_dir / f"{category}.json", category)
            continue
        items = kept
        rows = torch.tensor([row_of[item["key"]] for item in items])
        positive = torch.nn.functional.normalize(encoder.encode([item["caption"] for item in items]), dim=-1)
        negative = torch.nn.functional.normalize(encoder.encode([item["negative_caption"] for item in items]), dim=-1)
        out[f"compositional/{category}"] = compositional_accuracy(features[rows], positive, negative)
    out["compositional_items_skipped"] = skipped
    return out


def _step_of(checkpoint: Path) -> int:
    name = Path(checkpoint).name
    return int(name.split("_")[-1]) if name.startswith("step_") else -1
