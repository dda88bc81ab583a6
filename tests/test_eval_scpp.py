"""SugarCrepe++: ITT and TOT against hand-worked items, long-caption retrieval recall against a
hand-worked ranking, and the reader on the synthetic miniature and malformed copies of it."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

from lift_fast.data.synth import SCPP_CATEGORIES, write_lift_sets
from lift_fast.eval.formats import DatasetError
from lift_fast.eval.retrieval import multi_caption_retrieval
from lift_fast.eval.sugarcrepe_pp import itt_tot_accuracy, read_sugarcrepe_pp_folder


def unit(*angles_in_degrees: float) -> torch.Tensor:
    """Rows of 2-d unit vectors at the given angles: the cosine of two rows is cos(angle between)."""
    radians = torch.tensor(angles_in_degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def test_itt_and_tot_on_hand_worked_items():
    # angles: image, caption, caption2, negative. Item by item:
    #  0: caption 10 and caption2 20 degrees from the image, negative 90: ITT yes; TOT: p1-p2 10 < p-neg 70, 80: yes
    #  1: caption2 100 degrees away, negative 90: ITT no (caption2 farther than the negative);
    #     TOT: p1-p2 90, p1-neg 80: no
    #  2: negative at 5 degrees, positives at -30 and 30: ITT no; TOT: p1-p2 60, p2-neg 25: no
    #  3: positives at 40 and 45, negative at -50: ITT yes (40 < 50); TOT: p1-p2 5, p-neg 90, 95: yes
    #  4: positives at 120 and 130, negative at -120: the caption and the negative are both 120 degrees from
    #     the image, a tie, counted wrong: ITT no; TOT: p1-p2 10, p1-neg 120, p2-neg 110: yes
    image = unit(0, 0, 0, 0, 0)
    caption = unit(10, 0, -30, 40, 120)
    caption2 = unit(20, 100, 30, 45, 130)
    negative = unit(90, 90, 5, -50, -120)
    result = itt_tot_accuracy(image, caption, caption2, negative)
    assert result == {"itt": 2 / 5, "tot": 3 / 5}
    # caption2 counts in both: moved to 95 degrees, item 0 fails ITT (95 > 90) and TOT (p1-p2 85 > p1-neg 80)
    moved = caption2.clone()
    moved[0] = unit(95)[0]
    assert itt_tot_accuracy(image, caption, moved, negative) == {"itt": 1 / 5, "tot": 2 / 5}


def test_itt_and_tot_refuse_mismatched_shapes_and_nan():
    rows = unit(0, 10, 20)
    with pytest.raises(ValueError, match=r"share one shape \[N, D\], got \(3, 2\), \(3, 2\), \(2, 2\), \(3, 2\)"):
        itt_tot_accuracy(rows, rows, rows[:2], rows)
    bad = rows.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="negative_features .* NaN"):
        itt_tot_accuracy(rows, rows, rows, bad)


def test_one_caption_per_image_retrieval_against_a_hand_worked_ranking():
    """What a long-caption set scores: three images, one caption each, similarities chosen by hand.

        similarity   caption0  caption1  caption2
        image0          0.9       0.2       0.1     -> caption0 first: i2t rank 1
        image1          0.8       0.7       0.0     -> caption0 ahead of its own caption1: rank 2
        image2          0.3       0.6       0.5     -> caption1 ahead of caption2: rank 2
    text->image: each column's best is its own image (0.9, 0.7 over 0.6, 0.5 over 0.1): all at rank 1.
    """
    similarity = torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.7, 0.0], [0.3, 0.6, 0.5]], dtype=torch.float64)
    # similarities as dot products: image rows = the matrix, caption rows = the identity
    result = multi_caption_retrieval(similarity, torch.eye(3, dtype=torch.float64), [0, 1, 2], ks=(1, 2))
    assert result["i2t_r1"] == pytest.approx(1 / 3) and result["i2t_r2"] == 1.0
    assert result["t2i_r1"] == 1.0
    assert result["chance_r1"] == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def lift_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scpp") / "lift"
    write_lift_sets(root, 8, image_size=16, seed=2, progress=False)
    return root


def test_reader_takes_every_category_of_the_miniature(lift_root):
    data = read_sugarcrepe_pp_folder("scpp", lift_root / "scpp" / "data", lift_root / "coco" / "val2017")
    assert sorted(data.items) == sorted(SCPP_CATEGORIES)
    assert len(data.images) == 8  # every image is in several categories but read once
    for category, items in data.items.items():
        raw = json.loads((lift_root / "scpp" / "data" / f"{category}.json").read_text())
        assert [item["caption2"] for item in items] == [r["caption2"] for r in raw]
        for item, entry in zip(items, raw):
            assert data.images[item["image"]].path.name == entry["filename"]
            assert item["negative_caption"] != item["caption"] != item["caption2"]


def broken_copy(lift_root, tmp_path, change):
    folder = tmp_path / "data"
    shutil.copytree(lift_root / "scpp" / "data", folder)
    path = folder / "replace_rel.json"
    items = json.loads(path.read_text())
    path.write_text(json.dumps(change(items)))
    return folder, path


@pytest.mark.parametrize(("change", "message"), [
    (lambda items: [{**items[0], "caption2": "  "}, *items[1:]], "item '0' field 'caption2' is empty"),
    (lambda items: [{k: v for k, v in items[0].items() if k != "negative_caption"} | {"negative": "x"}, *items[1:]],
     "item '0' has no 'negative_caption' field; it has \\['caption', 'caption2', 'filename', 'id', 'negative'\\]"),
    (lambda items: [{**items[0], "caption": 3}, *items[1:]], "item '0' field 'caption' must be a string, got int"),
    (lambda items: {str(i): item for i, item in enumerate(items)}, "must be a non-empty JSON list"),
    (lambda items: [items[0], {**items[1], "id": items[0]["id"]}], "item id '0' is used twice"),
])
def test_reader_refuses_malformed_files(lift_root, tmp_path, change, message):
    folder, path = broken_copy(lift_root, tmp_path, change)
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ".*" + message):
        read_sugarcrepe_pp_folder("scpp", folder, lift_root / "coco" / "val2017")


def test_reader_refuses_a_missing_image(lift_root, tmp_path):
    images = tmp_path / "val2017"
    shutil.copytree(lift_root / "coco" / "val2017", images)
    (images / "000000000003.jpg").unlink()
    with pytest.raises(DatasetError, match=r"replace_att.json: item '2': image .*000000000003.jpg is missing"):
        read_sugarcrepe_pp_folder("scpp", lift_root / "scpp" / "data", images)
    with pytest.raises(DatasetError, match="holds no \\*.json category files"):
        read_sugarcrepe_pp_folder("scpp", images, images)
