"""SugarCrepe++ (Dumpala et al., NeurIPS 2024; github.com/Sri-Harsha/scpp) over COCO val2017.

SugarCrepe++ ships one JSON file per category (`replace_att.json`, `replace_obj.json`,
`replace_rel.json`, `swap_att.json`, `swap_obj.json` in its `data/` folder), each a list of items:

    [{"id": 0, "filename": "000000460347.jpg", "caption": "...", "caption2": "...",
      "negative_caption": "..."}, ...]

`caption` and `caption2` are two true captions with different words; `negative_caption` changes one
thing and shares most of its words with `caption`. Two accuracies per category, as the authors'
evaluation code counts them (a tie is wrong):

- ITT (image-to-text): the image is closer to both positives than to the negative;
- TOT (text-only): the two positives are closer to each other than either is to the negative
  (the text encoder alone: for LIFT, the frozen LLM).

Chance is 1/3 for both (three similarities in random order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lift_fast.eval.formats import DatasetError, ImageRef
from lift_fast.eval.metrics import check_features

FIELDS = ("filename", "caption", "caption2", "negative_caption")


@dataclass
class SugarCrepePPSet:
    name: str
    images: list[ImageRef]  # the distinct images the items refer to
    items: dict[str, list[dict]] = field(default_factory=dict)  # category -> items with `image` (row of images)
    source: str = ""


def load_category(path: Path) -> list[dict]:
    """One category file: its items in file order, each {id, filename, caption, caption2,
    negative_caption} (strings, stripped). Raises DatasetError naming the file and item id for
    unreadable JSON, a top level that is not a non-empty list, a repeated id, an item that is not
    an object, or a missing, non-string or empty field."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: cannot read as JSON ({err})") from None
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{path}: must be a non-empty JSON list of items (id, filename, caption, caption2, "
                           f"negative_caption), got {type(data).__name__ if data else 'nothing'}")
    items, seen = [], set()
    for number, item in enumerate(data):
        if not isinstance(item, dict):
            raise DatasetError(f"{path}: item {number} must be an object, got {type(item).__name__}")
        item_id = str(item.get("id", number))
        if item_id in seen:
            raise DatasetError(f"{path}: item id {item_id!r} is used twice")
        seen.add(item_id)
        where = f"{path}: item {item_id!r}"
        out = {"id": item_id}
        for name in FIELDS:
            if name not in item:
                raise DatasetError(f"{where} has no {name!r} field; it has {sorted(item)}")
            if not isinstance(item[name], str):
                raise DatasetError(f"{where} field {name!r} must be a string, got {type(item[name]).__name__}")
            if not item[name].strip():
                raise DatasetError(f"{where} field {name!r} is empty")
            out[name] = item[name].strip()
        items.append(out)
    return items


def read_sugarcrepe_pp_folder(name: str, annotations: str | Path, images: str | Path) -> SugarCrepePPSet:
    """Every `*.json` category file of the folder `annotations`, over the image folder `images`
    (COCO val2017 as downloaded). Categories are the file stems, in sorted order. Raises
    DatasetError naming the file and item for a missing folder or image and any invalid file."""
    folder, root = Path(annotations), Path(images)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: SugarCrepe++ folder is missing")
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise DatasetError(f"{folder}: holds no *.json category files (replace_att.json, swap_obj.json, ...)")
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder is missing")
    row: dict[Path, int] = {}
    items: dict[str, list[dict]] = {}
    for path in paths:
        for item in load_category(path):
            image = root / item["filename"]
            if image not in row:
                if not image.is_file():
                    raise DatasetError(f"{path}: item {item['id']!r}: image {image} is missing")
                row[image] = len(row)
            items.setdefault(path.stem, []).append({**item, "image": row[image]})
    return SugarCrepePPSet(name, [ImageRef(p) for p in row], items, f"{folder} over {root} (SugarCrepe++)")


def itt_tot_accuracy(image_features: torch.Tensor, caption_features: torch.Tensor, caption2_features: torch.Tensor,
                     negative_features: torch.Tensor) -> dict[str, float]:
    """SugarCrepe++'s two accuracies over N items.

    Takes four [N, D] tensors, L2-normalised, row i of each belonging to item i. Returns `itt`: the
    fraction of items with sim(image, caption) > sim(image, negative) and sim(image, caption2) >
    sim(image, negative); `tot`: the fraction with sim(caption, caption2) > sim(caption, negative)
    and sim(caption, caption2) > sim(caption2, negative). Ties are wrong. Raises ValueError for
    shapes that differ, no rows, or values that are not finite.
    """
    named = {"image_features": image_features, "caption_features": caption_features,
             "caption2_features": caption2_features, "negative_features": negative_features}
    for name, features in named.items():
        check_features(name, features)
    if len({tuple(f.shape) for f in named.values()}) != 1:
        raise ValueError("image, caption, caption2 and negative features must share one shape [N, D], got "
                         + ", ".join(str(tuple(f.shape)) for f in named.values()))
    device = image_features.device
    image, first, second, negative = (f.to(device=device, dtype=torch.float32) for f in named.values())

    def sim(a, b):
        return (a * b).sum(dim=1)

    itt = (sim(image, first) > sim(image, negative)) & (sim(image, second) > sim(image, negative))
    positives = sim(first, second)
    tot = (positives > sim(first, negative)) & (positives > sim(second, negative))
    count = image.shape[0]
    return {"itt": int(itt.sum()) / count, "tot": int(tot.sum()) / count}
