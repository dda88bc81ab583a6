"""A synthetic compositional image-caption set: one or two coloured shapes and their relation.

    out/train/00000.tar ...          KEY.jpg, KEY.txt ("a red circle to the left of a blue square"), KEY.json,
                                     keys train-00000000, train-00000001, ...
    out/eval/00000.tar ...           the same, from another random stream, keys eval-00000000, ...
    out/eval/sugarcrepe/<cat>.json   hard negatives in SugarCrepe's format, one file per category
                                     (a category with no items, as in a tiny set, gets none)
    out/zeroshot/                    zero-shot classification in CLIP_benchmark's webdataset layout:
                                     test/nshards.txt, test/0.tar ... (KEY.jpg + KEY.cls), classnames.txt
                                     (the 24 colour-shape pairs, "red circle" ...), zeroshot_classification_templates.txt
    out/retrieval/                   two-object scenes with three true captions each, twice: CLIP_benchmark's
                                     retrieval webdataset (test/*.tar with KEY.txt one caption per line,
                                     dataset_type.txt) and a Karpathy JSON (karpathy.json) over images/
    out/synth.json                   the settings it was written with

The categories follow SugarCrepe: `replace_att` (one colour replaced by one not in the image),
`swap_att` (the two colours swapped), `replace_rel` (a false relation), `swap_obj` (the two objects
swapped around the relation). Two-object scenes place the objects apart along one axis and close
along the other, so exactly one relation (and its inverse) is true. Everything is drawn from
numpy generators seeded by (seed, split), so the same seed gives byte-identical shards. Keys carry
the split, so the two splits share no key and a store of one can never be joined to the other.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from lift_fast.data.shards import ShardWriter

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
# relation -> (axis, sign): "A to the left of B" means A.x < B.x.
RELATIONS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1)}
INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
CATEGORIES = ("replace_att", "swap_att", "replace_rel", "swap_obj")
ZEROSHOT_CLASSES = [f"{color} {shape}" for color in COLORS for shape in SHAPES]
# colour pairs (the first in COLORS order is named first) x shape pairs x relations
RETRIEVAL_SCENES = len(COLORS) * (len(COLORS) - 1) // 2 * len(SHAPES) ** 2 * len(RELATIONS)
ZEROSHOT_TEMPLATES = ("a {c}", "a picture of a {c}", "a {c} on a plain background")
SETTINGS_FILE = "synth.json"
SETTINGS_FORMAT = "lift-fast-synth/2"  # 2: keys carry the split (train-00000000)
# The smallest value of each write_synthetic setting (checked there and by `lift-fast synth`); below
# 16 px the shapes are a few pixels wide and colours blur into each other in the JPEG.
MINIMUM = {"num_train": 1, "num_eval": 1, "samples_per_shard": 1, "image_size": 16, "num_zeroshot": 1,
           "num_retrieval": 1}
EXTRA_SETS = ("zeroshot", "retrieval")  # written beside train/ and eval/; older synth.json files lack their counts


@dataclass
class Shape:
    color: str
    shape: str
    x: float  # centre, as a fraction of the image side
    y: float
    size: float  # half-width, as a fraction of the image side

    def phrase(self) -> str:
        """'an orange star', 'a red circle'."""
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape}"


@dataclass
class Scene:
    """What one image shows, and the caption that says so."""

    objects: list[Shape]
    relation: str | None  # the relation of objects[0] to objects[1] used in the caption
    background: tuple[int, int, int]

    def caption(self) -> str:
        if self.relation is None:
            return self.objects[0].phrase()
        first, second = self.objects
        return f"{first.phrase()} {self.relation} {second.phrase()}"

    def recaption(self) -> str:
        """A longer caption of the same scene, as a recaptioning model writes (KEY.json's `re_caption`)."""
        count = "one shape" if self.relation is None else "two shapes"
        return f"a picture of {count} on a plain background: {self.caption()}"

    def metadata(self) -> dict:
        return {
            "caption": self.caption(),
            "re_caption": self.recaption(),
            "relation": self.relation,
            "objects": [vars(o) for o in self.objects],
        }


def sample_scene(rng: np.random.Generator, two_object_fraction: float = 0.85) -> Scene:
    """Draw a random scene: one shape, or two shapes with distinct colours in one relation."""
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    colors = list(COLORS)
    if rng.random() >= two_object_fraction:
        size = rng.uniform(0.14, 0.22)
        x, y = rng.uniform(0.25, 0.75, size=2)
        return Scene([Shape(str(rng.choice(colors)), str(rng.choice(SHAPES)), x, y, size)], None, background)
    first_color, second_color = rng.choice(colors, size=2, replace=False)
    relation = str(rng.choice(list(RELATIONS)))
    axis, sign = RELATIONS[relation]
    sizes = rng.uniform(0.11, 0.16, size=2)
    # Along the relation's axis the centres are at least ~0.42 apart; across it they stay close.
    along = np.sort(rng.uniform(0.16, 0.84, size=2))
    while along[1] - along[0] < 0.42:
        along = np.sort(rng.uniform(0.16, 0.84, size=2))
    if sign > 0:
        along = along[::-1]
    across = rng.uniform(0.3, 0.7) + rng.uniform(-0.06, 0.06, size=2)
    centres = [(along[i], across[i]) if axis == 0 else (across[i], along[i]) for i in range(2)]
    objects = [
        Shape(str(c), str(rng.choice(SHAPES)), float(x), float(y), float(s))
        for c, (x, y), s in zip((first_color, second_color), centres, sizes)
    ]
    # One caption per image: the object whose colour comes first in COLORS is named first. Otherwise
    # "A left of B" and "B right of A" would both be targets for the same picture, and the tower
    # could only learn their average.
    if list(COLORS).index(objects[0].color) > list(COLORS).index(objects[1].color):
        objects, relation = objects[::-1], INVERSE[relation]
    return Scene(objects, relation, background)


def render(scene: Scene, image_size: int) -> Image.Image:
    """Draw the scene at image_size x image_size (supersampled 4x, then downscaled for smooth edges)."""
    scale = 4
    side = image_size * scale
    image = Image.new("RGB", (side, side), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.x * side, obj.y * side, obj.size * side
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            h = r * 0.85
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        else:  # star: five points, inner radius 0.45 r
            angles = np.pi / 2 + np.arange(10) * np.pi / 5
            radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
            draw.polygon([(cx + q * np.cos(a), cy - q * np.sin(a)) for q, a in zip(radii, angles)], fill=fill)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def hard_negatives(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    """One false caption per category that applies to the scene (single shapes get replace_att only)."""
    out = {}
    first = scene.objects[0]
    unused = [c for c in COLORS if c not in {o.color for o in scene.objects}]
    replaced = Shape(str(rng.choice(unused)), first.shape, first.x, first.y, first.size)
    if scene.relation is None:
        out["replace_att"] = Scene([replaced], None, scene.background).caption()
        return out
    second = scene.objects[1]
    which = int(rng.integers(2))
    objs = [first, second]
    objs[which] = Shape(str(rng.choice(unused)), objs[which].shape, 0, 0, 0)
    out["replace_att"] = Scene(objs, scene.relation, scene.background).caption()
    swapped_colors = [Shape(second.color, first.shape, 0, 0, 0), Shape(first.color, second.shape, 0, 0, 0)]
    out["swap_att"] = Scene(swapped_colors, scene.relation, scene.background).caption()
    false_relations = [r for r in RELATIONS if r != scene.relation]
    out["replace_rel"] = Scene([first, second], str(rng.choice(false_relations)), scene.background).caption()
    out["swap_obj"] = Scene([second, first], scene.relation, scene.background).caption()
    # When both colours and shapes differ, each negative is a different sentence from the caption;
    # a negative equal to the caption (same shape twice under swap_att) would be no test at all.
    return {k: v for k, v in out.items() if v != scene.caption()}


def write_split(folder: Path, split: str, count: int, *, image_size: int, seed: int,
                samples_per_shard: int, progress: bool = True) -> dict[str, list[dict]]:
    """Write one split's shards into `folder`; return its hard negatives by category."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    negatives: dict[str, list[dict]] = {c: [] for c in CATEGORIES}
    with ShardWriter(folder, samples_per_shard) as writer:
        for index in tqdm(range(count), desc=f"synth {split}", unit="img", disable=not progress):
            key = f"{split}-{index:08d}"
            scene = sample_scene(rng)
            buffer = io.BytesIO()
            render(scene, image_size).save(buffer, format="JPEG", quality=95)
            writer.write(key, {"jpg": buffer.getvalue(), "txt": scene.caption(), "json": json.dumps(scene.metadata())})
            for category, negative in hard_negatives(scene, rng).items():
                negatives[category].append({"filename": f"{key}.jpg", "caption": scene.caption(), "negative_caption": negative})
    return negatives


def write_negatives(folder: Path, negatives: dict[str, list[dict]]) -> None:
    """One SugarCrepe-format file per category that has items (readers refuse empty ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    for category, items in negatives.items():
        if items:
            payload = {str(i): item for i, item in enumerate(items)}
            (folder / f"{category}.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")


def _jpeg(scene: Scene, image_size: int) -> bytes:
    buffer = io.BytesIO()
    render(scene, image_size).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _wds_writer(folder: Path, samples_per_shard: int):
    """CLIP_benchmark's shard names (0.tar, 1.tar, ...), member times fixed for byte-identical output."""
    import webdataset as wds

    (folder / "test").mkdir(parents=True, exist_ok=True)
    return wds.ShardWriter(str(folder / "test" / "%d.tar"), maxcount=samples_per_shard, verbose=0, mtime=0)


def _finish_wds(folder: Path) -> None:
    count = len(list((folder / "test").glob("*.tar")))
    (folder / "test" / "nshards.txt").write_text(f"{count}\n", encoding="utf-8")


def write_zeroshot(folder: Path, count: int, *, image_size: int, seed: int, samples_per_shard: int,
                   progress: bool = True) -> None:
    """One shape per image, its class one of ZEROSHOT_CLASSES in turn, in CLIP_benchmark's wds layout."""
    rng = np.random.default_rng([seed, 2])
    with _wds_writer(folder, samples_per_shard) as writer:
        for index in tqdm(range(count), desc="synth zeroshot", unit="img", disable=not progress):
            label = index % len(ZEROSHOT_CLASSES)
            color, shape = ZEROSHOT_CLASSES[label].split(" ")
            background = tuple(int(v) for v in rng.integers(200, 256, size=3))
            x, y = rng.uniform(0.25, 0.75, size=2)
            scene = Scene([Shape(color, shape, float(x), float(y), float(rng.uniform(0.14, 0.22)))], None, background)
            writer.write({"__key__": f"zeroshot-{index:08d}", "jpg": _jpeg(scene, image_size), "cls": str(label)})
    _finish_wds(folder)
    (folder / "classnames.txt").write_text("\n".join(ZEROSHOT_CLASSES) + "\n", encoding="utf-8")
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n",
                                                                  encoding="utf-8")


def retrieval_captions(scene: Scene) -> list[str]:
    """Three true captions of a two-object scene: as trained, the inverse relation, and a longer one."""
    first, second = scene.objects
    inverse = f"{second.phrase()} {INVERSE[scene.relation]} {first.phrase()}"
    long = (f"a picture of two shapes on a plain light background: {first.phrase()} and {second.phrase()}, "
            f"where {scene.caption()}")
    return [scene.caption(), inverse, long]


def write_retrieval(folder: Path, count: int, *, image_size: int, seed: int, samples_per_shard: int,
                    progress: bool = True) -> None:
    """Two-object scenes with three captions each, as a CLIP_benchmark retrieval wds and as a Karpathy
    JSON over an image folder (the same images); no two images share a caption. Raises ValueError
    for more than RETRIEVAL_SCENES images."""
    if count > RETRIEVAL_SCENES:
        raise ValueError(f"num_retrieval={count}: the synthetic world has {RETRIEVAL_SCENES} distinct two-object "
                         "captions, and every retrieval image gets its own")
    rng = np.random.default_rng([seed, 3])
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries, seen = [], set()
    with _wds_writer(folder, samples_per_shard) as writer:
        for index in tqdm(range(count), desc="synth retrieval", unit="img", disable=not progress):
            key = f"retrieval-{index:08d}"
            scene = sample_scene(rng, two_object_fraction=1.0)
            while scene.caption() in seen:  # a caption shared by two images would tie, which recall@K reads either way
                scene = sample_scene(rng, two_object_fraction=1.0)
            seen.add(scene.caption())
            image, captions = _jpeg(scene, image_size), retrieval_captions(scene)
            writer.write({"__key__": key, "jpg": image, "txt": "\n".join(captions)})
            (folder / "images" / f"{key}.jpg").write_bytes(image)
            entries.append({"filename": f"{key}.jpg", "split": "test", "imgid": index,
                            "sentences": [{"raw": caption} for caption in captions]})
    _finish_wds(folder)
    (folder / "dataset_type.txt").write_text("retrieval\n", encoding="utf-8")
    (folder / "karpathy.json").write_text(json.dumps({"images": entries, "dataset": "lift-fast-synth"}, indent=1),
                                          encoding="utf-8")


def _check_out_folder(out_dir: Path, settings: dict) -> None:
    """Refuse a folder holding other data, or a synthetic set written with other settings."""
    recorded = out_dir / SETTINGS_FILE
    if recorded.is_file():
        found = json.loads(recorded.read_text(encoding="utf-8"))
        differ = [f"{k}: {found.get(k)!r} there, {v!r} asked" for k, v in settings.items()
                  if found.get(k) != v and not (k.removeprefix("num_") in EXTRA_SETS and k not in found)]
        if differ:
            raise FileExistsError(f"{out_dir / 'train'} already holds shards of a synthetic set written with other "
                                  f"settings ({'; '.join(differ)}); choose another --out folder")
    for split in ("train", "eval"):
        folder = out_dir / split
        if not folder.exists():
            continue
        if not recorded.is_file() and any(folder.glob("*.tar")):
            raise FileExistsError(f"{folder} already holds shards; choose an empty --out folder")
        if not any(folder.glob("*.tar")):
            raise FileExistsError(f"{folder} exists but holds no shards; remove it to write the split again")


def write_synthetic(out_dir: str | Path, *, num_train: int = 20000, num_eval: int = 1000, image_size: int = 64,
                    seed: int = 0, samples_per_shard: int = 2000, num_zeroshot: int = 480, num_retrieval: int = 200,
                    progress: bool = True) -> dict:
    """Write the synthetic set (train and eval shards, SugarCrepe-style negatives, a zero-shot set of
    num_zeroshot images and a multi-caption retrieval set of num_retrieval) under out_dir.

    Each split is written into a hidden `.SPLIT.partial` folder and renamed when complete, so an
    interrupted run leaves no half split behind; run again with the same settings and the
    complete splits are kept (`synth.json` records the settings).
    Returns {"out", "train", "eval", "zeroshot", "retrieval", "reused": [sets kept], "negatives": {category: n}}.
    Raises ValueError naming the setting when a count or size is below its MINIMUM, and
    FileExistsError if out_dir holds other shards or a set made with other settings (nothing is
    overwritten).
    """
    sizes = {"num_train": num_train, "num_eval": num_eval, "samples_per_shard": samples_per_shard,
             "image_size": image_size, "num_zeroshot": num_zeroshot, "num_retrieval": num_retrieval}
    for name, value in sizes.items():
        if value < MINIMUM[name]:
            raise ValueError(f"{name}={value}: must be at least {MINIMUM[name]}")
    if num_retrieval > RETRIEVAL_SCENES:
        raise ValueError(f"num_retrieval={num_retrieval}: must be at most {RETRIEVAL_SCENES}, the distinct two-object "
                         "captions of the synthetic world (every retrieval image gets its own)")
    out_dir = Path(out_dir)
    settings = {"format": SETTINGS_FORMAT, "num_train": num_train, "num_eval": num_eval, "image_size": image_size,
                "seed": seed, "samples_per_shard": samples_per_shard, "num_zeroshot": num_zeroshot,
                "num_retrieval": num_retrieval}
    _check_out_folder(out_dir, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    reused = []
    for split, count in (("train", num_train), ("eval", num_eval)):
        final = out_dir / split
        if final.is_dir():  # appears only by the rename below, so it is complete
            reused.append(split)
            continue
        partial = out_dir / f".{split}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        negatives = write_split(partial, split, count, image_size=image_size, seed=seed,
                                samples_per_shard=samples_per_shard, progress=progress)
        if split == "eval":
            write_negatives(partial / "sugarcrepe", negatives)
        partial.rename(final)
    for name, count, write in (("zeroshot", num_zeroshot, write_zeroshot), ("retrieval", num_retrieval, write_retrieval)):
        final = out_dir / name
        if final.is_dir():
            reused.append(name)
            continue
        partial = out_dir / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        write(partial, count, image_size=image_size, seed=seed, samples_per_shard=samples_per_shard, progress=progress)
        partial.rename(final)
    counts = {path.stem: len(json.loads(path.read_text(encoding="utf-8")))
              for path in sorted((out_dir / "eval" / "sugarcrepe").glob("*.json"))}
    return {"out": str(out_dir), "train": num_train, "eval": num_eval, "zeroshot": num_zeroshot,
            "retrieval": num_retrieval, "reused": reused, "negatives": counts}
