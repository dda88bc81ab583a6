"""The `lift-fast` command end to end on a tiny set, and its one-line errors (exit code 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from shard_tools import snapshot, write_members

from lift_fast.cli import main

FAST = ["data.image_size=32", "model.depth=1", "train.steps=8", "train.batch_size=16", "train.warmup_steps=2",
        "train.log_every=2", "data.num_workers=0", "data.shuffle_buffer=32"]
CATEGORIES = ("replace_att", "swap_att", "replace_rel", "swap_obj")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower()]


def test_synth_embed_train_eval(tmp_path, capsys):
    data, stores, run = tmp_path / "data", tmp_path / "stores", tmp_path / "run"
    code, out, _ = run_cli(capsys, "synth", "--out", data, "--num-train", 48, "--num-eval", 24, "--image-size", 32,
                           "--samples-per-shard", 16)
    assert code == 0 and json.loads(out)["train"] == 48
    for split in ("train", "eval"):
        code, out, _ = run_cli(capsys, "embed", "--data", data / split, "--out", stores / split)
        assert code == 0
        assert json.loads(out)["rows"] == {"train": 48, "eval": 24}[split]
    code, out, _ = run_cli(capsys, "train", "--data", data / "train", "--embeddings", stores / "train",
                           "--run", run, *FAST)
    assert code == 0 and json.loads(out)["step"] == 8
    assert (run / "checkpoints" / "step_000008" / "model.safetensors").is_file()
    code, out, _ = run_cli(capsys, "eval", "--run", run, "--data", data / "eval", "--embeddings", stores / "eval")
    assert code == 0
    results = json.loads((run / "eval.json").read_text())
    assert results == json.loads(out)
    for name in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "chance_r1"):
        assert 0 <= results[name] <= 1, name
    assert results["i2t_r1"] <= results["i2t_r5"] and results["t2i_r1"] <= results["t2i_r5"]
    for category in CATEGORIES:
        assert 0 <= results[f"compositional/{category}"] <= 1
    assert all(isinstance(v, (int, float)) for v in results.values())

    # --resume auto with more steps continues the same run
    code, out, _ = run_cli(capsys, "train", "--data", data / "train", "--embeddings", stores / "train",
                           "--run", run, "--resume", "auto", *FAST, "train.steps=10")
    assert code == 0 and json.loads(out)["step"] == 10


def test_config_file_and_overrides(synth_data, stores, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  steps: 50\n  lr: 2e-3\nmodel:\n  depth: 1\n")
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", synth_data / "train", "--embeddings", stores / "train",
                           "--run", run, "--config", config, *FAST, "train.steps=3")
    assert code == 0, err
    saved = (run / "config.yaml").read_text()
    assert "steps: 3" in saved and "lr: 0.002" in saved


def test_missing_shard_folder(stores, tmp_path, capsys):
    missing = tmp_path / "no_such_data"
    code, _, err = run_cli(capsys, "embed", "--data", missing, "--out", tmp_path / "store")
    assert code == 2
    assert err.strip().splitlines() == [f"lift-fast embed: error: shard folder {missing} does not exist"]
    assert not (tmp_path / "store").exists()
    code, _, err = run_cli(capsys, "train", "--data", missing, "--embeddings", stores / "train",
                           "--run", tmp_path / "run", *FAST)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("lift-fast train: error:") and str(missing) in line


def test_missing_shard_folder_in_a_subprocess(tmp_path):
    """The installed entry point: exit code 2 and nothing on stderr but the one error line."""
    missing = tmp_path / "no_such_data"
    proc = subprocess.run([sys.executable, "-m", "lift_fast", "embed", "--data", str(missing), "--out",
                           str(tmp_path / "store")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"lift-fast embed: error: shard folder {missing} does not exist"]
    assert proc.stdout == ""


@pytest.mark.parametrize("override, named", [("train.bogus=1", "train.bogus"), ("trian.steps=3", "trian.steps"),
                                             ("train.steps=many", "train.steps"), ("train.steps", "train.steps")])
def test_bad_config_key(synth_data, stores, tmp_path, capsys, override, named):
    code, _, err = run_cli(capsys, "train", "--data", synth_data / "train", "--embeddings", stores / "train",
                           "--run", tmp_path / "run", override)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("lift-fast train: error:") and named in line
    assert not (tmp_path / "run").exists()


def test_missing_config_file(synth_data, stores, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", synth_data / "train", "--embeddings", stores / "train",
                           "--run", tmp_path / "run", "--config", tmp_path / "nope.yaml")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert str(tmp_path / "nope.yaml") in line


def test_embed_into_store_of_other_setting(synth_data, stores, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(stores / "eval", store)
    before = snapshot(store)
    code, _, err = run_cli(capsys, "embed", "--data", synth_data / "eval", "--out", store, "embed.max_length=16")
    assert code == 2
    (line,) = error_lines(err)
    assert line.startswith("lift-fast embed: error:") and str(store / "manifest.json") in line
    assert "max_length: asked 16, found 77" in err
    assert snapshot(store) == before  # bytes and mtimes of every file, and no new file


def test_train_on_store_of_other_setting(synth_data, stores, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", synth_data / "train", "--embeddings", stores / "train",
                           "--run", tmp_path / "run", *FAST, "embed.max_length=16")
    assert code == 2
    (line,) = error_lines(err)
    assert str(stores / "train" / "manifest.json") in line
    assert "max_length" in err


def test_non_utf8_caption(tmp_path, capsys):
    data = tmp_path / "data"
    write_members(data / "00000.tar", [("ok_1.jpg", b"x"), ("ok_1.txt", b"a red circle"),
                                       ("bad_7.jpg", b"x"), ("bad_7.txt", "caf\xe9 au lait".encode("latin-1"))])
    code, _, err = run_cli(capsys, "embed", "--data", data, "--out", tmp_path / "store")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("lift-fast embed: error:")
    assert str(data / "00000.tar") in line and "bad_7.txt" in line and "UTF-8" in line


def test_eval_without_checkpoint(synth_data, stores, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model:\n  depth: 1\n")
    code, _, err = run_cli(capsys, "eval", "--run", tmp_path / "run", "--data", synth_data / "eval",
                           "--embeddings", stores / "eval")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "no complete checkpoint" in line and str(tmp_path / "run") in line


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run_cli(capsys, "demo", "--out", out, "--quick")
    assert code == 0, err
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "demo_metrics.json").read_text())
    results = json.loads((out / "run" / "eval.json").read_text())
    for name in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "chance_r1"):
        assert name in results and metrics[name] == results[name]
    assert "first_loss" in metrics and "last_loss" in metrics and metrics["seconds/total"] > 0
    assert "lift-fast demo results" in stdout
