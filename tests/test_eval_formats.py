"""Evaluation data sets in the field's layouts: the synthetic ones read back, and every malformed
input is an error naming the file and what is wrong."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
from PIL import Image

from lift_fast.config import ConfigError
from lift_fast.data.synth import ZEROSHOT_CLASSES, ZEROSHOT_TEMPLATES, write_synthetic
from lift_fast.eval.formats import (
    DatasetError,
    read_image_folder_zeroshot,
    read_karpathy,
    read_sugarcrepe_folder,
    read_wds_retrieval,
    read_wds_zeroshot,
)
from lift_fast.eval.tasks import load_task_file, parse_task

SMALL = {"num_train": 2, "num_eval": 6, "image_size": 16, "samples_per_shard": 10, "num_zeroshot": 30,
         "num_retrieval": 12, "progress": False}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    out = tmp_path_factory.mktemp("formats") / "data"
    write_synthetic(out, **SMALL)
    return out


def test_synthetic_zeroshot_set_in_clip_benchmark_layout(sets):
    root = sets / "zeroshot"
    assert (root / "test" / "nshards.txt").read_text().strip() == "3"  # 30 images, 10 per shard: 0.tar 1.tar 2.tar
    data = read_wds_zeroshot("z", root)
    assert data.classnames == ZEROSHOT_CLASSES and data.templates == list(ZEROSHOT_TEMPLATES)
    assert data.labels == [i % 24 for i in range(30)]
    image = Image.open(io.BytesIO(data.images[7].read()))
    assert image.size == (16, 16) and image.format == "JPEG"


def test_synthetic_retrieval_set_in_both_layouts_is_the_same(sets):
    root = sets / "retrieval"
    wds = read_wds_retrieval("r", root)
    karpathy = read_karpathy("k", root / "karpathy.json", root / "images")
    assert len(wds.images) == len(karpathy.images) == 12
    assert wds.captions == karpathy.captions and all(len(c) == 3 for c in wds.captions)
    assert [r.read() for r in wds.images] == [r.read() for r in karpathy.images]


def test_synthetic_sets_are_byte_identical_for_one_seed(sets, tmp_path):
    again = tmp_path / "again"
    write_synthetic(again, **SMALL)
    for name in ("zeroshot/test/0.tar", "retrieval/test/1.tar", "retrieval/karpathy.json",
                 "zeroshot/classnames.txt"):
        assert (again / name).read_bytes() == (sets / name).read_bytes(), name


def test_image_folder_layout_with_a_classnames_mapping(sets, tmp_path):
    wds = read_wds_zeroshot("z", sets / "zeroshot")
    root = tmp_path / "folders"
    for index, (ref, label) in enumerate(zip(wds.images, wds.labels)):
        folder = root / f"n{label:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index}.jpg").write_bytes(ref.read())
    (root / "classnames.txt").write_text("".join(f"n{i:04d}\t{name}\n" for i, name in enumerate(ZEROSHOT_CLASSES)))
    shutil.copy(sets / "zeroshot" / "zeroshot_classification_templates.txt", root)
    data = read_image_folder_zeroshot("f", root)
    assert data.classnames == ZEROSHOT_CLASSES
    assert sorted(zip(data.labels, (r.read() for r in data.images))) == sorted(
        zip(wds.labels, (r.read() for r in wds.images)))
    (root / "classnames.txt").write_text("only one\n")
    with pytest.raises(DatasetError, match=r"1 class names for the 24 class folders"):
        read_image_folder_zeroshot("f", root)


def copy_set(sets, name, tmp_path):
    root = tmp_path / name
    shutil.copytree(sets / name, root)
    return root


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "test" / "nshards.txt").unlink(), r"nshards.txt: is missing"),
    (lambda r: (r / "test" / "nshards.txt").write_text("4\n"), r"says 4 shards, but .* lacks 3.tar"),
    (lambda r: (r / "test" / "nshards.txt").write_text("three"), r"holds 'three'"),
    (lambda r: (r / "classnames.txt").unlink(), r"classnames.txt: class names file is missing"),
    (lambda r: (r / "zeroshot_classification_templates.txt").write_text("a photo\n"), r"template 1 'a photo' has no \{c\}"),
    (lambda r: (r / "test" / "1.tar").write_bytes(b"not a tar"), r"1.tar: cannot be read as a tar"),
])
def test_broken_zeroshot_sets_name_the_file(sets, tmp_path, damage, message):
    root = copy_set(sets, "zeroshot", tmp_path)
    damage(root)
    with pytest.raises(DatasetError, match=message):
        read_wds_zeroshot("z", root)


def rewrite_tar(path, change):
    """Rewrite a tar's members through change(name, data) -> (name, data) or None to drop it."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            kept = change(name, data)
            if kept is not None:
                info = tarfile.TarInfo(kept[0])
                info.size = len(kept[1])
                tar.addfile(info, io.BytesIO(kept[1]))


def test_bad_samples_name_shard_and_key(sets, tmp_path):
    root = copy_set(sets, "zeroshot", tmp_path)
    rewrite_tar(root / "test" / "0.tar", lambda n, d: None if n == "zeroshot-00000003.cls" else (n, d))
    with pytest.raises(DatasetError, match=r"0.tar: sample 'zeroshot-00000003' has no .cls member"):
        read_wds_zeroshot("z", root)
    root = copy_set(sets, "zeroshot", tmp_path / "labels")
    rewrite_tar(root / "test" / "0.tar", lambda n, d: (n, b"99") if n.endswith(".cls") else (n, d))
    with pytest.raises(DatasetError, match=r"label '99' is not a class index in \[0, 24\)"):
        read_wds_zeroshot("z", root)
    root = copy_set(sets, "retrieval", tmp_path)
    rewrite_tar(root / "test" / "1.tar", lambda n, d: (n, b"\n \n") if n == "retrieval-00000010.txt" else (n, d))
    with pytest.raises(DatasetError, match=r"1.tar: sample 'retrieval-00000010': its .txt holds no caption"):
        read_wds_retrieval("r", root)
    (root / "dataset_type.txt").write_text("classification\n")
    with pytest.raises(DatasetError, match=r"dataset_type.txt: says 'classification'"):
        read_wds_retrieval("r", root)


def test_broken_karpathy_files_name_entry_and_problem(sets, tmp_path):
    root = copy_set(sets, "retrieval", tmp_path)
    annotations = root / "karpathy.json"
    data = json.loads(annotations.read_text())
    (root / "images" / data["images"][4]["filename"]).unlink()
    with pytest.raises(DatasetError, match=r"images\[4\]: image .*retrieval-00000004.jpg is missing"):
        read_karpathy("k", annotations, root / "images")
    with pytest.raises(DatasetError, match=r"no image has split 'val' \(splits there: test\)"):
        read_karpathy("k", annotations, root / "images", split="val")
    data["images"][2]["sentences"] = [{"raw": ""}]
    annotations.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"images\[2\] .*every sentence needs a non-empty `raw` string"):
        read_karpathy("k", annotations, root / "images")
    annotations.write_text("{")
    with pytest.raises(DatasetError, match=r"karpathy.json: cannot read as JSON"):
        read_karpathy("k", annotations, root / "images")


def test_sugarcrepe_over_an_image_folder(sets, tmp_path):
    images = tmp_path / "val2017"
    images.mkdir()
    from lift_fast.data.shards import iter_samples, list_shards

    for shard in list_shards(sets / "eval"):
        for sample in iter_samples(shard):
            (images / f"{sample.key}.jpg").write_bytes(sample.files["jpg"])
    data = read_sugarcrepe_folder("s", sets / "eval" / "sugarcrepe", images)
    assert len(data.images) == 6 and set(data.items) <= {"replace_att", "swap_att", "replace_rel", "swap_obj"}
    assert all(data.images[item["image"]].path.stem == item["key"] for items in data.items.values() for item in items)
    (images / "eval-00000002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"item '\d+': image .*eval-00000002.jpg is missing"):
        read_sugarcrepe_folder("s", sets / "eval" / "sugarcrepe", images)


def test_task_specs_from_the_command_line_and_a_file(tmp_path):
    spec = parse_task("kind=retrieval,format=karpathy,path=/d/coco.json,images=/d/coco,max_length=256")
    assert (spec.name, spec.max_length, spec.split) == ("coco", 256, "test")
    with pytest.raises(ConfigError, match=r"format='karpathy' is not one of wds, image_folder for kind=zeroshot"):
        parse_task("kind=zeroshot,format=karpathy,path=x")
    with pytest.raises(ConfigError, match=r"format=karpathy needs images="):
        parse_task("kind=retrieval,format=karpathy,path=x.json")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) colour"):
        parse_task("kind=zeroshot,format=wds,path=x,colour=red")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("tasks:\n  - {kind: zeroshot, format: wds, path: zs}\n"
                     "  - {kind: retrieval, format: wds, path: ret, name: long, max_length: 300}\n")
    specs = load_task_file(tasks)
    assert [s.name for s in specs] == ["zs", "long"] and specs[0].path == str(tmp_path / "zs")
    assert specs[1].max_length == 300
    tasks.write_text("tasks:\n  - {kind: zeroshot, format: wds, path: a/zs}\n  - {kind: zeroshot, format: wds, path: b/zs}\n")
    with pytest.raises(ConfigError, match=r"task name\(s\) zs used twice"):
        load_task_file(tasks)
