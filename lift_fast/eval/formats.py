"""Evaluation data sets in the field's layouts, read and checked before any model work starts.

Zero-shot classification:
    CLIP_benchmark webdataset    root/{split}/nshards.txt, root/{split}/0.tar ... (KEY.jpg|png|webp + KEY.cls),
                                 root/classnames.txt (one name per line, line i = class i),
                                 root/zeroshot_classification_templates.txt (one template per line, `{c}`)
    image folder                 root/<class folder>/*.jpg ..., a classnames file (`folder<TAB>name` per
                                 line, or one name per line for the sorted folders), a templates file
Retrieval (several captions per image):
    Karpathy JSON                {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}
                                 over an image folder (COCO: filepath/filename; Flickr30k: filename)
    CLIP_benchmark webdataset    root/{split}/... (KEY.jpg + KEY.txt, one caption per line),
                                 root/dataset_type.txt = `retrieval`
SugarCrepe over an image folder  one JSON per category (see lift_fast.eval.sugarcrepe), images by filename

Every reader returns lists of `ImageRef` (where an image's bytes are, and how to name it in an
error) and never decodes an image; a missing or malformed file is a DatasetError naming the file
and what is wrong.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from lift_fast.data.shards import IMAGE_EXTENSIONS, split_member_name
from lift_fast.eval.sugarcrepe import SugarCrepeError, load_sugarcrepe

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)  # compared lower-cased (ImageNet's are .JPEG)


class DatasetError(ValueError):
    """An evaluation data set that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ImageRef:
    """Where one image's encoded bytes are: a file, or a member of a tar (offset and size of its data)."""

    path: Path
    offset: int = -1  # -1: the whole file
    size: int = -1
    name: str = ""  # the member name inside a tar

    @property
    def where(self) -> str:
        return f"{self.path}: {self.name}" if self.name else str(self.path)

    def read(self) -> bytes:
        """The encoded image; raises DatasetError naming the file when it cannot be read."""
        try:
            with open(self.path, "rb") as f:
                if self.offset < 0:
                    return f.read()
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as err:
            raise DatasetError(f"{self.where}: cannot be read ({err})") from None
        if len(data) != self.size:
            raise DatasetError(f"{self.where}: the tar ends inside this member")
        return data


@dataclass
class ZeroShotSet:
    name: str
    images: list[ImageRef]
    labels: list[int]  # class index of each image
    classnames: list[str]
    templates: list[str]
    source: str = ""


@dataclass
class RetrievalSet:
    name: str
    images: list[ImageRef]
    captions: list[list[str]]  # the captions of each image (at least one)
    source: str = ""


@dataclass
class SugarCrepeSet:
    name: str
    images: list[ImageRef]  # the distinct images the items refer to
    items: dict[str, list[dict]] = field(default_factory=dict)  # category -> items, each with `image` (row of images)
    source: str = ""


def read_lines(path: Path, what: str) -> list[str]:
    """The non-empty stripped lines of a UTF-8 text file; DatasetError when missing, undecodable or empty."""
    if not path.is_file():
        raise DatasetError(f"{path}: {what} file is missing")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read {what} as UTF-8 text ({err})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise DatasetError(f"{path}: {what} file has no lines")
    return lines


def read_templates(path: Path) -> list[str]:
    """Prompt templates, each with a `{c}` placeholder for the class name."""
    templates = read_lines(path, "zero-shot templates")
    for number, template in enumerate(templates, 1):
        if "{c}" not in template:
            raise DatasetError(f"{path}: template {number} {template!r} has no {{c}} placeholder for the class name")
        try:
            template.format(c="x")
        except (IndexError, KeyError, ValueError) as err:
            raise DatasetError(f"{path}: template {number} {template!r} is not a format string with only {{c}} "
                               f"({err!r}); write literal braces as {{{{ and }}}}") from None
    return templates


def _wds_shards(root: Path, split: str) -> list[Path]:
    folder = root / split
    count_file = folder / "nshards.txt"
    if not folder.is_dir():
        raise DatasetError(f"{folder}: split folder is missing (CLIP_benchmark layout: root/{{split}}/nshards.txt, 0.tar ...)")
    text = count_file.read_text(encoding="utf-8").strip() if count_file.is_file() else None
    if text is None or not text.isdigit() or int(text) < 1:
        raise DatasetError(f"{count_file}: {'is missing' if text is None else f'holds {text!r}'}; it must hold the "
                           "number of shards (0.tar ... N-1.tar) as a positive whole number")
    shards = [folder / f"{i}.tar" for i in range(int(text))]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise DatasetError(f"{count_file} says {len(shards)} shards, but {folder} lacks {', '.join(missing[:5])}")
    return shards


def scan_wds(root: Path, split: str, label_ext: str) -> list[tuple[ImageRef, bytes, str]]:
    """(image, bytes of the KEY.label_ext member, where) of every sample of a CLIP_benchmark wds split,
    in shard and key order. Raises DatasetError naming the shard and key of a sample without image or label."""
    samples = []
    for shard in _wds_shards(root, split):
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if member.isfile():
                        key, ext = split_member_name(member.name)
                        groups.setdefault(key, {})[ext.lower()] = member
                labels = {key: tar.extractfile(group[label_ext]).read() for key, group in groups.items()
                          if label_ext in group}
        except (tarfile.TarError, OSError) as err:
            raise DatasetError(f"{shard}: cannot be read as a tar ({err})") from None
        for key, group in groups.items():
            image = next((group[ext] for ext in IMAGE_EXTENSIONS if ext in group), None)
            where = f"{shard}: sample {key!r}"
            if image is None:
                raise DatasetError(f"{where} has no image (.jpg/.png/.webp); it has {sorted(group)}")
            if key not in labels:
                raise DatasetError(f"{where} has no .{label_ext} member; it has {sorted(group)}")
            samples.append((ImageRef(shard, image.offset_data, image.size, image.name), labels[key], where))
    if not samples:
        raise DatasetError(f"{root / split}: its shards hold no samples")
    return samples


def read_wds_zeroshot(name: str, root: str | Path, split: str = "test") -> ZeroShotSet:
    """A CLIP_benchmark webdataset classification set (see the module docstring)."""
    root = Path(root)
    classnames = read_lines(root / CLASSNAMES_FILE, "class names")
    templates = read_templates(root / TEMPLATES_FILE)
    images, labels = [], []
    for image, label, where in scan_wds(root, split, "cls"):
        text = label.decode("utf-8", errors="replace").strip()
        if not text.isdigit() or int(text) >= len(classnames):
            raise DatasetError(f"{where}: label {text!r} is not a class index in [0, {len(classnames)}) "
                               f"({root / CLASSNAMES_FILE} has {len(classnames)} names)")
        images.append(image)
        labels.append(int(text))
    return ZeroShotSet(name, images, labels, classnames, templates, f"{root / split} (CLIP_benchmark wds)")


def read_image_folder_zeroshot(name: str, root: str | Path, classnames: str | Path | None = None,
                               templates: str | Path | None = None) -> ZeroShotSet:
    """One folder per class under `root`; `classnames` (default root/classnames.txt) maps folder names
    to class names (`folder<TAB>name` lines, or one name per line for the sorted folders)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder is missing")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DatasetError(f"{root}: holds no class folders (layout: root/<class folder>/<image>)")
    names_file = Path(classnames) if classnames else root / CLASSNAMES_FILE
    lines = read_lines(names_file, "class names")
    if all("\t" in line for line in lines):
        mapping = dict(line.split("\t", 1) for line in lines)
        unknown = sorted(set(folders) - set(mapping))
        if unknown:
            raise DatasetError(f"{names_file}: no class name for folder(s) {', '.join(unknown[:5])} of {root}")
        folders = [folder for folder in mapping if folder in set(folders)]
        names = [mapping[folder].strip() for folder in folders]
    elif len(lines) == len(folders):
        names = lines
    else:
        raise DatasetError(f"{names_file}: {len(lines)} class names for the {len(folders)} class folders of {root}; "
                           "give one name per folder (in sorted folder order) or `folder<TAB>name` lines")
    images, labels = [], []
    for label, folder in enumerate(folders):
        found = sorted(p for p in (root / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DatasetError(f"{root / folder}: class folder holds no images (.jpg/.png/.webp)")
        images += [ImageRef(p) for p in found]
        labels += [label] * len(found)
    templates = read_templates(Path(templates) if templates else root / TEMPLATES_FILE)
    return ZeroShotSet(name, images, labels, names, templates, f"{root} (image folder)")


def read_wds_retrieval(name: str, root: str | Path, split: str = "test") -> RetrievalSet:
    """A CLIP_benchmark webdataset retrieval set: KEY.txt holds the image's captions, one per line."""
    root = Path(root)
    kind = read_lines(root / DATASET_TYPE_FILE, "dataset type")[0].lower()
    if kind != "retrieval":
        raise DatasetError(f"{root / DATASET_TYPE_FILE}: says {kind!r}; a retrieval set says 'retrieval'")
    images, captions = [], []
    for image, text, where in scan_wds(root, split, "txt"):
        try:
            lines = [line.strip() for line in text.decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as err:
            raise DatasetError(f"{where}: captions are not UTF-8 ({err.reason} at byte {err.start})") from None
        if not lines:
            raise DatasetError(f"{where}: its .txt holds no caption")
        images.append(image)
        captions.append(lines)
    return RetrievalSet(name, images, captions, f"{root / split} (CLIP_benchmark wds)")


def read_karpathy(name: str, annotations: str | Path, images: str | Path, split: str = "test") -> RetrievalSet:
    """A Karpathy-split JSON (COCO, Flickr30k) over an image folder: the images of `split`, each with
    all its `sentences[].raw`. The image is images/filepath/filename when `filepath` is given, else
    images/filename."""
    annotations, root = Path(annotations), Path(images)
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{annotations}: cannot read as JSON ({err})") from None
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DatasetError(f"{annotations}: has no `images` list (Karpathy layout: images[].filename, split, sentences[].raw)")
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder is missing")
    refs, captions = [], []
    for number, entry in enumerate(entries):
        where = f"{annotations}: images[{number}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise DatasetError(f"{where} has no `filename` string")
        if entry.get("split") != split:
            continue
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise DatasetError(f"{where} ({entry['filename']}) has no `sentences` list")
        texts = [s.get("raw").strip() if isinstance(s, dict) and isinstance(s.get("raw"), str) else None for s in sentences]
        if any(not text for text in texts):
            raise DatasetError(f"{where} ({entry['filename']}): every sentence needs a non-empty `raw` string")
        path = root / entry.get("filepath", "") / entry["filename"]
        if not path.is_file():
            raise DatasetError(f"{where}: image {path} is missing")
        refs.append(ImageRef(path))
        captions.append(texts)
    if not refs:
        splits = sorted({str(e.get("split")) for e in entries if isinstance(e, dict)})
        raise DatasetError(f"{annotations}: no image has split {split!r} (splits there: {', '.join(splits) or 'none'})")
    return RetrievalSet(name, refs, captions, f"{annotations} over {root} (Karpathy JSON)")


def read_sugarcrepe_folder(name: str, annotations: str | Path, images: str | Path) -> SugarCrepeSet:
    """SugarCrepe's JSON files (one per category) over an image folder (COCO val2017 as downloaded)."""
    root = Path(images)
    try:
        categories = load_sugarcrepe(annotations)
    except SugarCrepeError as err:
        raise DatasetError(str(err)) from None
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder is missing")
    row: dict[Path, int] = {}
    items: dict[str, list[dict]] = {}
    for category, entries in categories.items():
        for item in entries:
            path = root / item["filename"]
            if path not in row:
                if not path.is_file():
                    raise DatasetError(f"{Path(annotations) / (category + '.json')}: item {item['id']!r}: image {path} "
                                       "is missing")
                row[path] = len(row)
            items.setdefault(category, []).append({**item, "image": row[path]})
    return SugarCrepeSet(name, [ImageRef(p) for p in row], items, f"{annotations} over {root} (SugarCrepe)")
