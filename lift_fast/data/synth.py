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
    out/lift/                        miniatures of LIFT's evaluation sets in their downloaded layouts (num_lift
                                     two-object scenes each, their own images): Urban1k/, docci/,
                                     densely_captioned_images/, sharegpt4v/ (long captions: the colours in the
                                     first sentence, the shapes and their relation only after token ~80, so a
                                     77-token cut loses them), scpp/data/ (SugarCrepe++) and sugar-crepe/data/
                                     over coco/val2017/; `lift-fast eval --suite lift --root out/lift` runs them
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
           "num_retrieval": 1, "num_lift": 1}
EXTRA_SETS = ("zeroshot", "retrieval", "lift")  # written beside train/ and eval/; older synth.json files lack their counts


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


# Long captions: sentences that say nothing about which scene it is, between the first sentence (the
# two colours) and the last (the shapes and their relation), so that the last one starts after token
# 77 of the all-MiniLM tokenizer (checked in tests/test_eval_long_sets.py).
LONG_FILLER = (
    "Nothing else is drawn anywhere in the frame.", "There is no text, no shadow and no border in the picture.",
    "Both shapes are drawn flat, without any outline or texture.", "The two shapes do not touch or overlap.",
    "The edges of the shapes are smooth and sharp.", "The background fills the whole square image evenly.",
    "The colours are bright and fully saturated.", "Each shape is small compared to the size of the picture.",
    "The picture looks like a simple illustration from a children's book.",
    "The lighting is even, with no highlights or reflections.", "There is plenty of empty space around the shapes.",
    "The image is a small square rendering with a light, slightly tinted background.",
)
LONG_OPENERS = {  # each set's first sentence, in its own words
    "urban1k": "The picture shows two flat shapes on a plain light background, one {a} and one {b}.",
    "docci": "A plain light square background with two flat shapes on it, one of them {a} and the other {b}.",
    "dci": "Two flat shapes, one {a} and one {b}, on a light background.",
    "sharegpt4v": "The image presents two flat shapes set against a plain light background: one is {a}, the other {b}.",
}
SYNONYM = {"to the left of": "on the left side of", "to the right of": "on the right side of", "above": "over",
           "below": "under"}
SCPP_CATEGORIES = ("replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")


def distinct_scenes(rng: np.random.Generator, count: int) -> list[Scene]:
    """`count` two-object scenes, no two with the same caption (count <= RETRIEVAL_SCENES)."""
    scenes, seen = [], set()
    while len(scenes) < count:
        scene = sample_scene(rng, two_object_fraction=1.0)
        if scene.caption() not in seen:
            seen.add(scene.caption())
            scenes.append(scene)
    return scenes


def long_caption(scene: Scene, rng: np.random.Generator, style: str) -> tuple[str, str]:
    """(first sentence: the two colours, the rest: seven filler sentences, then the shapes and their
    relation both ways) of a two-object scene, in the words of `style` (a LONG_OPENERS key)."""
    first, second = scene.objects
    opening = LONG_OPENERS[style].format(a=first.color, b=second.color)
    filler = " ".join(str(sentence) for sentence in rng.choice(LONG_FILLER, size=7, replace=False))
    last = (f"Looking closely, {first.phrase()} is {scene.relation} {second.phrase()}, so {second.phrase()} is "
            f"{INVERSE[scene.relation]} {first.phrase()}.")
    return opening, f"{filler} {last}"


def scpp_item(scene: Scene, rng: np.random.Generator) -> dict[str, tuple[str, str]]:
    """SugarCrepe++'s (caption2, negative_caption) per category that applies to a two-object scene:
    caption2 says the same with other words for the relation; the negative changes one thing."""
    first, second = scene.objects
    caption2 = f"{first.phrase()} {SYNONYM[scene.relation]} {second.phrase()}"
    unused_colors = [c for c in COLORS if c not in (first.color, second.color)]
    unused_shapes = [s for s in SHAPES if s not in (first.shape, second.shape)]
    which = int(rng.integers(2))
    objects = [first, second]
    recolored, reshaped = list(objects), list(objects)
    recolored[which] = Shape(str(rng.choice(unused_colors)), objects[which].shape, 0, 0, 0)
    reshaped[which] = Shape(objects[which].color, str(rng.choice(unused_shapes)), 0, 0, 0)
    negatives = {
        "replace_att": Scene(recolored, scene.relation, scene.background).caption(),
        "replace_obj": Scene(reshaped, scene.relation, scene.background).caption(),
        "replace_rel": Scene(objects, str(rng.choice([r for r in RELATIONS if r != scene.relation])),
                             scene.background).caption(),
        "swap_att": Scene([Shape(second.color, first.shape, 0, 0, 0), Shape(first.color, second.shape, 0, 0, 0)],
                          scene.relation, scene.background).caption(),
        "swap_obj": Scene([second, first], scene.relation, scene.background).caption(),
    }
    # a swap of two equal shapes gives the caption back: no test at all
    return {category: (caption2, negative) for category, negative in negatives.items() if negative != scene.caption()}


def _images(folder: Path, names: list[str], scenes: list[Scene], image_size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, scene in zip(names, scenes):
        (folder / name).write_bytes(_jpeg(scene, image_size))


def _json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def write_lift_sets(folder: Path, count: int, *, image_size: int, seed: int, samples_per_shard: int = 0,
                    progress: bool = True) -> None:
    """Miniatures of Urban-1k, DOCCI, DCI, ShareGPT4V-1k, SugarCrepe++ and SugarCrepe in their
    downloaded layouts (see lift_fast.eval.long_captions and lift_fast.eval.suite), `count` two-object
    scenes each, drawn from their own random streams (seeded by seed and the set). samples_per_shard
    is not used (these layouts have no shards); it is taken so every set's writer is called alike."""
    sets = tqdm(["urban1k", "docci", "dci", "sharegpt4v", "scpp"], desc="synth lift sets", disable=not progress)
    for number, name in enumerate(sets):
        rng = np.random.default_rng([seed, 4 + number])
        scenes = distinct_scenes(rng, count + (3 if name == "docci" else 0))
        if name == "scpp":
            names = [f"{i:012d}.jpg" for i in range(1, count + 1)]
            _images(folder / "coco" / "val2017", names, scenes, image_size)
            items: dict[str, list[dict]] = {category: [] for category in SCPP_CATEGORIES}
            for image, scene in zip(names, scenes):
                for category, (caption2, negative) in scpp_item(scene, rng).items():
                    items[category].append({"id": len(items[category]), "filename": image, "caption": scene.caption(),
                                            "caption2": caption2, "negative_caption": negative})
            for category, entries in items.items():
                if entries:  # SugarCrepe++'s list, and SugarCrepe's {id: item} of the same pairs
                    _json(folder / "scpp" / "data" / f"{category}.json", entries)
                    _json(folder / "sugar-crepe" / "data" / f"{category}.json",
                          {str(e["id"]): {"filename": e["filename"], "caption": e["caption"],
                                          "negative_caption": e["negative_caption"]} for e in entries})
            continue
        captions = [long_caption(scene, rng, name) for scene in scenes]
        if name == "urban1k":
            _images(folder / "Urban1k" / "image", [f"{i}.jpg" for i in range(1, count + 1)], scenes, image_size)
            (folder / "Urban1k" / "caption").mkdir(parents=True, exist_ok=True)
            for i, (opening, rest) in enumerate(captions, 1):
                (folder / "Urban1k" / "caption" / f"{i}.txt").write_text(f"{opening} {rest}\n", encoding="utf-8")
        elif name == "docci":  # the first three scenes are training rows, which the test split leaves out
            ids = [f"train_{i:05d}" for i in range(3)] + [f"test_{i:05d}" for i in range(count)]
            _images(folder / "docci" / "images", [f"{example}.jpg" for example in ids], scenes, image_size)
            rows = [json.dumps({"example_id": example, "split": example.split("_")[0], "image_file": f"{example}.jpg",
                                "description": f"{opening} {rest}"}) for example, (opening, rest) in zip(ids, captions)]
            (folder / "docci" / "docci_descriptions.jsonlines").write_text("\n".join(rows) + "\n", encoding="utf-8")
        elif name == "dci":
            base = folder / "densely_captioned_images"
            names = [f"sa_{100000 + i}" for i in range(count)]
            _images(base / "photos", [f"{n}.jpg" for n in names], scenes, image_size)
            for n, (opening, rest) in zip(names, captions):
                _json(base / "annotations" / f"{n}.json", {"image": f"{n}.jpg", "short_caption": opening,
                                                           "extra_caption": rest, "mask_data": {}, "mask_keys": []})
            files = [f"{n}.json" for n in names]
            cut = (count * 6 // 10, count * 8 // 10)
            _json(base / "splits.json", {"train": files[:cut[0]], "valid": files[cut[0]:cut[1]], "test": files[cut[1]:]})
        else:  # ShareGPT4V: image paths relative to the root the JSON sits in; captions in paragraphs
            names = [f"coco/train2017/{i:012d}.jpg" for i in range(1, count + 1)]
            for n, scene in zip(names, scenes):
                _images((folder / "sharegpt4v" / n).parent, [Path(n).name], [scene], image_size)
            rows = [{"id": Path(n).stem, "image": n, "conversations": [
                {"from": "human", "value": "What do you see happening in this image?\n<image>"},
                {"from": "gpt", "value": f"{opening}\n\n{rest}"}]} for n, (opening, rest) in zip(names, captions)]
            _json(folder / "sharegpt4v" / "share-captioner_coco_lcs_sam_1246k_1107.json", rows)


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
                    num_lift: int = 100, progress: bool = True) -> dict:
    """Write the synthetic set (train and eval shards, SugarCrepe-style negatives, a zero-shot set of
    num_zeroshot images, a multi-caption retrieval set of num_retrieval, and miniatures of LIFT's
    evaluation sets with num_lift images each in lift/) under out_dir.

    Each split is written into a hidden `.SPLIT.partial` folder and renamed when complete, so an
    interrupted run leaves no half split behind; run again with the same settings and the
    complete splits are kept (`synth.json` records the settings).
    Returns {"out", "train", "eval", "zeroshot", "retrieval", "reused": [sets kept], "negatives": {category: n}}.
    Raises ValueError naming the setting when a count or size is below its MINIMUM, and
    FileExistsError if out_dir holds other shards or a set made with other settings (nothing is
    overwritten).
    """
    sizes = {"num_train": num_train, "num_eval": num_eval, "samples_per_shard": samples_per_shard,
             "image_size": image_size, "num_zeroshot": num_zeroshot, "num_retrieval": num_retrieval,
             "num_lift": num_lift}
    for name, value in sizes.items():
        if value < MINIMUM[name]:
            raise ValueError(f"{name}={value}: must be at least {MINIMUM[name]}")
    if num_lift > RETRIEVAL_SCENES:
        raise ValueError(f"num_lift={num_lift}: must be at most {RETRIEVAL_SCENES}, the distinct two-object captions")
    if num_retrieval > RETRIEVAL_SCENES:
        raise ValueError(f"num_retrieval={num_retrieval}: must be at most {RETRIEVAL_SCENES}, the distinct two-object "
                         "captions of the synthetic world (every retrieval image gets its own)")
    out_dir = Path(out_dir)
    settings = {"format": SETTINGS_FORMAT, "num_train": num_train, "num_eval": num_eval, "image_size": image_size,
                "seed": seed, "samples_per_shard": samples_per_shard, "num_zeroshot": num_zeroshot,
                "num_retrieval": num_retrieval, "num_lift": num_lift}
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
    for name, count, write in (("zeroshot", num_zeroshot, write_zeroshot), ("retrieval", num_retrieval, write_retrieval),
                               ("lift", num_lift, write_lift_sets)):
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
            "retrieval": num_retrieval, "lift": num_lift, "reused": reused, "negatives": counts}
