"""Long-caption retrieval sets in the layouts they are downloaded in: one long caption per image.

    Urban-1k      root/image/{i}.jpg, root/caption/{i}.txt (i = 1..1000)          kind=retrieval,format=urban1k
                  (huggingface.co/datasets/BeichenZhang/Urban1k, Urban1k.zip)
    DOCCI         root/docci_descriptions.jsonlines (one JSON object a line: example_id, split, image_file,
                  description), root/images/ (docci_images.tar.gz)          kind=retrieval,format=docci
    DCI           densely_captioned_images/annotations/*.json (image, short_caption, extra_caption, ...),
                  densely_captioned_images/photos/, splits.json              kind=retrieval,format=dci
    ShareGPT4V-1k the first 1,000 rows of share-captioner_coco_lcs_sam_1246k_1107.json (image,
                  conversations[1].value), images under a root              kind=retrieval,format=sharegpt4v

The captions are taken as the field's evaluation code takes them (Long-CLIP's Urban1k.py and
sharegpt4v.py, the DCI retrieval loaders that join `short_caption` and `extra_caption` with a
newline), so a figure here stands beside theirs. Every reader returns a RetrievalSet (one caption
per image) without decoding an image; a missing or malformed file is one DatasetError naming the
file and entry.
"""

from __future__ import annotations

import json
from pathlib import Path

from lift_fast.eval.formats import IMAGE_SUFFIXES, DatasetError, ImageRef, RetrievalSet

DOCCI_FILE = "docci_descriptions.jsonlines"
DCI_FOLDER = "densely_captioned_images"
SHAREGPT4V_FILE = "share-captioner_coco_lcs_sam_1246k_1107.json"
SHAREGPT4V_LIMIT = 1000  # Long-CLIP's ShareGPT4V-1k: the file's first 1,000 rows (its training run skips them)
_CHUNK = 1 << 20  # characters read at a time from a large JSON array


def _natural(stem: str) -> tuple:
    """Sort key: numeric stems by value (2 before 10), then the rest by name."""
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def _image(path: Path, where: str) -> ImageRef:
    if not path.is_file():
        raise DatasetError(f"{where}: image {path} is missing")
    return ImageRef(path)


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{where}: `{field}` must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DatasetError(f"{where}: `{field}` is empty")
    return value.strip()


def _folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} folder is missing")
    return path


def read_urban1k(name: str, root: str | Path) -> RetrievalSet:
    """Urban-1k as unzipped: caption/{i}.txt paired with image/{i}.jpg by stem, in numeric order.

    A caption is its file's text (lines joined by a space; the files hold one line). Raises
    DatasetError naming the file for a missing folder, an empty or non-UTF-8 caption, a caption
    without its image or an image without its caption.
    """
    root = Path(root)
    images = _folder(root / "image", "Urban-1k image")
    captions = _folder(root / "caption", "Urban-1k caption")
    by_stem = {p.stem: p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    caption_files = sorted((p for p in captions.iterdir() if p.suffix == ".txt"), key=lambda p: _natural(p.stem))
    if not caption_files:
        raise DatasetError(f"{captions}: holds no .txt captions (Urban-1k layout: caption/{{i}}.txt, image/{{i}}.jpg)")
    refs, texts = [], []
    for path in caption_files:
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as err:
            raise DatasetError(f"{path}: cannot read the caption as UTF-8 text ({err})") from None
        text = " ".join(line for line in lines if line)
        if not text:
            raise DatasetError(f"{path}: caption file is empty")
        if path.stem not in by_stem:
            raise DatasetError(f"{path}: its image {images / (path.stem + '.jpg')} is missing")
        refs.append(ImageRef(by_stem[path.stem]))
        texts.append([text])
    orphans = sorted(set(by_stem) - {p.stem for p in caption_files}, key=_natural)
    if orphans:
        raise DatasetError(f"{by_stem[orphans[0]]}: image has no caption {captions / (orphans[0] + '.txt')} "
                           f"({len(orphans)} image(s) without a caption)")
    return RetrievalSet(name, refs, texts, f"{root} (Urban-1k)")


def read_docci(name: str, path: str | Path, images: str | Path | None = None, split: str = "test") -> RetrievalSet:
    """DOCCI: the rows of docci_descriptions.jsonlines whose `split` is `split` (train, test,
    qual_dev, qual_test), each image images/`image_file` with its `description`.

    path: the folder holding docci_descriptions.jsonlines (and images/), or the file itself; images:
    the image folder (default: images/ beside the file). Raises DatasetError naming file, line and
    example_id for a line that is not a JSON object, a missing or non-string field, an empty
    description or a missing image, and when no row has the split.
    """
    path = Path(path)
    annotations = path / DOCCI_FILE if path.is_dir() else path
    root = _folder(Path(images) if images else annotations.parent / "images", "DOCCI image")
    try:
        lines = annotations.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{annotations}: cannot read the DOCCI descriptions ({err})") from None
    refs, texts, splits = [], [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{annotations}: line {number} is not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{annotations}: line {number} is not a JSON object")
        where = f"{annotations}: line {number} (example_id {row.get('example_id')!r})"
        for field in ("example_id", "split", "image_file", "description"):
            if field not in row:
                raise DatasetError(f"{where} has no `{field}` field; it has {sorted(row)}")
        row_split = _text(row["split"], where, "split")
        splits.add(row_split)
        if row_split != split:
            continue
        texts.append([_text(row["description"], where, "description")])
        refs.append(_image(root / _text(row["image_file"], where, "image_file"), where))
    if not refs:
        raise DatasetError(f"{annotations}: no row has split {split!r} (splits there: {', '.join(sorted(splits)) or 'none'})")
    return RetrievalSet(name, refs, texts, f"{annotations} over {root} (DOCCI, split {split})")


def read_dci(name: str, path: str | Path, images: str | Path | None = None, split: str = "all") -> RetrievalSet:
    """DCI (Densely Captioned Images): one annotation JSON per image; the caption is `short_caption`
    and `extra_caption` joined by a newline, as the field's DCI retrieval code joins them.

    path: the densely_captioned_images folder (annotations/, photos/, splits.json) or the folder
    above it; images: the photo folder (default photos/). split: `all` (every file splits.json
    lists, in its order, as the field evaluates: 7,805 images) or one of its keys (train, valid,
    test); without splits.json, `all` reads annotations/*.json in name order. Raises DatasetError
    naming the file for a missing folder or file, a field that is missing, not a string, or an
    empty short_caption, and a missing image.
    """
    base = Path(path)
    if (base / DCI_FOLDER).is_dir():
        base = base / DCI_FOLDER
    folder = _folder(base / "annotations", "DCI annotations")
    root = _folder(Path(images) if images else base / "photos", "DCI photo")
    splits_file = base / "splits.json"
    if splits_file.is_file():
        try:
            splits = json.loads(splits_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DatasetError(f"{splits_file}: cannot read as JSON ({err})") from None
        if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
            raise DatasetError(f"{splits_file}: must map each split to a list of annotation file names")
        if split != "all" and split not in splits:
            raise DatasetError(f"{splits_file}: has no split {split!r} (splits: {', '.join(splits)}; or split=all)")
        names = [n for key, listed in splits.items() if split in ("all", key) for n in listed]
    elif split == "all":
        names = sorted(p.name for p in folder.glob("*.json"))
    else:
        raise DatasetError(f"{splits_file} is missing, so split={split!r} cannot be read; use split=all")
    if not names:
        raise DatasetError(f"{folder}: no annotation file to read (split {split!r})")
    refs, texts = [], []
    for file_name in names:
        annotation = folder / str(file_name)
        try:
            entry = json.loads(annotation.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DatasetError(f"{annotation}: cannot read as JSON ({err})") from None
        if not isinstance(entry, dict):
            raise DatasetError(f"{annotation}: must be a JSON object (image, short_caption, extra_caption, ...)")
        for field in ("image", "short_caption", "extra_caption"):
            if field not in entry:
                raise DatasetError(f"{annotation}: has no `{field}` field; it has {sorted(entry)[:8]}")
        short = _text(entry["short_caption"], str(annotation), "short_caption")
        if not isinstance(entry["extra_caption"], str):
            raise DatasetError(f"{annotation}: `extra_caption` must be a string")
        extra = entry["extra_caption"].strip()
        texts.append([f"{short}\n{extra}" if extra else short])
        refs.append(_image(root / _text(entry["image"], str(annotation), "image"), str(annotation)))
    return RetrievalSet(name, refs, texts, f"{base} (DCI, split {split})")


def first_array_items(path: Path, limit: int) -> list:
    """The first `limit` items of the JSON array in `path` (all of them when it has fewer), parsed one
    at a time, so the 1.5 GB ShareGPT4V file is not loaded whole for its first 1,000 rows. Raises
    DatasetError naming the file when it is not a JSON array."""
    decoder = json.JSONDecoder()
    items: list = []
    try:
        with open(path, encoding="utf-8") as f:
            buffer, position, ended = f.read(_CHUNK), 0, False
            buffer = buffer.lstrip()
            if not buffer.startswith("["):
                raise DatasetError(f"{path}: must be a JSON array of rows (image, conversations)")
            position = 1
            while len(items) < limit:
                while position < len(buffer) and buffer[position] in " \t\r\n,":
                    position += 1
                if position < len(buffer) and buffer[position] == "]":
                    break
                try:
                    item, position = decoder.raw_decode(buffer, position)
                except json.JSONDecodeError as err:
                    more = "" if ended else f.read(_CHUNK)
                    if not more:
                        raise DatasetError(f"{path}: row {len(items)} is not valid JSON ({err.msg})") from None
                    ended = len(more) < _CHUNK
                    buffer, position = buffer[position:] + more, 0
                    continue
                items.append(item)
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read ({err})") from None
    return items


def read_sharegpt4v(name: str, path: str | Path, images: str | Path | None = None,
                    limit: int = SHAREGPT4V_LIMIT) -> RetrievalSet:
    """ShareGPT4V-1k: the first `limit` rows of a ShareGPT4V JSON, each image images/`image` with the
    caption `conversations[1].value` (newlines as spaces, as Long-CLIP reads it).

    path: the JSON file; images: the root its `image` paths are relative to (default: the file's
    folder). Raises DatasetError naming file and row for a row without `image` or a second
    conversation turn with a non-empty `value`, and for a missing image.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: ShareGPT4V JSON file is missing")
    root = _folder(Path(images) if images else path.parent, "ShareGPT4V image root")
    rows = first_array_items(path, limit)
    if not rows:
        raise DatasetError(f"{path}: the JSON array is empty")
    refs, texts = [], []
    for number, row in enumerate(rows):
        where = f"{path}: row {number}"
        if not isinstance(row, dict):
            raise DatasetError(f"{where} is not an object (image, conversations)")
        if "image" not in row or "conversations" not in row:
            raise DatasetError(f"{where} needs `image` and `conversations`; it has {sorted(row)}")
        turns = row["conversations"]
        if not isinstance(turns, list) or len(turns) < 2 or not isinstance(turns[1], dict) or "value" not in turns[1]:
            raise DatasetError(f"{where} ({row.get('image')}): `conversations` needs a second turn with a `value` "
                               "(the caption)")
        caption = _text(turns[1]["value"], where, "conversations[1].value").replace("\n", " ")
        refs.append(_image(root / _text(row["image"], where, "image"), where))
        texts.append([caption])
    return RetrievalSet(name, refs, texts, f"{path} over {root} (ShareGPT4V, first {len(rows)} rows)")
