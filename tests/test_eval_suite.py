"""`lift-fast eval --run R --suite lift --root DIR`: the sets found in their downloaded layouts, the
absent ones skipped with a line each, long sets at 77 tokens and at eval.long_max_length side by
side, SugarCrepe++ ITT/TOT, one table; a malformed set stops it before the model loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lift_fast.cli import main
from lift_fast.config import load_config
from lift_fast.data.synth import write_lift_sets
from lift_fast.eval import run as eval_run
from lift_fast.eval.sugarcrepe_pp import itt_tot_accuracy, read_sugarcrepe_pp_folder
from lift_fast.eval.suite import LIFT_SETS, lift_suite
from lift_fast.eval.tasks import ENCODER_LIMIT
from lift_fast.train.loop import train

FAST = ["data.image_size=32", "model.depth=1", "train.steps=4", "train.batch_size=16", "train.warmup_steps=2",
        "train.log_every=2", "data.num_workers=0", "data.shuffle_window=4"]
COUNT = 6
LONG = ("urban1k", "docci", "dci", "sharegpt4v")


@pytest.fixture(scope="module")
def tiny_run(synth_data, stores, tmp_path_factory):
    run = tmp_path_factory.mktemp("suite") / "run"
    train(load_config(overrides=FAST), synth_data / "train", stores / "train", run, progress=False)
    return run


@pytest.fixture(scope="module")
def lift_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite_sets") / "lift"
    write_lift_sets(root, COUNT, image_size=32, seed=3, progress=False)
    return root


def eval_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["-q", "eval", *map(str, argv), "data.num_workers=0"])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_suite_finds_what_is_there_and_skips_the_rest(lift_root, tmp_path):
    tasks, skipped = lift_suite(lift_root, long_max_length=200)
    assert [t.name for t in tasks] == ["sugarcrepe", "sugarcrepe_pp"] + [n for s in LONG for n in (s, f"{s}_long")]
    assert {t.name: t.max_length for t in tasks if t.kind == "retrieval"} == {
        **{s: 77 for s in LONG}, **{f"{s}_long": 200 for s in LONG}}
    assert [line.split(" (")[0] for line in skipped] == ["skip imagenet", "skip coco", "skip flickr30k"]
    assert f"no {lift_root / 'wds_mscoco_captions/test/nshards.txt'} nor {lift_root / 'coco/dataset_coco.json'}" in skipped[1]
    assert all(t.max_length == ENCODER_LIMIT for t in lift_suite(lift_root)[0] if t.name.endswith("_long"))
    # the other layouts of a set: COCO's Karpathy JSON, ShareGPT4V under data/ (as Long-CLIP keeps it)
    other = tmp_path / "root"
    (other / "coco").mkdir(parents=True)
    (other / "coco" / "dataset_coco.json").write_text("{}")
    shutil.copytree(lift_root / "sharegpt4v", other / "sharegpt4v" / "data")
    found = {t.name: t for t in lift_suite(other)[0]}
    assert sorted(found) == ["coco", "sharegpt4v", "sharegpt4v_long"]
    assert (found["coco"].format, found["coco"].images) == ("karpathy", str(other / "coco" / "."))
    assert found["sharegpt4v"].images == str(other / "sharegpt4v" / "data")
    assert set(LIFT_SETS) == {"imagenet", "coco", "flickr30k", "sugarcrepe", "sugarcrepe_pp", *LONG}


def test_the_suite_runs_every_set_and_prints_one_table(tiny_run, lift_root, tmp_path, capsys, text_encoder):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, out, err = eval_cli(capsys, "--run", run, "--suite", "lift", "--root", lift_root, "eval.long_max_length=256")
    assert code == 0, err
    results = json.loads((run / "eval.json").read_text())
    for name in LONG:
        short, long = f"retrieval/{name}", f"retrieval/{name}_long"
        assert (results[f"{short}/max_length"], results[f"{long}/max_length"]) == (77, 256)
        # every miniature caption is longer than 77 tokens and shorter than 256
        assert (results[f"{short}/captions_truncated"], results[f"{long}/captions_truncated"]) == (COUNT, 0)
        assert results[f"{short}/num_images"] == results[f"{long}/num_captions"] == COUNT
        assert 0 <= results[f"{long}/i2t_r1"] <= 1 and results[f"{long}/chance_r1"] == pytest.approx(1 / COUNT)
    # TOT is the frozen encoder's alone: the same as computing it here, category by category
    data = read_sugarcrepe_pp_folder("scpp", lift_root / "scpp" / "data", lift_root / "coco" / "val2017")
    for category, items in data.items.items():
        texts = [torch.nn.functional.normalize(text_encoder.encode([item[f] for item in items]).float(), dim=-1)
                 for f in ("caption", "caption2", "negative_caption")]
        expected = itt_tot_accuracy(texts[0], *texts)["tot"]  # the image rows do not enter TOT
        assert results[f"compositional_pp/sugarcrepe_pp/{category}/tot"] == pytest.approx(expected)
        assert 0 <= results[f"compositional_pp/sugarcrepe_pp/{category}/itt"] <= 1
    assert "compositional/sugarcrepe/swap_obj" in results
    lines = out.splitlines()
    assert lines[0].startswith(f"lift suite: {run} (checkpoint step 4), sets under {lift_root}")
    assert lines[1].split() == ["set", "measure", "tokens", "figures"]
    rows = {tuple(line.split()[:3]) for line in lines[3:] if not line.startswith("skip ")}
    assert ("urban1k_long", "retrieval", "%") in rows and ("sugarcrepe_pp", "TOT", "%") in rows
    assert sum(line.startswith("skip ") for line in lines) == 3
    assert next(line for line in lines if line.startswith("docci_long")).split()[3] == "256"
    assert json.loads((run / "clip_benchmark" / "sugar_crepe_pp_swap_att_image_caption_selection.json").read_text())[
        "metrics"].keys() == {"itt", "tot"}


def test_max_length_max_is_the_encoders_position_limit(tiny_run, lift_root, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, out, err = eval_cli(capsys, "--run", run, "--task",
                              f"kind=retrieval,format=urban1k,path={lift_root / 'Urban1k'},max_length=max")
    assert code == 0, err
    assert json.loads(out)["retrieval/Urban1k/max_length"] == 512  # all-MiniLM-L6-v2's position embeddings


def test_a_malformed_set_stops_the_suite_before_the_model_loads(tiny_run, lift_root, tmp_path, capsys, monkeypatch):
    root = tmp_path / "lift"
    shutil.copytree(lift_root, root)
    (root / "densely_captioned_images" / "photos" / "sa_100003.jpg").unlink()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data sets were checked")

    monkeypatch.setattr(eval_run, "load_run_model", no_model)
    code, out, err = eval_cli(capsys, "--run", tiny_run, "--suite", "lift", "--root", root)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("lift-fast eval: error: task 'dci' (retrieval, dci): ")
    assert f"annotations/sa_100003.json: image {root / 'densely_captioned_images/photos/sa_100003.jpg'} is missing" in err
    code, out, err = eval_cli(capsys, "--run", tiny_run, "--suite", "lift", "--root", tmp_path / "empty")
    assert code == 2 and "no set of the suite is under" in err and "skip docci (DOCCI test): no" in err
    code, out, err = eval_cli(capsys, "--run", tiny_run, "--suite", "lift")
    assert code == 2 and "--suite and --root go together" in err


def test_the_table_has_a_row_per_task_and_the_skip_lines(tmp_path):
    from lift_fast.eval.suite import suite_table
    from lift_fast.eval.tasks import TaskSpec

    tasks = [TaskSpec("zeroshot", "wds", "wds_imagenet1k", name="imagenet"),
             TaskSpec("retrieval", "karpathy", "coco/dataset_coco.json", name="coco", images="coco")]
    results = {"zeroshot/imagenet/top1": 0.5, "zeroshot/imagenet/top5": 0.75, "zeroshot/imagenet/num_classes": 1000,
               "zeroshot/imagenet/max_length": 77,
               **{f"retrieval/coco/{k}": v for k, v in {"i2t_r1": 0.25, "i2t_r5": 0.5, "t2i_r1": 0.125, "t2i_r5": 0.375,
                                                        "chance_r1": 0.001, "captions_truncated": 3,
                                                        "num_captions": 25010, "max_length": 77}.items()}}
    table = suite_table(tasks, results, ["skip dci (DCI): no x"], "title").splitlines()
    assert table[0] == "title" and table[-1] == "skip dci (DCI): no x"
    assert table[3].split() == ["imagenet", "zero-shot", "%", "77", "top1", "50.0", "top5", "75.0", "(chance", "0.1)"]
    assert table[4].split()[:8] == ["coco", "retrieval", "%", "77", "i2t", "R@1", "25.0", "R@5"]
    assert table[4].endswith("(chance 0.10; 3 of 25010 cut)")
