"""The `lift-fast` command end to end on a tiny set, and its one-line errors (exit code 2)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from shard_tools import read_members, snapshot, write_members

from lift_fast import cli
from lift_fast.cli import build_parser, main
from lift_fast.config import load_config
from lift_fast.data.shards import list_shards
from lift_fast.eval.sugarcrepe import load_sugarcrepe
from lift_fast.train import loop as loop_module
from lift_fast.train.loop import train

FAST = ["data.image_size=32", "model.depth=1", "train.steps=8", "train.batch_size=16", "train.warmup_steps=2",
        "train.log_every=2", "data.num_workers=0", "data.shuffle_window=4"]
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
    assert not (tmp_path / "run").exists()  # inputs are checked before the run folder is made


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


@pytest.fixture(scope="module")
def tiny_run(synth_data, stores, tmp_path_factory):
    """A 4-step run of the FAST settings on the shared synthetic set; copy it before changing it."""
    run = tmp_path_factory.mktemp("cli") / "run"
    train(load_config(overrides=FAST + ["train.steps=4", "train.checkpoint_every=2"]), synth_data / "train",
          stores / "train", run, progress=False)
    return run


def test_readme_resume_line_uses_the_saved_settings(synth_data, stores, tiny_run, tmp_path, capsys):
    """`lift-fast train --data D --embeddings E --run R --resume auto`, without the run's overrides."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "checkpoints" / "step_000004")  # as if stopped after step 2
    saved = (run / "config.yaml").read_bytes()
    code, out, err = run_cli(capsys, "train", "--data", synth_data / "train", "--embeddings", stores / "train",
                             "--run", run, "--resume", "auto")
    assert code == 0, err
    assert json.loads(out)["step"] == 4
    assert (run / "config.yaml").read_bytes() == saved
    # allowed changes are taken; others are refused naming each key, and nothing is written
    code, out, err = run_cli(capsys, "train", "--data", synth_data / "train", "--embeddings", stores / "train",
                             "--run", run, "--resume", "auto", "train.steps=5", "train.log_every=1")
    assert code == 0, err
    assert json.loads(out)["step"] == 5 and load_config(run / "config.yaml").train.steps == 5
    before = snapshot(run)
    code, _, err = run_cli(capsys, "train", "--data", synth_data / "train", "--embeddings", stores / "train",
                           "--run", run, "--resume", "auto", "train.steps=9", "model.depth=2", "data.image_size=64")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "model.depth: saved 1, asked 2" in line and "data.image_size: saved 32, asked 64" in line
    assert str(run / "config.yaml") in line
    assert snapshot(run) == before


def test_eval_takes_config_and_overrides_on_top_of_the_run(synth_data, stores, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = tmp_path / "eval.yaml"
    config.write_text("eval:\n  batch_size: 7\n")
    code, out, err = run_cli(capsys, "eval", "--run", run, "--data", synth_data / "eval", "--embeddings",
                             stores / "eval", "--config", config, "eval.compositional=false", "data.num_workers=0")
    assert code == 0, err
    results = json.loads(out)
    assert results["num_images"] == 32 and not any(k.startswith("compositional/") for k in results)
    before = snapshot(run)
    code, _, err = run_cli(capsys, "eval", "--run", run, "--data", synth_data / "eval", "--embeddings",
                           stores / "eval", "model.depth=2")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("lift-fast eval: error:") and "model.depth: saved 1, asked 2" in line
    assert snapshot(run) == before


def test_eval_with_a_skipped_sample(synth_data, tiny_run, text_encoder, tmp_path, capsys):
    """A sample the loader skips (data.on_error=skip) is counted, in retrieval and in SugarCrepe."""
    data = tmp_path / "eval"
    shutil.copytree(synth_data / "eval", data)
    bad = "eval-00000003"
    shard = list_shards(data)[0]
    write_members(shard, [(n, b"caf\xe9" if n == f"{bad}.txt" else b) for n, b in read_members(shard)])
    from lift_fast.config import EmbedConfig
    from lift_fast.embed import embed_shards

    embed_shards(data, tmp_path / "store", EmbedConfig(on_error="skip"), encoder=text_encoder, progress=False)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, out, err = run_cli(capsys, "eval", "--run", run, "--data", data, "--embeddings", tmp_path / "store",
                             "data.on_error=skip")
    assert code == 0, err
    results = json.loads(out)
    assert results["num_images"] == 31 and results["skipped_images"] == 1
    items = [i for items in load_sugarcrepe(data / "sugarcrepe").values() for i in items if i["key"] == bad]
    assert items and results["compositional_items_skipped"] == len(items)
    assert json.loads((run / "eval.json").read_text()) == results
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_cross_split_eval_is_refused(synth_data, stores, tiny_run, tmp_path, capsys):
    """`lift-fast eval --data data/eval --embeddings emb/train`: an error naming shard and key."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, _, err = run_cli(capsys, "eval", "--run", run, "--data", synth_data / "eval", "--embeddings",
                           stores / "train")
    assert code == 2
    (line,) = error_lines(err)
    assert str(synth_data / "eval" / "00000.tar") in line and "'eval-00000000'" in line
    assert not (run / "eval.json").exists()


@pytest.mark.parametrize("argv", [["-q", "train"], ["train", "-q"], ["train", "--quiet"]])
def test_quiet_before_or_after_the_command(argv):
    args = build_parser().parse_args([*argv, "--data", "d", "--embeddings", "e", "--run", "r"])
    assert args.quiet is True
    assert build_parser().parse_args(["train", "--data", "d", "--embeddings", "e", "--run", "r"]).quiet is False


@pytest.mark.parametrize("option, value, message", [
    ("--num-train", "0", "must be at least 1, got 0"), ("--num-eval", "-3", "must be at least 1, got -3"),
    ("--samples-per-shard", "0", "must be at least 1, got 0"), ("--image-size", "8", "must be at least 16, got 8"),
    ("--num-train", "many", "expected an integer, got 'many'"),
])
def test_synth_option_checks(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--out", str(tmp_path / "out"), option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {message}" in err
    assert not (tmp_path / "out").exists()


def test_synth_options_have_help(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    for option in ("--num-train", "--num-eval", "--image-size", "--samples-per-shard", "--seed"):
        help_text = options.split(option, 1)[1].split("\n  -", 1)[0]
        assert len(help_text.split()) > 2, option  # more than the metavar


def test_config_into_a_closed_pipe_prints_no_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "lift_fast", "config"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    proc.stdout.close()  # the reader is gone before anything is written, as with `| head` on a long output
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    proc.stderr.close()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert proc.returncode == 1


def test_interrupted_train_says_how_to_continue(synth_data, stores, tmp_path, capsys, monkeypatch):
    calls = []
    loss = loop_module.contrastive_loss

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(loop_module, "contrastive_loss", interrupted)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", synth_data / "train", "--embeddings", stores / "train",
                           "--run", run, *FAST)
    assert code == 128 + signal.SIGINT
    (line,) = err.strip().splitlines()
    assert line.startswith("lift-fast train: interrupted;") and "--resume auto" in line
    assert str(run / "checkpoints" / "step_000002") in line and "step 2" in line


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    """Only deliberate input errors become one line; a bug (here a bare ValueError) is not hidden."""
    def bug(args):
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "run_command", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["config"])


def test_unknown_model_name_is_a_one_line_error(synth_data, stores, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", synth_data / "train", "--embeddings", stores / "train",
                           "--run", tmp_path / "run", *FAST, "model.name=vit_giant_patch16")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "model.name='vit_giant_patch16'" in line
    assert not (tmp_path / "run").exists()
