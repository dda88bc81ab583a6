"""The long-caption retrieval readers (Urban-1k, DOCCI, DCI, ShareGPT4V-1k) on the miniatures that
`lift-fast synth` writes in each set's downloaded layout, and on malformed copies: a missing image,
an empty caption, a wrong field, each one error naming the file and entry."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from lift_fast.config import ConfigError
from lift_fast.data.synth import write_lift_sets
from lift_fast.eval import long_captions
from lift_fast.eval.formats import DatasetError
from lift_fast.eval.long_captions import read_dci, read_docci, read_sharegpt4v, read_urban1k
from lift_fast.eval.tasks import ENCODER_LIMIT, parse_task, read_tasks

COUNT = 10
SHAREGPT4V_JSON = "sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json"


@pytest.fixture(scope="module")
def lift_root(tmp_path_factory) -> Path:
    """The miniatures, COUNT scenes a set, 16-px images; copy a set before breaking it."""
    root = tmp_path_factory.mktemp("lift_sets") / "lift"
    write_lift_sets(root, COUNT, image_size=16, seed=5, progress=False)
    return root


@pytest.fixture
def copy_of(lift_root, tmp_path):
    def copy(folder: str) -> Path:
        shutil.copytree(lift_root / folder, tmp_path / folder)
        return tmp_path / folder
    return copy


def names(dataset) -> list[str]:
    return [ref.path.name for ref in dataset.images]


def test_urban1k_pairs_caption_i_with_image_i_in_numeric_order(lift_root):
    data = read_urban1k("urban1k", lift_root / "Urban1k")
    assert names(data) == [f"{i}.jpg" for i in range(1, COUNT + 1)]  # 10 after 9, not after 1
    for i, captions in enumerate(data.captions, 1):
        assert captions == [(lift_root / "Urban1k" / "caption" / f"{i}.txt").read_text().strip()]


def test_docci_reads_the_test_split_with_each_description(lift_root):
    data = read_docci("docci", lift_root / "docci")
    rows = [json.loads(line) for line in (lift_root / "docci" / "docci_descriptions.jsonlines").read_text().splitlines()]
    test = [row for row in rows if row["split"] == "test"]
    assert len(test) == COUNT and len(rows) == COUNT + 3
    assert names(data) == [row["image_file"] for row in test]
    assert data.captions == [[row["description"]] for row in test]
    train = read_docci("docci", lift_root / "docci" / "docci_descriptions.jsonlines", split="train")
    assert names(train) == ["train_00000.jpg", "train_00001.jpg", "train_00002.jpg"]


def test_dci_joins_short_and_extra_caption_over_every_split(lift_root):
    base = lift_root / "densely_captioned_images"
    data = read_dci("dci", lift_root)  # the folder above densely_captioned_images/ works too
    splits = json.loads((base / "splits.json").read_text())
    listed = [name for files in splits.values() for name in files]
    assert len(data.images) == COUNT == len(listed)
    for ref, captions, name in zip(data.images, data.captions, listed):
        entry = json.loads((base / "annotations" / name).read_text())
        assert ref.path == base / "photos" / entry["image"]
        assert captions == [f"{entry['short_caption']}\n{entry['extra_caption']}"]
    test = read_dci("dci", base, split="test")
    assert len(test.images) == len(splits["test"]) and test.captions == data.captions[-len(splits["test"]):]


def test_sharegpt4v_takes_the_first_rows_with_newlines_as_spaces(lift_root, monkeypatch):
    path = lift_root / SHAREGPT4V_JSON
    rows = json.loads(path.read_text())
    data = read_sharegpt4v("sharegpt4v", path)
    assert len(data.images) == COUNT  # fewer rows than ShareGPT4V-1k's 1,000: all of them
    assert data.captions[0] == [rows[0]["conversations"][1]["value"].replace("\n", " ")]
    assert "\n" in rows[0]["conversations"][1]["value"]
    assert [ref.path for ref in data.images] == [lift_root / "sharegpt4v" / row["image"] for row in rows]
    # read a few hundred characters at a time: rows that straddle a read are put together
    monkeypatch.setattr(long_captions, "_CHUNK", 97)
    first = read_sharegpt4v("sharegpt4v", path, limit=4)
    assert first.captions == data.captions[:4] and first.images == data.images[:4]


def test_the_long_captions_name_the_relation_only_after_token_77(lift_root, text_encoder):
    """What makes a 77-token cut lose information: the shapes and their relation come later."""
    tokenizer = text_encoder.tokenizer
    data = read_urban1k("urban1k", lift_root / "Urban1k")
    for (caption,) in data.captions:
        before = caption.split(" Looking closely, ")[0]
        assert len(tokenizer(before)["input_ids"]) > 77
        assert len(tokenizer(caption)["input_ids"]) < 256


# --- malformed copies -------------------------------------------------------------------------


def test_urban1k_refuses_a_missing_image_an_empty_caption_and_an_image_without_caption(copy_of):
    root = copy_of("Urban1k")
    (root / "image" / "3.jpg").unlink()
    with pytest.raises(DatasetError, match=re.escape(f"{root / 'caption' / '3.txt'}: its image")):
        read_urban1k("urban1k", root)
    (root / "caption" / "3.txt").unlink()
    (root / "caption" / "5.txt").write_text("  \n\n")
    with pytest.raises(DatasetError, match=re.escape(f"{root / 'caption' / '5.txt'}: caption file is empty")):
        read_urban1k("urban1k", root)
    (root / "caption" / "5.txt").unlink()
    with pytest.raises(DatasetError, match=re.escape(f"{root / 'image' / '5.jpg'}: image has no caption")):
        read_urban1k("urban1k", root)
    shutil.rmtree(root / "caption")
    with pytest.raises(DatasetError, match="caption folder is missing"):
        read_urban1k("urban1k", root)


def rewrite_jsonlines(path: Path, number: int, change) -> None:
    lines = path.read_text().splitlines()
    row = json.loads(lines[number])
    change(row)
    lines[number] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


def test_docci_refuses_a_missing_image_an_empty_description_and_a_wrong_field(copy_of):
    root = copy_of("docci")
    file = root / "docci_descriptions.jsonlines"
    (root / "images" / "test_00004.jpg").unlink()
    with pytest.raises(DatasetError, match=re.escape(f"{file}: line 8 (example_id 'test_00004'): image")):
        read_docci("docci", root)
    (root / "images" / "train_00001.jpg").unlink()  # a row of another split is not looked at
    shutil.copy(root / "images" / "test_00000.jpg", root / "images" / "test_00004.jpg")
    read_docci("docci", root)
    with pytest.raises(DatasetError, match="no row has split 'val' \\(splits there: test, train\\)"):
        read_docci("docci", root, split="val")
    rewrite_jsonlines(file, 5, lambda row: row.update(description=" "))
    with pytest.raises(DatasetError, match=re.escape("line 6 (example_id 'test_00002'): `description` is empty")):
        read_docci("docci", root)
    rewrite_jsonlines(file, 5, lambda row: row.update(caption=row.pop("description")))
    with pytest.raises(DatasetError, match="line 6 .* has no `description` field; it has .*'caption'"):
        read_docci("docci", root)


def test_dci_refuses_a_missing_photo_an_empty_caption_and_a_wrong_field(copy_of):
    base = copy_of("densely_captioned_images")
    annotation = base / "annotations" / "sa_100002.json"
    entry = json.loads(annotation.read_text())
    (base / "photos" / "sa_100002.jpg").unlink()
    with pytest.raises(DatasetError, match=re.escape(f"{annotation}: image {base / 'photos' / 'sa_100002.jpg'} is missing")):
        read_dci("dci", base)
    shutil.copy(base / "photos" / "sa_100001.jpg", base / "photos" / "sa_100002.jpg")
    annotation.write_text(json.dumps({**entry, "short_caption": ""}))
    with pytest.raises(DatasetError, match=re.escape(f"{annotation}: `short_caption` is empty")):
        read_dci("dci", base)
    annotation.write_text(json.dumps({**entry, "extra_caption": None}))
    with pytest.raises(DatasetError, match="`extra_caption` must be a string"):
        read_dci("dci", base)
    entry["caption"] = entry.pop("short_caption")
    annotation.write_text(json.dumps(entry))
    with pytest.raises(DatasetError, match=re.escape(f"{annotation}: has no `short_caption` field")):
        read_dci("dci", base)
    with pytest.raises(DatasetError, match="has no split 'val' \\(splits: train, valid, test; or split=all\\)"):
        read_dci("dci", base, split="val")


def test_sharegpt4v_refuses_a_missing_image_an_empty_caption_and_a_wrong_field(copy_of):
    root = copy_of("sharegpt4v")
    path = root / "share-captioner_coco_lcs_sam_1246k_1107.json"
    rows = json.loads(path.read_text())
    (root / rows[2]["image"]).unlink()
    with pytest.raises(DatasetError, match=re.escape(f"{path}: row 2: image {root / rows[2]['image']} is missing")):
        read_sharegpt4v("s", path)
    assert len(read_sharegpt4v("s", path, limit=2).images) == 2  # the missing one is past the limit
    rows[2]["image"] = rows[1]["image"]
    rows[1]["conversations"][1]["value"] = "\n"
    path.write_text(json.dumps(rows))
    with pytest.raises(DatasetError, match=re.escape("row 1: `conversations[1].value` is empty")):
        read_sharegpt4v("s", path)
    rows[1]["conversations"] = rows[1]["conversations"][:1]
    path.write_text(json.dumps(rows))
    with pytest.raises(DatasetError, match="row 1 .*needs a second turn with a `value`"):
        read_sharegpt4v("s", path)
    rows[1]["img"] = rows[1].pop("image")
    path.write_text(json.dumps(rows))
    with pytest.raises(DatasetError, match="row 1 needs `image` and `conversations`; it has"):
        read_sharegpt4v("s", path)
    path.write_text(json.dumps({"rows": rows}))
    with pytest.raises(DatasetError, match="must be a JSON array"):
        read_sharegpt4v("s", path)
    path.write_text(json.dumps(rows)[:-40])  # cut short: the last row does not parse
    with pytest.raises(DatasetError, match=f"row {len(rows) - 1} is not valid JSON"):
        read_sharegpt4v("s", path)


# --- as tasks -----------------------------------------------------------------------------------


def test_task_fields_of_the_long_formats():
    assert parse_task("kind=retrieval,format=dci,path=d").split == "all"
    assert parse_task("kind=retrieval,format=docci,path=d").split == "test"
    assert parse_task("kind=retrieval,format=urban1k,path=u,max_length=max").max_length == ENCODER_LIMIT
    assert parse_task("kind=retrieval,format=sharegpt4v,path=s.json,limit=5").limit == 5
    with pytest.raises(ConfigError, match="limit=5: .* for format=sharegpt4v only"):
        parse_task("kind=retrieval,format=docci,path=d,limit=5")
    with pytest.raises(ConfigError, match="format='longcap' is not one of karpathy, wds, urban1k, docci, dci, sharegpt4v"):
        parse_task("kind=retrieval,format=longcap,path=d")
    with pytest.raises(ConfigError, match="kind=sugarcrepe_pp needs images="):
        parse_task("kind=sugarcrepe_pp,format=image_folder,path=scpp/data")


def test_a_malformed_set_is_one_error_naming_the_task_file_and_entry(copy_of):
    root = copy_of("docci")
    rewrite_jsonlines(root / "docci_descriptions.jsonlines", 4, lambda row: row.pop("image_file"))
    specs = [parse_task(f"kind=retrieval,format=docci,path={root},name=docci_long,max_length=256")]
    with pytest.raises(DatasetError) as err:
        read_tasks(specs)
    message = str(err.value)
    assert message.startswith("task 'docci_long' (retrieval, docci): ")
    assert "docci_descriptions.jsonlines: line 5 (example_id 'test_00001') has no `image_file` field" in message
    assert "\n" not in message
