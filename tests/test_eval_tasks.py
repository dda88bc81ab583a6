"""`lift-fast eval` with tasks on a tiny trained run: the real clip-benchmark package, run on the same
run and the same webdataset sets, gives the same accuracy and recall@K; a suite from a tasks file;
bad data sets refused before model work; a flash-trained run's config evaluates on a CPU."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys

import pytest
import yaml

from lift_fast.cli import main
from lift_fast.config import load_config
from lift_fast.data.shards import iter_samples, list_shards
from lift_fast.data.synth import write_synthetic
from lift_fast.eval import run as eval_run
from lift_fast.eval.formats import DatasetError
from lift_fast.eval.tasks import parse_task
from lift_fast.integrations import clip_benchmark as integration
from lift_fast.train.loop import train

FAST = ["data.image_size=32", "model.depth=1", "train.steps=8", "train.batch_size=16", "train.warmup_steps=2",
        "train.log_every=4", "data.num_workers=0", "data.shuffle_window=4"]


@pytest.fixture(scope="module")
def tiny_run(synth_data, stores, tmp_path_factory):
    """An 8-step run of the FAST settings on the shared synthetic set; copy it before changing it."""
    run = tmp_path_factory.mktemp("eval_tasks") / "run"
    train(load_config(overrides=FAST), synth_data / "train", stores / "train", run, progress=False)
    return run


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A few dozen images: 48 in the zero-shot set (24 classes), 30 with 3 captions each for retrieval."""
    out = tmp_path_factory.mktemp("eval_sets") / "data"
    write_synthetic(out, num_train=1, num_eval=1, image_size=32, samples_per_shard=16, num_zeroshot=48,
                    num_retrieval=30, progress=False)
    return out


def lift_fast_eval(capsys, *argv) -> tuple[int, dict, str]:
    code = main(["-q", "eval", *map(str, argv), "data.num_workers=0"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else {}), err


def clip_benchmark_eval(monkeypatch, tmp_path, run, dataset, root, task, *extra) -> dict:
    """The real `clip_benchmark eval` (its own command line, through our entry point), fp32 (--no_amp)."""
    output = tmp_path / f"{task}.json"
    monkeypatch.setattr(sys, "argv", ["clip_benchmark"])
    code = integration.main(["eval", "--model_type", "lift_fast", "--pretrained", str(run), "--model", "lift",
                             "--dataset", dataset, "--dataset_root", str(root), "--task", task, "--output",
                             str(output), "--no_amp", "--num_workers", "0", "--batch_size", "13", "--quiet", *extra])
    assert code == 0
    return json.loads(output.read_text())


@pytest.mark.slow
def test_clip_benchmark_gives_the_same_accuracy_and_recall(tiny_run, sets, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, results, err = lift_fast_eval(capsys, "--run", run, "--task", f"kind=zeroshot,format=wds,path={sets / 'zeroshot'}",
                                        "--task", f"kind=retrieval,format=wds,path={sets / 'retrieval'}")
    assert code == 0, err
    zeroshot = clip_benchmark_eval(monkeypatch, tmp_path, run, "wds/zeroshot", sets / "zeroshot",
                                   "zeroshot_classification")["metrics"]
    retrieval = clip_benchmark_eval(monkeypatch, tmp_path, run, "wds/retrieval", sets / "retrieval",
                                    "zeroshot_retrieval", "--recall_k", "1", "5", "10")["metrics"]
    # within 0.5 points; the run is barely trained, so the figures are small but not all equal
    assert zeroshot["acc1"] == pytest.approx(results["zeroshot/zeroshot/top1"], abs=0.005)
    assert zeroshot["acc5"] == pytest.approx(results["zeroshot/zeroshot/top5"], abs=0.005)
    assert zeroshot["mean_per_class_recall"] == pytest.approx(results["zeroshot/zeroshot/mean_per_class_recall"], abs=0.005)
    for k in (1, 5, 10):
        assert retrieval[f"text_retrieval_recall@{k}"] == pytest.approx(results[f"retrieval/retrieval/i2t_r{k}"], abs=0.005)
        assert retrieval[f"image_retrieval_recall@{k}"] == pytest.approx(results[f"retrieval/retrieval/t2i_r{k}"], abs=0.005)
    assert len({results[f"retrieval/retrieval/i2t_r{k}"] for k in (1, 5, 10)}) > 1
    # and our own CLIP_benchmark-format file holds the same numbers under clip_benchmark's names
    ours = json.loads((run / "clip_benchmark" / "wds_zeroshot_zeroshot_classification.json").read_text())
    assert ours["task"] == "zeroshot_classification" and ours["dataset"] == "wds/zeroshot"
    assert ours["metrics"]["acc1"] == pytest.approx(zeroshot["acc1"], abs=0.005)


def test_clip_benchmark_text_side_is_the_store_rows(tiny_run, synth_data, stores):
    """encode_text gives what `lift-fast embed` stored for the same captions (fp16 rounding apart)."""
    import torch
    from PIL import Image

    from lift_fast.embed import load_store

    model, transform, tokenizer = integration.load_lift_fast("lift", str(tiny_run), device="cpu")
    keys, rows, _ = load_store(stores / "eval")
    samples = [s for shard in list_shards(synth_data / "eval") for s in iter_samples(shard)][:9]
    captions = [s.caption() for s in samples]
    text = model.encode_text(tokenizer(captions).to("cpu"))
    stored = torch.from_numpy(rows[[keys.index(s.key) for s in samples]].astype("float32"))
    assert text.shape == stored.shape
    assert (text - stored).abs().max() < 2e-3  # the store holds fp16
    image = transform(Image.open(io.BytesIO(samples[0].image_bytes())))
    assert tuple(image.shape) == (3, 32, 32)
    assert model.encode_image(image[None]).norm(dim=-1).item() == pytest.approx(1.0, abs=1e-5)


def test_suite_from_a_tasks_file_and_clip_benchmark_build(tiny_run, synth_data, stores, sets, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    images = tmp_path / "val2017"  # SugarCrepe over an image folder: the eval split's images as files
    images.mkdir()
    for shard in list_shards(synth_data / "eval"):
        for sample in iter_samples(shard):
            (images / f"{sample.key}.jpg").write_bytes(sample.files["jpg"])
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"tasks": [
        {"name": "coco_like", "kind": "retrieval", "format": "karpathy", "path": str(sets / "retrieval" / "karpathy.json"),
         "images": str(sets / "retrieval" / "images")},
        {"name": "long", "kind": "retrieval", "format": "karpathy", "path": str(sets / "retrieval" / "karpathy.json"),
         "images": str(sets / "retrieval" / "images"), "max_length": 12},
        {"name": "crepe", "kind": "sugarcrepe", "format": "image_folder", "path": str(synth_data / "eval" / "sugarcrepe"),
         "images": "val2017"},
    ]}))
    code, results, err = lift_fast_eval(capsys, "--run", run, "--data", synth_data / "eval", "--embeddings",
                                        stores / "eval", "--tasks", tasks)
    assert code == 0, err
    saved = json.loads((run / "eval.json").read_text())
    assert saved == results
    for name in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "chance_r1", "compositional/swap_obj"):
        assert name in results  # the shard eval's contract
    for k in (1, 5, 10):
        assert 0 <= results[f"retrieval/coco_like/i2t_r{k}"] <= 1 and f"retrieval/long/t2i_r{k}" in results
    assert results["retrieval/coco_like/num_captions"] == 90 and results["retrieval/coco_like/captions_truncated"] == 0
    assert results["retrieval/long/max_length"] == 12 and results["retrieval/long/captions_truncated"] >= 30
    # SugarCrepe over the folder scores the same images as SugarCrepe over the shards
    for category in ("replace_att", "swap_att", "replace_rel", "swap_obj"):
        assert results[f"compositional/crepe/{category}"] == pytest.approx(results[f"compositional/{category}"])
    files = sorted(p.name for p in (run / "clip_benchmark").iterdir())
    assert "coco_like_zeroshot_retrieval.json" in files and "sugar_crepe_swap_obj_image_caption_selection.json" in files
    table = tmp_path / "benchmark.csv"
    assert integration.main(["build", str(run / "clip_benchmark"), "--output", str(table)]) == 0
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == len(files)
    row = next(r for r in rows if r["dataset"] == "coco_like")
    assert float(row["text_retrieval_recall@1"]) == pytest.approx(results["retrieval/coco_like/i2t_r1"])
    assert row["model_fullname"] == f"vit_tiny_patch16 {run}"


def test_a_bad_data_set_is_refused_before_any_model_work(tiny_run, sets, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    broken = tmp_path / "zeroshot"
    shutil.copytree(sets / "zeroshot", broken)
    (broken / "zeroshot_classification_templates.txt").write_text("a photo\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data sets were checked")

    monkeypatch.setattr(eval_run, "load_run_model", no_model)
    code, _, err = lift_fast_eval(capsys, "--run", run, "--task", f"kind=retrieval,format=wds,path={sets / 'retrieval'}",
                                  "--task", f"kind=zeroshot,format=wds,path={broken},name=broken")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("lift-fast eval: error: task 'broken' (zeroshot, wds):")
    assert str(broken / "zeroshot_classification_templates.txt") in line and "no {c} placeholder" in line
    assert not (run / "eval.json").exists()
    code, _, err = lift_fast_eval(capsys, "--run", run)
    assert code == 2 and "nothing to evaluate" in err
    code, _, err = lift_fast_eval(capsys, "--run", run, "--task", "kind=zeroshot,format=tfds,path=x")
    assert code == 2 and "format='tfds' is not one of wds, image_folder" in err


def test_a_flash_trained_runs_config_evaluates_on_a_cpu(tiny_run, sets, tmp_path):
    """model.attention=flash (which needs CUDA and half precision) evaluates through SDPA on a CPU,
    with the same numbers as the same weights under model.attention=sdpa."""
    task = parse_task(f"kind=retrieval,format=wds,path={sets / 'retrieval'}")
    results = {}
    for attention in ("sdpa", "flash"):
        run = tmp_path / attention
        shutil.copytree(tiny_run, run)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["model"]["attention"] = attention
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        results[attention] = eval_run.evaluate(run, tasks=[task], overrides=["data.num_workers=0"], progress=False)
    assert results["flash"] == results["sdpa"]


def test_tasks_add_to_an_eval_json_of_the_same_checkpoint(tiny_run, synth_data, stores, sets, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    eval_run.evaluate(run, synth_data / "eval", stores / "eval", overrides=["data.num_workers=0"], progress=False)
    task = parse_task(f"kind=zeroshot,format=wds,path={sets / 'zeroshot'},name=zs")
    eval_run.evaluate(run, tasks=[task], overrides=["data.num_workers=0"], progress=False)
    saved = json.loads((run / "eval.json").read_text())
    assert "i2t_r1" in saved and "zeroshot/zs/top1" in saved and saved["zeroshot/zs/num_classes"] == 24
    with pytest.raises(DatasetError, match="no image has split 'val'"):
        eval_run.evaluate(run, tasks=[parse_task(f"kind=retrieval,format=karpathy,path={sets / 'retrieval' / 'karpathy.json'},"
                                                 f"images={sets / 'retrieval' / 'images'},split=val")], progress=False)


def test_clip_benchmark_takes_a_lift_export_and_checks_its_store(tiny_run, synth_data, stores, tmp_path):
    import torch

    from lift_fast.embed import StoreMismatchError
    from lift_fast.export import export_run

    export = tmp_path / "export"
    export_run(tiny_run, export, "lift", embeddings=stores / "train")
    from_run, transform, tokenizer = integration.load_lift_fast("lift", str(tiny_run), device="cpu")
    from_export, _, _ = integration.load_lift_fast("lift", str(export), device="cpu")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(from_export.encode_image(images), from_run.encode_image(images), atol=1e-6, rtol=0)
    tokens = tokenizer(["a red circle", "a blue star above a green square"])
    torch.testing.assert_close(from_export.encode_text(tokens), from_run.encode_text(tokens))
    record = json.loads((export / "lift_export.json").read_text())
    record["store_manifest"]["encoder"]["max_length"] = 16  # as if the store had been made with another cut
    (export / "lift_export.json").write_text(json.dumps(record))
    with pytest.raises(StoreMismatchError, match="max_length"):
        integration.load_lift_fast("lift", str(export), device="cpu")


def test_eval_precision_bf16_runs_the_tower_under_autocast(tiny_run):
    """eval.precision=bf16 (what auto is on CUDA) on the CPU: bf16 autocast, features close to fp32's."""
    import torch

    from lift_fast.config import ConfigError
    from lift_fast.eval.model import eval_autocast_dtype, load_run_model

    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = {}
    for precision in ("fp32", "bf16"):
        cfg = eval_run.eval_config(tiny_run, overrides=[f"eval.precision={precision}"])
        model = load_run_model(tiny_run, cfg, device=torch.device("cpu"))
        assert model.autocast_dtype == (torch.bfloat16 if precision == "bf16" else None)
        features[precision] = model.encode_batch(images)
    assert features["bf16"].dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(features["bf16"], features["fp32"], dim=-1)
    assert 0.99 < cosine.min() and not torch.equal(features["bf16"], features["fp32"])
    assert eval_autocast_dtype("auto", torch.device("cpu")) is None
    with pytest.raises(ConfigError, match="eval.precision='fp16' is not one of auto, bf16, fp32"):
        eval_autocast_dtype("fp16", torch.device("cpu"))
