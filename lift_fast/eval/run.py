"""`lift-fast eval`: held-out retrieval and SugarCrepe-style compositional accuracy of a trained run
over its eval shards, and a suite of tasks in the field's formats (lift_fast.eval.tasks).

Image features come from the run's newest checkpoint; caption embeddings come from the eval
store (checked against the run's embed settings), and the compositional captions and negatives
and every task's captions, class names and prompts are embedded by the same frozen encoder, whose
weights must be the ones the store was made with. Writes `eval.json` in the run folder (a flat
{metric: number} object) and, for tasks, `clip_benchmark/<dataset>_<task>.json` (CLIP_benchmark's
result format, one file per task).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from lift_fast.atomic import write_json
from lift_fast.config import Config, ConfigError, check_changes, load_config, load_run_config
from lift_fast.data.captions import caption_from
from lift_fast.data.loader import build_loader
from lift_fast.data.shards import iter_samples, list_shards
from lift_fast.embed import check_manifest
from lift_fast.eval.metrics import compositional_accuracy, retrieval_metrics, unique_captions
from lift_fast.eval.model import EvalModel, load_run_model
from lift_fast.eval.sugarcrepe import SugarCrepeError, load_sugarcrepe
from lift_fast.eval.tasks import TaskSpec, read_tasks, run_task
from lift_fast.train.checkpoint import latest_checkpoint
from lift_fast.train.store_check import check_store

log = logging.getLogger(__name__)

# Settings eval may take other than the run's saved ones: how it is evaluated and how images are
# read. Anything else (model, image size, embed settings) must be what the run was trained with.
EVAL_SETTINGS = ("eval.*", "data.num_workers", "data.on_error", "data.backend")


def image_features(model: EvalModel, loader, progress: bool) -> tuple[list[str], torch.Tensor, torch.Tensor, int]:
    """Run the tower over an eval loader: (keys, image features [N, D] on the eval device, store rows
    [N, D] there too, samples skipped)."""
    keys, features, rows, skipped = [], [], [], 0
    for batch in tqdm(loader, desc="eval images", unit="batch", disable=not progress):
        keys += batch["keys"]
        features.append(model.encode_batch(batch["images"]))
        rows.append(batch["text_embeddings"].to(model.device))
        skipped += batch["skipped"]
    return keys, torch.cat(features), torch.cat(rows), skipped


def captions_by_key(data_dir: str | Path, keys: Iterable[str], source: str = "txt") -> tuple[dict[str, str], set[str]]:
    """The caption text (of caption `source`, see lift_fast.data.captions) of each of `keys` (the
    samples the loader yielded, whose captions it has read), and the set of every key in the shards.
    Samples the loader skipped are not decoded, so a bad caption among them (data.on_error=skip) is
    no error here."""
    wanted, captions, every_key = set(keys), {}, set()
    for shard in list_shards(data_dir):
        for sample in iter_samples(shard):
            every_key.add(sample.key)
            if sample.key in wanted:
                captions[sample.key] = caption_from(sample.files, source, shard, sample.key)
    return captions, every_key


def eval_config(run_dir: str | Path, config_path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """The run's config.yaml, then the file at config_path, then dotted overrides; only EVAL_SETTINGS
    may differ from the saved config. Raises ConfigError naming the file or each key (saved vs asked)."""
    return load_run_config(Path(run_dir) / "config.yaml", config_path, overrides, allowed=EVAL_SETTINGS,
                           action="evaluating a run")


def evaluate(run_dir: str | Path, data_dir: str | Path | None = None, embeddings_dir: str | Path | None = None, *,
             tasks: Sequence[TaskSpec] = (), cfg: Config | None = None, config_path: str | Path | None = None,
             overrides: Iterable[str] = (), checkpoint: str | Path | None = None,
             progress: bool = True) -> dict[str, float]:
    """Evaluate a run; returns and writes `run_dir/eval.json` (atomically).

    data_dir: eval shards (with an optional `sugarcrepe/` folder of negatives beside them);
    embeddings_dir: their store (both or neither). tasks: data sets in the field's formats (see
    lift_fast.eval.tasks), whose results are also written to `run_dir/clip_benchmark/`. Every data
    set, store and file is checked before the model is loaded. The settings are the run's
    config.yaml with `config_path` and `overrides` on top (see `eval_config`), or `cfg`, held to the
    same rule when the run has a config.yaml.
    Besides the metrics, eval.json counts `skipped_images` (samples the loader skipped, with
    data.on_error=skip) and `compositional_items_skipped` (SugarCrepe items whose image was one).
    An eval.json of the same checkpoint is updated (its other metrics are kept), one of another
    checkpoint replaced. Raises ConfigError, StoreError, ShardError, SugarCrepeError, DatasetError
    or FileNotFoundError naming what is missing or wrong.
    """
    run_dir = Path(run_dir)
    if (data_dir is None) != (embeddings_dir is None):
        raise ConfigError("eval over shards needs both the shard folder (--data) and its store (--embeddings)")
    if data_dir is None and not tasks:
        raise ConfigError("nothing to evaluate: give eval shards (--data and --embeddings) or tasks (--tasks/--task)")
    if cfg is None:
        cfg = eval_config(run_dir, config_path, overrides)
    elif (run_dir / "config.yaml").is_file():
        saved = run_dir / "config.yaml"
        check_changes(load_config(saved), cfg, EVAL_SETTINGS, source=saved, action="evaluating a run")
    checkpoint = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"run folder {run_dir} has no complete checkpoint to evaluate")
    # Everything is read and checked here, before any model work.
    manifest = check_store(embeddings_dir, cfg) if data_dir is not None else None
    negatives_dir = Path(data_dir) / "sugarcrepe" if data_dir is not None else None
    negatives = (load_sugarcrepe(negatives_dir) if negatives_dir is not None and cfg.eval.compositional
                 and negatives_dir.is_dir() else None)
    if data_dir is not None:
        list_shards(data_dir)
    datasets = read_tasks(list(tasks))

    model = load_run_model(run_dir, cfg, checkpoint)
    results: dict[str, float] = {"checkpoint_step": _step_of(checkpoint)}
    if data_dir is not None:
        results.update(shard_eval(model, data_dir, embeddings_dir, manifest, negatives, progress))
    standard, previous = [], (None, None)  # the last task's images and features: a set at two lengths is encoded once
    for spec, dataset in zip(tasks, datasets):
        images = tuple(dataset.images)
        if images != previous[0]:
            previous = (images, model.encode_images(dataset.images, progress=progress, desc=f"eval {spec.name}"))
        flat, objects = run_task(spec, dataset, model, max_length=cfg.eval.max_length, progress=progress,
                                 image_features=previous[1])
        results.update(flat)
        standard += objects
    if standard:
        (run_dir / "clip_benchmark").mkdir(exist_ok=True)
    for result in standard:
        slug = f"{result['dataset']}_{result['task']}".replace("/", "_")
        write_json(run_dir / "clip_benchmark" / f"{slug}.json", result, indent=2)
    previous = _read_eval_json(run_dir / "eval.json")
    if previous.get("checkpoint_step") == results["checkpoint_step"]:
        results = {**previous, **results}
    write_json(run_dir / "eval.json", results, indent=2)  # atomic: a crash never leaves half an eval.json
    return results


def shard_eval(model: EvalModel, data_dir, embeddings_dir, manifest: dict, negatives: dict | None,
               progress: bool) -> dict[str, float]:
    """Retrieval over the eval shards' own captions (their store's rows of one caption source,
    eval.caption_source, named in the results as `caption_source/NAME`: 1), and compositional
    accuracy of the SugarCrepe files beside them (`negatives`, or None to skip)."""
    cfg = model.cfg
    loader = build_loader(data_dir, embeddings_dir, split="eval", batch_size=cfg.eval.batch_size,
                          image_size=cfg.data.image_size, backend=cfg.data.backend, num_workers=cfg.data.num_workers,
                          on_error=cfg.data.on_error, caption_source=cfg.eval.caption_source)
    source = loader.dataset.reader.store.sources[loader.stream.eval_source]
    log.info("eval: retrieval against caption source %r of %s", source, embeddings_dir)
    keys, features, rows, skipped = image_features(model, loader, progress)

    # Retrieval over unique captions: a synthetic set repeats captions, and an image whose caption
    # text is retrieved has found its caption, whichever copy it is.
    captions, every_key = captions_by_key(data_dir, keys, source)
    unique, caption_index = unique_captions([captions[k] for k in keys])
    first_row = {}
    for row, index in enumerate(caption_index):
        first_row.setdefault(index, row)
    if model.clip_mode:  # the run's own text tower embeds the captions (the store's rows are the frozen encoder's)
        text_features = model.text_encoder().encode(unique)
    else:
        text_features = torch.nn.functional.normalize(rows[[first_row[i] for i in range(len(unique))]].float(), dim=-1)
    results = retrieval_metrics(features, text_features, torch.tensor(caption_index))
    results.update({"num_images": len(keys), "num_captions": len(unique), "skipped_images": skipped,
                    f"caption_source/{source}": 1})
    if negatives is not None:
        encoder = model.text_encoder()
        if not model.clip_mode:  # the frozen encoder must be the store's; a CLIP-mode run's tower is its own
            check_manifest(manifest, encoder.identity, Path(embeddings_dir))
        results.update(compositional(Path(data_dir) / "sugarcrepe", negatives, keys, every_key, features, encoder,
                                     progress))
    return results


def compositional(negatives_dir: Path, negatives: dict[str, list[dict]], keys: list[str], every_key: set[str],
                  features: torch.Tensor, encoder, progress: bool) -> dict[str, float]:
    """Accuracy per SugarCrepe category: the image is closer to its caption than to the negative.

    negatives: load_sugarcrepe(negatives_dir); keys: the images evaluated (rows of `features`);
    every_key: all keys of the eval shards. Items whose image is in the shards but was skipped by
    the loader are left out and counted in `compositional_items_skipped`; an item whose image is
    not in the shards is a SugarCrepeError.
    """
    row_of = {key: row for row, key in enumerate(keys)}
    device = features.device
    out, skipped = {}, 0
    for category, items in tqdm(negatives.items(), desc="eval compositional", disable=not progress):
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
        rows = torch.tensor([row_of[item["key"]] for item in items], device=device)
        positive = torch.nn.functional.normalize(encoder.encode([item["caption"] for item in items]), dim=-1)
        negative = torch.nn.functional.normalize(encoder.encode([item["negative_caption"] for item in items]), dim=-1)
        out[f"compositional/{category}"] = compositional_accuracy(features[rows], positive.to(device),
                                                                  negative.to(device))
    out["compositional_items_skipped"] = skipped
    return out


def _read_eval_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _step_of(checkpoint: Path) -> int:
    name = Path(checkpoint).name
    return int(name.split("_")[-1]) if name.startswith("step_") else -1
