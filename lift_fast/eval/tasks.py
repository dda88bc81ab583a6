"""An evaluation suite: tasks named in a YAML file (or by `--task`), each a data set in one format.

    tasks:                                   # tasks.yaml
      - {name: imagenet, kind: zeroshot, format: wds, path: /data/wds_imagenet1k}
      - {name: coco, kind: retrieval, format: karpathy, path: dataset_coco.json, images: /data/coco}
      - {name: coco_long, kind: retrieval, format: wds, path: /data/wds_docci, max_length: 256}
      - {name: sugarcrepe, kind: sugarcrepe, format: image_folder, path: sugar-crepe/data, images: val2017}
      - {name: urban1k, kind: retrieval, format: urban1k, path: /data/Urban1k, max_length: max}
      - {name: scpp, kind: sugarcrepe_pp, format: image_folder, path: scpp/data, images: val2017}

`--task kind=zeroshot,format=wds,path=DIR[,name=N,...]` gives one task with the same fields. Every
data set is read and checked (`read_task`) before the model is loaded; each task's metrics come
back under flat names (`zeroshot/<name>/top1`, `retrieval/<name>/i2t_r1`,
`compositional/<name>/<category>`, `compositional_pp/<name>/<category>/itt|tot`) and as CLIP_benchmark result objects (`dataset`, `model`,
`pretrained`, `task`, `metrics`), which `clip_benchmark build` tables beside open_clip models.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from lift_fast.config import ConfigError
from lift_fast.eval.formats import (
    DatasetError,
    RetrievalSet,
    SugarCrepeSet,
    ZeroShotSet,
    read_image_folder_zeroshot,
    read_karpathy,
    read_sugarcrepe_folder,
    read_wds_retrieval,
    read_wds_zeroshot,
)
from lift_fast.eval.long_captions import SHAREGPT4V_LIMIT, read_dci, read_docci, read_sharegpt4v, read_urban1k
from lift_fast.eval.metrics import compositional_accuracy
from lift_fast.eval.model import EvalModel
from lift_fast.eval.retrieval import KS, multi_caption_retrieval
from lift_fast.eval.sugarcrepe_pp import SugarCrepePPSet, itt_tot_accuracy, read_sugarcrepe_pp_folder
from lift_fast.eval.zeroshot import class_vectors, zeroshot_metrics

FORMATS = {"zeroshot": ("wds", "image_folder"), "retrieval": ("karpathy", "wds", "urban1k", "docci", "dci", "sharegpt4v"),
           "sugarcrepe": ("image_folder",), "sugarcrepe_pp": ("image_folder",)}
# CLIP_benchmark's task names, for its result files (it has no SugarCrepe++: the closest is SugarCrepe's)
CLIP_BENCHMARK_TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
                        "sugarcrepe": "image_caption_selection", "sugarcrepe_pp": "image_caption_selection"}
METRIC_PREFIX = {"sugarcrepe": "compositional", "sugarcrepe_pp": "compositional_pp"}
DEFAULT_SPLIT = {"dci": "all"}  # every other format: test
NEEDS_IMAGES = ("karpathy", "sugarcrepe", "sugarcrepe_pp")  # formats (or kinds) whose images= is required
ENCODER_LIMIT = -1  # max_length=max: as many tokens as the text encoder has positions


@dataclasses.dataclass
class TaskSpec:
    """One evaluation task: what to measure, on which data set, in which layout."""

    kind: str  # zeroshot | retrieval | sugarcrepe | sugarcrepe_pp
    format: str  # see FORMATS
    path: str  # wds/image folder root; Karpathy JSON; SugarCrepe(++) JSON folder; a long-caption set's root or file
    name: str = ""  # in metric names; default: the path's folder or file stem
    split: str = ""  # wds split folder; Karpathy or DOCCI split; DCI split (default: all for dci, else test)
    images: str = ""  # image folder (karpathy, sugarcrepe, sugarcrepe_pp; docci, dci, sharegpt4v: optional)
    classnames: str = ""  # image_folder zero-shot: class names file (default root/classnames.txt)
    templates: str = ""  # image_folder zero-shot: templates file (default root/zeroshot_classification_templates.txt)
    max_length: int = 0  # tokens kept of captions and prompts (0: eval.max_length, else the run's; `max`: the encoder's)
    limit: int = 0  # sharegpt4v: rows read from the file's start (0: 1,000, ShareGPT4V-1k)

    def __post_init__(self):
        where = f"task {self.name or self.path!r}"
        if self.kind not in FORMATS:
            raise ConfigError(f"{where}: kind={self.kind!r} is not one of {', '.join(FORMATS)}")
        if self.format not in FORMATS[self.kind]:
            raise ConfigError(f"{where}: format={self.format!r} is not one of {', '.join(FORMATS[self.kind])} "
                              f"for kind={self.kind}")
        if not self.path:
            raise ConfigError(f"{where}: needs path=")
        if (self.format in NEEDS_IMAGES or self.kind in NEEDS_IMAGES) and not self.images:
            raise ConfigError(f"{where}: {'kind=' + self.kind if self.kind in NEEDS_IMAGES else 'format=' + self.format} "
                              "needs images= (the image folder)")
        self.name = self.name or Path(self.path).stem or Path(self.path).name
        self.split = self.split or DEFAULT_SPLIT.get(self.format, "test")
        if str(self.max_length).strip().lower() in ("max", str(ENCODER_LIMIT)):
            self.max_length = ENCODER_LIMIT
        elif int(self.max_length) < 0:
            raise ConfigError(f"{where}: max_length={self.max_length} must be >= 0 (or max: the encoder's limit)")
        self.max_length = int(self.max_length)
        if int(self.limit) < 0 or (int(self.limit) and self.format != "sharegpt4v"):
            raise ConfigError(f"{where}: limit={self.limit}: a count of rows >= 1, for format=sharegpt4v only")
        self.limit = int(self.limit)


def parse_task(text: str) -> TaskSpec:
    """`kind=zeroshot,format=wds,path=DIR,...` -> TaskSpec; raises ConfigError naming a bad field."""
    fields = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"--task {text!r}: {part!r} is not key=value (fields: "
                              f"{', '.join(f.name for f in dataclasses.fields(TaskSpec))})")
        fields[key.strip()] = value.strip()
    return _spec(fields, f"--task {text!r}")


def _spec(fields: dict, where: str) -> TaskSpec:
    known = {f.name for f in dataclasses.fields(TaskSpec)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; fields are {', '.join(sorted(known))}")
    missing = [name for name in ("kind", "format", "path") if name not in fields]
    if missing:
        raise ConfigError(f"{where}: needs {', '.join(missing)}")
    try:
        return TaskSpec(**{k: v if k in ("max_length", "limit") else str(v) for k, v in fields.items()})
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_task_file(path: str | Path) -> list[TaskSpec]:
    """The tasks of a YAML file: `tasks:` with a list of task mappings (or the list alone). Relative
    paths are taken from the file's folder. Raises ConfigError naming the file and task."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the tasks file ({err})") from None
    entries = data.get("tasks") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected `tasks:` with a non-empty list of tasks (kind, format, path, ...)")
    specs = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: tasks[{number}] must be a mapping of kind, format, path, ...")
        entry = dict(entry)
        for key in ("path", "images", "classnames", "templates"):
            if entry.get(key):
                entry[key] = str(path.parent / Path(str(entry[key])).expanduser())
        specs.append(_spec(entry, f"{path}: tasks[{number}]"))
    names = [spec.name for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"{path}: task name(s) {', '.join(repeated)} used twice; give each task its own name=")
    return specs


def read_task(spec: TaskSpec) -> ZeroShotSet | RetrievalSet | SugarCrepeSet | SugarCrepePPSet:
    """Read and check the task's data set (no image is decoded); raises DatasetError naming the file."""
    if spec.kind == "zeroshot":
        if spec.format == "wds":
            return read_wds_zeroshot(spec.name, spec.path, spec.split)
        return read_image_folder_zeroshot(spec.name, spec.path, spec.classnames or None, spec.templates or None)
    if spec.kind == "retrieval":
        images = spec.images or None
        readers = {
            "wds": lambda: read_wds_retrieval(spec.name, spec.path, spec.split),
            "karpathy": lambda: read_karpathy(spec.name, spec.path, spec.images, spec.split),
            "urban1k": lambda: read_urban1k(spec.name, spec.path),
            "docci": lambda: read_docci(spec.name, spec.path, images, spec.split),
            "dci": lambda: read_dci(spec.name, spec.path, images, spec.split),
            "sharegpt4v": lambda: read_sharegpt4v(spec.name, spec.path, images, spec.limit or SHAREGPT4V_LIMIT),
        }
        return readers[spec.format]()
    if spec.kind == "sugarcrepe_pp":
        return read_sugarcrepe_pp_folder(spec.name, spec.path, spec.images)
    return read_sugarcrepe_folder(spec.name, spec.path, spec.images)


def _embed(encoder, texts: list[str], desc: str = "", progress: bool = False) -> tuple[torch.Tensor, int]:
    """L2-normalised embeddings of texts and how many were cut at the encoder's max_length."""
    with tqdm(total=len(texts), desc=desc, unit="caption", disable=not progress) as bar:
        rows, truncated = encoder.encode(texts, return_truncated=True, on_batch=lambda captions, _: bar.update(captions))
    return torch.nn.functional.normalize(rows.float(), dim=-1), int(truncated.sum())


def run_task(spec: TaskSpec, dataset, model: EvalModel, *, max_length: int = 0, progress: bool = False,
             image_features: torch.Tensor | None = None) -> tuple[dict[str, float], list[dict]]:
    """Evaluate one task: (flat metrics, CLIP_benchmark result objects). max_length: eval.max_length
    (the task's own wins; 0 for both: the run's embed.max_length). image_features: the features of
    dataset.images when already computed (a long set run at two lengths encodes its images once)."""
    length = spec.max_length or max_length
    encoder = model.text_encoder(model.max_text_length() if length == ENCODER_LIMIT else length)
    prefix = f"{METRIC_PREFIX.get(spec.kind, spec.kind)}/{spec.name}"
    features = image_features if image_features is not None else model.encode_images(
        dataset.images, progress=progress, desc=f"eval {spec.name}")
    device = features.device
    common = {"num_images": len(dataset.images), "max_length": encoder.cfg.max_length}
    if spec.kind == "zeroshot":
        cut = 0

        def encode(prompts: list[str]) -> torch.Tensor:
            nonlocal cut
            rows, truncated = encoder.encode(prompts, return_truncated=True)
            cut = int(truncated.sum())
            return rows

        classes = class_vectors(encode, dataset.classnames, dataset.templates)
        ks = (1, 5) if len(dataset.classnames) >= 5 else (1,)
        result = zeroshot_metrics(features, classes.to(device), dataset.labels, ks=ks)
        flat = {**result, **common, "num_classes": len(dataset.classnames), "prompts_truncated": cut}
        standard = {"acc1": result["top1"], "mean_per_class_recall": result["mean_per_class_recall"]}
        if "top5" in result:
            standard["acc5"] = result["top5"]
        objects = [_result(spec, model, standard)]
    elif spec.kind == "retrieval":
        texts = [caption for captions in dataset.captions for caption in captions]
        text_image = [image for image, captions in enumerate(dataset.captions) for _ in captions]
        text_features, cut = _embed(encoder, texts, f"eval {spec.name} captions", progress)
        result = multi_caption_retrieval(features, text_features.to(device), text_image, ks=KS)
        flat = {**result, **common, "num_captions": len(texts), "captions_truncated": cut}
        standard = {}
        for k in KS:
            standard[f"image_retrieval_recall@{k}"] = result[f"t2i_r{k}"]
            standard[f"text_retrieval_recall@{k}"] = result[f"i2t_r{k}"]
        objects = [_result(spec, model, standard)]
    elif spec.kind == "sugarcrepe_pp":
        flat, objects = _sugarcrepe_pp(spec, dataset, model, encoder, features, progress)
        flat.update(common)
    else:
        flat, objects, cut = dict(common), [], 0
        for category, items in dataset.items.items():
            positive, cut_positive = _embed(encoder, [item["caption"] for item in items])
            negative, cut_negative = _embed(encoder, [item["negative_caption"] for item in items])
            rows = torch.tensor([item["image"] for item in items], device=device)
            accuracy = compositional_accuracy(features[rows], positive.to(device), negative.to(device))
            flat[category] = accuracy
            cut += cut_positive + cut_negative
            objects.append(_result(spec, model, {"acc": accuracy, "text_acc": accuracy},
                                   dataset=f"sugar_crepe/{category}"))
        flat["captions_truncated"] = cut
    return {f"{prefix}/{name}": value for name, value in flat.items()}, objects


def _sugarcrepe_pp(spec: TaskSpec, dataset: SugarCrepePPSet, model: EvalModel, encoder, features: torch.Tensor,
                   progress: bool) -> tuple[dict[str, float], list[dict]]:
    """ITT and TOT per category (`<category>/itt`, `<category>/tot`) and the captions cut."""
    items = [item for category in dataset.items.values() for item in category]
    texts = {name: _embed(encoder, [item[name] for item in items], f"eval {spec.name} {name}", progress)
             for name in ("caption", "caption2", "negative_caption")}
    flat, objects, start = {"captions_truncated": sum(cut for _, cut in texts.values())}, [], 0
    device = features.device
    for category, category_items in dataset.items.items():
        rows = slice(start, start + len(category_items))
        start += len(category_items)
        images = features[torch.tensor([item["image"] for item in category_items], device=device)]
        result = itt_tot_accuracy(images, *(texts[name][0][rows].to(device)
                                            for name in ("caption", "caption2", "negative_caption")))
        flat[f"{category}/itt"], flat[f"{category}/tot"] = result["itt"], result["tot"]
        objects.append(_result(spec, model, {"itt": result["itt"], "tot": result["tot"]},
                               dataset=f"sugar_crepe_pp/{category}"))
    return flat, objects


def _result(spec: TaskSpec, model: EvalModel, metrics: dict, dataset: str = "") -> dict:
    """One result in CLIP_benchmark's output JSON (what `clip_benchmark eval --output` writes)."""
    return {"dataset": dataset or (f"wds/{spec.name}" if spec.format == "wds" else spec.name),
            "model": model.cfg.model.name, "pretrained": str(model.checkpoint.parent.parent),
            "task": CLIP_BENCHMARK_TASKS[spec.kind], "metrics": metrics, "language": "en"}


def read_tasks(specs: list[TaskSpec]) -> list:
    """read_task of every spec, all before any model work; raises the first DatasetError, naming its task."""
    datasets = []
    for spec in specs:
        try:
            datasets.append(read_task(spec))
        except DatasetError as err:
            raise DatasetError(f"task {spec.name!r} ({spec.kind}, {spec.format}): {err}") from None
    return datasets
