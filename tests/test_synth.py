"""The synthetic compositional set: counts, determinism, captions that tell the truth, SugarCrepe files."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from shard_tools import snapshot

from lift_fast.data.shards import iter_samples, list_shards
from lift_fast.data.synth import COLORS, SHAPES, write_synthetic
from lift_fast.eval.sugarcrepe import load_sugarcrepe

SMALL = {"num_train": 24, "num_eval": 40, "image_size": 32, "samples_per_shard": 10, "num_zeroshot": 24,
         "num_retrieval": 10, "num_lift": 4, "progress": False}
# Written out here rather than taken from synth.py: image y grows downwards, so "above" is a smaller y.
TRUE_OF = {
    "to the left of": lambda a, b: a["x"] < b["x"],
    "to the right of": lambda a, b: a["x"] > b["x"],
    "above": lambda a, b: a["y"] < b["y"],
    "below": lambda a, b: a["y"] > b["y"],
}
INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
PHRASE = rf"(a|an) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
CAPTION = re.compile(rf"{PHRASE}(?: ({'|'.join(TRUE_OF)}) {PHRASE})?")


def samples_of(folder):
    return [sample for shard in list_shards(folder) for sample in iter_samples(shard)]


def phrase(obj: dict) -> str:
    return f"{'an' if obj['color'][0] in 'aeiou' else 'a'} {obj['color']} {obj['shape']}"


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "out"
    summary = write_synthetic(out, seed=0, **SMALL)
    return out, summary


def test_counts_and_shards(small_set):
    out, summary = small_set
    assert summary["train"] == 24 and summary["eval"] == 40
    assert [p.name for p in list_shards(out / "train")] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [p.name for p in list_shards(out / "eval")] == [f"{i:05d}.tar" for i in range(4)]
    for split, count in (("train", 24), ("eval", 40)):
        samples = samples_of(out / split)
        assert [s.key for s in samples] == [f"{split}-{i:08d}" for i in range(count)]
        for sample in samples:
            assert set(sample.files) == {"jpg", "txt", "json"}
            image = Image.open(io.BytesIO(sample.image_bytes()))
            assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"
    sugarcrepe = load_sugarcrepe(out / "eval" / "sugarcrepe")
    assert summary["negatives"] == {c: len(items) for c, items in sugarcrepe.items()}


def test_train_and_eval_differ(small_set):
    out, _ = small_set
    train = [s.files["jpg"] for s in samples_of(out / "train")]
    evals = [s.files["jpg"] for s in samples_of(out / "eval")]
    assert train[0] != evals[0]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    small = {**SMALL, "num_train": 6, "num_eval": 12, "samples_per_shard": 5}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_synthetic(tmp_path / name, seed=seed, **small)
    a, b, c = (snapshot(tmp_path / name) for name in "abc")
    assert sorted(a) == sorted(b)
    assert any(name.endswith(".tar") for name in a) and any(name.endswith(".json") for name in a)
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}
    assert a["train/00000.tar"][0] != c["train/00000.tar"][0]
    assert a["eval/00000.tar"][0] != c["eval/00000.tar"][0]
    differing_json = [k for k in a if k.endswith(".json") and k in c and a[k][0] != c[k][0]]
    assert differing_json


def test_captions_match_metadata_and_relations_hold(small_set):
    out, _ = small_set
    relations = set()
    for split in ("train", "eval"):
        for sample in samples_of(out / split):
            caption = sample.caption()
            meta = json.loads(sample.files["json"])
            assert meta["caption"] == caption
            match = CAPTION.fullmatch(caption)
            assert match, caption
            objects = meta["objects"]
            assert match.group(1) == ("an" if match.group(2)[0] in "aeiou" else "a")
            assert (match.group(2), match.group(3)) == (objects[0]["color"], objects[0]["shape"])
            image = np.asarray(Image.open(io.BytesIO(sample.image_bytes())).convert("RGB"), dtype=float)
            for obj in objects:
                # the json positions are where the picture shows that colour (nearest palette entry)
                pixel = image[min(31, int(obj["y"] * 32)), min(31, int(obj["x"] * 32))]
                nearest = min(COLORS, key=lambda c: float(((np.array(COLORS[c]) - pixel) ** 2).sum()))
                assert nearest == obj["color"], (sample.key, obj)
            if meta["relation"] is None:
                assert len(objects) == 1 and match.group(4) is None
                continue
            relations.add(meta["relation"])
            assert len(objects) == 2
            first, second = objects
            assert first["color"] != second["color"]
            assert match.group(4) == meta["relation"]
            assert match.group(5) == ("an" if match.group(6)[0] in "aeiou" else "a")
            assert (match.group(6), match.group(7)) == (second["color"], second["shape"])
            assert TRUE_OF[meta["relation"]](first, second), (sample.key, caption, objects)
            # one relation only: the objects are far apart along the relation's axis, close across it
            along = "x" if meta["relation"] in ("to the left of", "to the right of") else "y"
            across = "y" if along == "x" else "x"
            assert abs(first[along] - second[along]) > abs(first[across] - second[across])
    assert len(relations) >= 3  # the set uses several relations, not one


def test_sugarcrepe_files(small_set):
    out, _ = small_set
    captions = {s.key: s.caption() for s in samples_of(out / "eval")}
    metadata = {s.key: json.loads(s.files["json"]) for s in samples_of(out / "eval")}
    categories = load_sugarcrepe(out / "eval" / "sugarcrepe")
    assert sorted(categories) == ["replace_att", "replace_rel", "swap_att", "swap_obj"]
    for category, items in categories.items():
        assert items
        assert len({item["key"] for item in items}) == len(items)  # one negative per image and category
        for item in items:
            assert item["filename"] == f"{item['key']}.jpg"
            assert item["key"] in captions
            assert item["caption"] == captions[item["key"]]
            negative = item["negative_caption"]
            assert negative != item["caption"]
            assert CAPTION.fullmatch(negative), negative
            objects, relation = metadata[item["key"]]["objects"], metadata[item["key"]]["relation"]
            if relation is not None:  # not the same fact said the other way round either
                assert negative != f"{phrase(objects[1])} {INVERSE[relation]} {phrase(objects[0])}"
            if category == "replace_att":
                used = {o["color"] for o in objects}
                negative_colors = set(re.findall("|".join(COLORS), negative))
                assert negative_colors - used, (item, "replace_att must bring a colour not in the image")
            elif category == "replace_rel":
                assert relation not in negative
            elif category == "swap_obj":
                assert negative == f"{phrase(objects[1])} {relation} {phrase(objects[0])}"


def test_small_eval_set_writes_only_valid_category_files(tmp_path):
    """A category without items gets no file: an empty one would make the folder unreadable for eval."""
    for seed in range(40):
        out = tmp_path / f"s{seed}"
        write_synthetic(out, seed=seed, **{**SMALL, "num_train": 1, "num_eval": 1})
        (sample,) = samples_of(out / "eval")
        if json.loads(sample.files["json"])["relation"] is None:
            break
    else:
        pytest.fail("no seed in 0..39 gave a one-object eval scene")
    categories = load_sugarcrepe(out / "eval" / "sugarcrepe")
    assert list(categories) == ["replace_att"]
    assert sorted(p.name for p in (out / "eval" / "sugarcrepe").iterdir()) == ["replace_att.json"]


def test_refuses_folder_with_shards(small_set, tmp_path):
    out = tmp_path / "out"
    write_synthetic(out, seed=0, **{**SMALL, "num_train": 3, "num_eval": 3})
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="already holds shards") as err:
        write_synthetic(out, seed=1, **{**SMALL, "num_train": 3, "num_eval": 3})
    assert str(out / "train") in str(err.value)
    assert snapshot(out) == before


def test_refuses_when_only_eval_has_shards(tmp_path):
    out = tmp_path / "out"
    write_synthetic(out, seed=0, **{**SMALL, "num_train": 2, "num_eval": 2})
    for shard in (out / "train").glob("*.tar"):
        shard.unlink()
    before = snapshot(out)
    with pytest.raises(FileExistsError):
        write_synthetic(out, seed=0, **{**SMALL, "num_train": 2, "num_eval": 2})
    assert snapshot(out) == before


def test_interrupted_run_is_completed_and_keeps_finished_split(tmp_path):
    settings = {**SMALL, "num_train": 4, "num_eval": 4, "seed": 3}
    reference = tmp_path / "reference"
    write_synthetic(reference, **settings)
    out = tmp_path / "out"
    write_synthetic(out, **settings)
    # as if the run stopped while writing eval: only a partial folder is left of it
    shutil.rmtree(out / "eval")
    (out / ".eval.partial").mkdir()
    (out / ".eval.partial" / "00000.tar").write_bytes(b"half a shard")
    train_before = snapshot(out / "train")
    summary = write_synthetic(out, **settings)
    assert summary["reused"] == ["train", "zeroshot", "retrieval", "lift"]
    assert snapshot(out / "train") == train_before
    assert not (out / ".eval.partial").exists()
    for path in (reference / "eval").rglob("*"):
        if path.is_file():
            assert (out / "eval" / path.relative_to(reference / "eval")).read_bytes() == path.read_bytes()


def test_rerun_with_other_settings_names_them(tmp_path):
    out = tmp_path / "out"
    write_synthetic(out, **{**SMALL, "num_train": 2, "num_eval": 2})
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=r"image_size: .* there, 48 asked"):
        write_synthetic(out, **{**SMALL, "num_train": 2, "num_eval": 2, "image_size": 48})
    assert snapshot(out) == before


def test_splits_share_no_key(small_set):
    """A store of one split can never be joined by key to the other split's shards."""
    out, _ = small_set
    train, evals = ({s.key for s in samples_of(out / split)} for split in ("train", "eval"))
    assert train and evals and not train & evals
    for item in (i for items in load_sugarcrepe(out / "eval" / "sugarcrepe").values() for i in items):
        assert item["key"].startswith("eval-") and item["filename"] == f"{item['key']}.jpg"


@pytest.mark.parametrize("setting, value", [("num_train", 0), ("num_eval", 0), ("samples_per_shard", 0),
                                            ("image_size", 15)])
def test_bad_sizes_are_refused_naming_the_setting(tmp_path, setting, value):
    with pytest.raises(ValueError, match=f"{setting}={value}: must be at least"):
        write_synthetic(tmp_path / "out", **{**SMALL, setting: value})
    assert not (tmp_path / "out").exists()


def test_zeroshot_and_retrieval_sets(small_set):
    """The zero-shot images show their class; the retrieval captions are true and no two images share one."""
    from lift_fast.eval.formats import read_wds_retrieval, read_wds_zeroshot

    out, summary = small_set
    assert summary["zeroshot"] == 24 and summary["retrieval"] == 10
    zeroshot = read_wds_zeroshot("z", out / "zeroshot")
    for ref, label in zip(zeroshot.images, zeroshot.labels):
        color, shape = zeroshot.classnames[label].split(" ")
        pixels = np.asarray(Image.open(io.BytesIO(ref.read())).convert("RGB"), dtype=float).reshape(-1, 3)
        distance = np.abs(pixels - np.array(COLORS[color])).sum(axis=1)
        assert (distance < 60).sum() > 10, f"class {color} {shape}: too few pixels of its colour"
    assert {template.format(c="x") for template in zeroshot.templates} >= {"a x"}
    retrieval = read_wds_retrieval("r", out / "retrieval")
    firsts = [captions[0] for captions in retrieval.captions]
    assert len(set(firsts)) == len(firsts)
    for first, inverse, long in retrieval.captions:
        a1, c1, s1, relation, a2, c2, s2 = CAPTION.fullmatch(first).groups()
        assert inverse == f"{a2} {c2} {s2} {INVERSE[relation]} {a1} {c1} {s1}"
        assert long.endswith(first) and len(long) > len(first)


def test_retrieval_set_size_is_bounded_by_the_distinct_scenes(tmp_path):
    from lift_fast.data.synth import RETRIEVAL_SCENES

    with pytest.raises(ValueError, match=f"num_retrieval={RETRIEVAL_SCENES + 1}: must be at most {RETRIEVAL_SCENES}"):
        write_synthetic(tmp_path / "out", **{**SMALL, "num_retrieval": RETRIEVAL_SCENES + 1})
    assert not (tmp_path / "out").exists()


def test_a_folder_from_before_the_extra_sets_gets_them(tmp_path):
    out = tmp_path / "out"
    write_synthetic(out, **{**SMALL, "num_train": 2, "num_eval": 2})
    settings = json.loads((out / "synth.json").read_text())
    for name in ("zeroshot", "retrieval", "lift"):
        del settings[f"num_{name}"]
        shutil.rmtree(out / name)
    (out / "synth.json").write_text(json.dumps(settings))
    summary = write_synthetic(out, **{**SMALL, "num_train": 2, "num_eval": 2})
    assert summary["reused"] == ["train", "eval"] and (out / "zeroshot" / "test" / "0.tar").is_file()
    assert (out / "lift" / "Urban1k" / "caption" / "1.txt").is_file()
