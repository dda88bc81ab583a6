"""The training loop, its run folder, resume, store checks, optimiser groups, schedule and checkpoints;
non-finite steps, TensorBoard, and the precision/compile switches on CPU."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lift_fast import device as device_module
from lift_fast.config import ConfigError, TrainConfig, load_config
from lift_fast.data.dali import dali_available
from lift_fast.data.shards import ShardError
from lift_fast.embed import StoreMismatchError
from lift_fast.embed.encoder import resolve_model
from lift_fast.models.vit import build_model
from lift_fast.train import NonFiniteLossError, RunFolderError
from lift_fast.train import build as build_module
from lift_fast.train import checkpoint as checkpoint_module
from lift_fast.train import loop as loop_module
from lift_fast.train import metrics as metrics_module
from lift_fast.train.checkpoint import complete_checkpoints, latest_checkpoint, load_weights, save_checkpoint
from lift_fast.train.loop import MetricsLog, TrainingInterrupted, check_store, train
from lift_fast.train.optim import build_optimizer, build_scheduler, cosine_schedule, parameter_groups

TINY = ["data.image_size=32", "model.depth=1", "train.steps=30", "train.batch_size=16", "train.lr=3e-3",
        "train.warmup_steps=3", "train.log_every=1", "data.num_workers=0", "data.shuffle_window=4", "data.backend=pil",
        "train.checkpoint_every=10", "train.keep_checkpoints=2"]


def tiny_config(*extra: str):
    return load_config(overrides=TINY + list(extra))


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained_run(synth_data, stores, tmp_path_factory):
    """A 30-step run (checkpoints every 10, two kept); copy it before continuing it."""
    run = tmp_path_factory.mktemp("train") / "run"
    result = train(tiny_config(), synth_data / "train", stores / "train", run, progress=False)
    return run, result


def test_loss_decreases(trained_run):
    run, result = trained_run
    losses = [record["loss"] for record in read_metrics(run)]
    assert len(losses) == 30
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert result["step"] == 30 and result["loss"] == losses[-1]
    assert set(result) == {"step", "loss", "seconds", "samples_per_second", "compile_seconds", "nonfinite_steps",
                           "skipped", "checkpoint"}
    # the mean over the run after the first step (timed apart): 29 batches of 16 in the rest of the loop's time
    assert 0 < result["compile_seconds"] < result["seconds"] and result["nonfinite_steps"] == 0
    assert result["samples_per_second"] == pytest.approx(29 * 16 / (result["seconds"] - result["compile_seconds"]),
                                                         rel=1e-6)


def test_run_folder(trained_run):
    run, result = trained_run
    assert load_config(run / "config.yaml") == tiny_config()
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 31))
    for record in records:
        for name in ("step", "loss", "lr", "logit_scale", "samples_per_second"):
            assert isinstance(record[name], (int, float)), name
        assert record["samples_per_second"] > 0
        assert 0 < record["logit_scale"] <= 100
        # the step time splits into waiting for data and computing
        assert record["step_seconds"] == pytest.approx(record["data_wait_seconds"] + record["compute_seconds"])
        assert record["data_wait_seconds"] >= 0 and record["compute_seconds"] > 0
        assert record["data_wait_fraction"] == pytest.approx(record["data_wait_seconds"] / record["step_seconds"])
    # warm-up then cosine, as the schedule says: lr after step s is the schedule at s (0-based next step)
    for record in records:
        expected = cosine_schedule(record["step"], steps=30, warmup_steps=3, lr=3e-3)
        assert record["lr"] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert records[0]["logit_scale"] == pytest.approx(14.285714, rel=0.05)
    # keep_checkpoints=2: of steps 10, 20, 30 only the newest two are left, each complete
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step_000020", "step_000030"]
    assert result["checkpoint"] == str(run / "checkpoints" / "step_000030")
    weights = load_file(str(run / "checkpoints" / "step_000030" / "model.safetensors"))
    assert "logit_scale" in weights and "visual.pos_embed" in weights
    assert (run / "checkpoints" / "step_000030" / "state.pt").is_file()


def test_second_train_without_resume_refused(trained_run, synth_data, stores):
    run, _ = trained_run
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="resume") as err:
        train(tiny_config(), synth_data / "train", stores / "train", run, progress=False)
    assert str(run) in str(err.value)
    assert (run / "metrics.jsonl").read_bytes() == before


def test_resume_auto_continues(trained_run, synth_data, stores, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    saved = load_file(str(run / "checkpoints" / "step_000030" / "model.safetensors"))
    # a deliberate re-stretch of the cosine: train.steps alone would go on at train.min_lr=0 (test_resume_schedule.py)
    result = train(tiny_config("train.steps=34", "train.schedule_steps=34"), synth_data / "train", stores / "train", run,
                   resume="auto", progress=False)
    assert result["step"] == 34
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 35))  # steps 31.. follow on, none repeated
    assert latest_checkpoint(run).name == "step_000034"
    assert load_config(run / "config.yaml").train.steps == 34
    resumed = load_file(str(run / "checkpoints" / "step_000034" / "model.safetensors"))
    # the initial weights, as train() makes them (seeded right before building the model)
    torch.manual_seed(0)
    initial = build_model(tiny_config().model, 32, 384, tiny_config().train.logit_scale_init).state_dict()
    trained_distance = (saved["visual.pos_embed"] - initial["visual.pos_embed"]).abs().max()
    drift = (resumed["visual.pos_embed"] - saved["visual.pos_embed"]).abs().max()
    # four more steps at the tail of the cosine move the saved weights a little; a fresh start would
    # be as far from them as the first 30 steps took them
    assert 0 < drift < trained_distance / 4


def test_resume_auto_on_empty_run_starts_fresh(synth_data, stores, tmp_path):
    result = train(tiny_config("train.steps=2", "train.checkpoint_every=0"), synth_data / "train",
                   stores / "train", tmp_path / "run", resume="auto", progress=False)
    assert result["step"] == 2
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step_000002"]


def test_resume_from_folder_without_weights(synth_data, stores, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        train(tiny_config(), synth_data / "train", stores / "train", tmp_path / "run",
              resume=str(tmp_path / "nothing"), progress=False)


def test_store_made_with_other_settings(synth_data, stores, tmp_path):
    cfg = tiny_config("embed.max_length=16")
    with pytest.raises(StoreMismatchError) as err:
        train(cfg, synth_data / "train", stores / "train", tmp_path / "run", progress=False)
    message = str(err.value)
    assert str(stores / "train" / "manifest.json") in message
    assert "max_length" in message and "16" in message and "77" in message
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_resume_refuses_other_settings_and_writes_nothing(trained_run, synth_data, stores, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    with pytest.raises(ConfigError) as err:
        train(tiny_config("model.depth=2", "train.batch_size=8", "train.steps=40"), synth_data / "train",
              stores / "train", run, resume="auto", progress=False)
    message = str(err.value)
    assert "model.depth: saved 1, asked 2" in message and "train.batch_size: saved 16, asked 8" in message
    assert "train.steps" not in message.split("Only")[0] and str(run / "config.yaml") in message
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_checkpoint_of_another_model_names_file_and_tensors(trained_run):
    run, _ = trained_run
    model = build_model(tiny_config("model.depth=1", "model.head_hidden=32").model, 32, 384)
    folder = run / "checkpoints" / "step_000030"
    with pytest.raises(RunFolderError) as err:
        load_weights(model, folder)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert str(folder / "model.safetensors") in message
    assert "head.fc1.weight [384, 192] in the file, [32, 192] in the model" in message
    assert "head.fc2.weight" in message


def test_metrics_log_drops_cut_off_last_line_and_names_other_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"step": 4, "lo')  # a crash while writing step 4
    MetricsLog(path, resume_step=3).close()
    assert path.read_text() == "\n".join(lines) + "\n"
    path.write_text(lines[0] + "\n" + '{"step": 2, "lo\n' + lines[2] + "\n")
    with pytest.raises(RunFolderError, match="line 2 is not a metrics record") as err:
        MetricsLog(path, resume_step=3)
    assert str(path) in str(err.value)
    path.write_text(lines[0] + "\n" + '{"loss": 2.0}\n')  # complete, but no step: not a cut-off line
    with pytest.raises(RunFolderError, match="line 2"):
        MetricsLog(path, resume_step=3)


@pytest.mark.parametrize("change, error, named", [
    (["model.name=vit_huge_patch16"], ConfigError, "model.name"),
    (["data.image_size=40"], ConfigError, "data.image_size=40"),
    (["train.batch_size=65"], ConfigError, "train.batch_size=65"),
    ("no_data", ShardError, "no_data"),
])
def test_bad_inputs_leave_no_run_folder(synth_data, stores, tmp_path, change, error, named):
    data = tmp_path / "no_data" if change == "no_data" else synth_data / "train"
    cfg = tiny_config(*([] if change == "no_data" else change))
    with pytest.raises(error, match=named) as err:
        train(cfg, data, stores / "train", tmp_path / "run", progress=False)
    if "batch_size" in named:
        assert "64 training samples" in str(err.value)
    assert not (tmp_path / "run").exists()


def interrupt_at(monkeypatch, call: int, action) -> None:
    """Run `action()` inside the loss of the `call`-th training step (1-based)."""
    calls = []
    loss = loop_module.contrastive_loss

    def wrapped(*args):
        calls.append(1)
        if len(calls) == call:
            action()
        return loss(*args)

    monkeypatch.setattr(loop_module, "contrastive_loss", wrapped)


def test_ctrl_c_saves_last_finished_step_and_resume_continues(synth_data, stores, tmp_path, monkeypatch):
    cfg = tiny_config("train.steps=6", "train.checkpoint_every=0")
    run = tmp_path / "run"

    def ctrl_c():
        raise KeyboardInterrupt

    interrupt_at(monkeypatch, 4, ctrl_c)  # in the middle of step 4
    with pytest.raises(TrainingInterrupted) as err:
        train(cfg, synth_data / "train", stores / "train", run, progress=False)
    assert (err.value.step, err.value.checkpoint) == (3, run / "checkpoints" / "step_000003")
    assert isinstance(err.value, KeyboardInterrupt) and err.value.signum == signal.SIGINT
    assert [p.name for p in complete_checkpoints(run)] == ["step_000003"]
    monkeypatch.undo()
    result = train(cfg, synth_data / "train", stores / "train", run, resume="auto", progress=False)
    assert result["step"] == 6
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 7))


def test_sigterm_finishes_the_step_saves_it_and_stops(synth_data, stores, tmp_path, monkeypatch):
    run = tmp_path / "run"
    interrupt_at(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as err:
        train(tiny_config("train.steps=6"), synth_data / "train", stores / "train", run, progress=False)
    assert err.value.signum == signal.SIGTERM and err.value.step == 2
    assert latest_checkpoint(run).name == "step_000002"
    assert signal.getsignal(signal.SIGTERM) is handler  # restored


@pytest.mark.parametrize("backend, workers", [("pil", 0), ("pil", 1), ("dali", 2)])
def test_sigterm_then_resume_continues_the_exact_loss_curve(synth_data, stores, tmp_path, monkeypatch, backend,
                                                            workers):
    """Stopped by SIGTERM at step 5 and resumed, a run logs the very losses and ends with the very
    weights of an uninterrupted one: the loader restarts at the saved step of the same stream (with
    a worker, the batches it had prefetched are dropped, not skipped), and patch dropout draws from
    the restored RNG."""
    if backend == "dali" and not dali_available()[0]:
        pytest.skip("DALI is not usable here")
    cfg = tiny_config("train.steps=12", "train.checkpoint_every=0", f"data.num_workers={workers}", f"data.backend={backend}",
                      "model.patch_dropout=0.25", "data.hflip=true")
    whole = tmp_path / "whole"
    train(cfg, synth_data / "train", stores / "train", whole, progress=False)
    run = tmp_path / "run"
    interrupt_at(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(TrainingInterrupted) as err:
        train(cfg, synth_data / "train", stores / "train", run, progress=False)
    assert err.value.step == 5
    monkeypatch.undo()
    train(cfg, synth_data / "train", stores / "train", run, resume="auto", progress=False)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(whole)]
    final = load_file(str(run / "checkpoints" / "step_000012" / "model.safetensors"))
    expected = load_file(str(whole / "checkpoints" / "step_000012" / "model.safetensors"))
    assert all(torch.equal(final[name], expected[name]) for name in expected)


def test_interrupt_during_the_update_keeps_the_last_checkpoint(synth_data, stores, tmp_path, monkeypatch):
    """Weights half way through optimizer.step are not saved: the newest checkpoint stays the answer."""
    run = tmp_path / "run"
    build = build_module.build_optimizer
    updates = []

    def interrupted_in_third_update(optimizer, args, kwargs):
        updates.append(1)
        if len(updates) == 3:  # the weights have moved, the step is not counted yet
            raise KeyboardInterrupt

    def optimizer_with_hook(model, train_cfg):
        optimizer = build(model, train_cfg)
        optimizer.register_step_post_hook(interrupted_in_third_update)
        return optimizer

    monkeypatch.setattr(build_module, "build_optimizer", optimizer_with_hook)
    with pytest.raises(TrainingInterrupted) as err:
        train(tiny_config("train.steps=6", "train.checkpoint_every=2"), synth_data / "train", stores / "train", run,
              progress=False)
    assert (err.value.step, err.value.checkpoint) == (2, run / "checkpoints" / "step_000002")
    assert [p.name for p in complete_checkpoints(run)] == ["step_000002"]


def with_manifest(src, dst, **encoder):
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["encoder"].update(encoder)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_store_made_with_the_encoder_by_path_fits_the_default_name(stores, tmp_path):
    """embed.model=/path/to/minilm and the default 'all-minilm-l6-v2' are the same weights."""
    folder = resolve_model("all-minilm-l6-v2")[0]
    store = with_manifest(stores / "train", tmp_path / "store", model=str(folder))
    assert check_store(store, tiny_config())["encoder"]["model"] == str(folder)
    assert check_store(store, tiny_config(f"embed.model={folder}"))


def test_store_of_other_encoder_names_it_without_at_none(stores, tmp_path):
    with pytest.raises(StoreMismatchError) as err:  # a hub id not on this machine: names are compared
        check_store(stores / "train", tiny_config("embed.model=no-such-org/no-such-model"))
    message = str(err.value)
    assert "model: asked 'no-such-org/no-such-model', found 'all-minilm-l6-v2'" in message
    assert "at None" not in message and "(asked encoder 'no-such-org/no-such-model'; " in message
    fake = tmp_path / "fake"  # a local folder: its weights are hashed, whatever its name
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(StoreMismatchError) as err:
        check_store(stores / "train", tiny_config(f"embed.model={fake}"))
    assert "weights_sha256: asked" in str(err.value) and f"at {fake}" in str(err.value)


def test_step_seeds_differ_by_step_and_rank():
    seeds = {(step, rank): loop_module.step_seed(0, step, rank) for step in range(100) for rank in range(8)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= value < 2**63 for value in seeds.values())
    assert loop_module.step_seed(0, 5, 1) == loop_module.step_seed(0, 5, 1) != loop_module.step_seed(1, 5, 1)


def test_parameter_groups():
    cfg = load_config(overrides=["model.depth=2", "model.pooling=cls"])
    model = build_model(cfg.model, 32, 24)
    groups = parameter_groups(model, weight_decay=0.2)
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    for name in no_decay:
        assert (name.endswith(".bias") or "norm" in name or name in ("logit_scale", "visual.pos_embed",
                                                                      "visual.cls_token")), name
    for name in ("logit_scale", "visual.pos_embed", "visual.cls_token", "visual.norm.weight",
                 "visual.blocks.0.norm1.weight", "visual.blocks.1.attn.qkv.bias", "head.fc2.bias"):
        assert name in no_decay
    for name in ("visual.patch_embed.proj.weight", "visual.blocks.0.attn.qkv.weight",
                 "visual.blocks.1.mlp.fc2.weight", "head.fc1.weight", "head.fc2.weight"):
        assert name in decay
    optimizer = build_optimizer(model, TrainConfig())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.2, 0.0]
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6


def test_cosine_schedule_values():
    kwargs = dict(steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert cosine_schedule(0, **kwargs) == pytest.approx(1e-4)  # first warm-up step
    assert cosine_schedule(4, **kwargs) == pytest.approx(5e-4)
    assert cosine_schedule(9, **kwargs) == pytest.approx(1e-3)  # warm-up ends at the peak
    assert cosine_schedule(10, **kwargs) == pytest.approx(1e-3)
    assert cosine_schedule(60, **kwargs) == pytest.approx((1e-3 + 1e-5) / 2)  # midpoint of the cosine
    assert cosine_schedule(35, **kwargs) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_schedule(110, **kwargs) == pytest.approx(1e-5)  # the end
    assert cosine_schedule(500, **kwargs) == pytest.approx(1e-5)  # stays there past the end
    assert cosine_schedule(0, steps=10, warmup_steps=0, lr=1.0) == pytest.approx(1.0)


def test_scheduler_follows_schedule():
    cfg = load_config(overrides=["train.steps=20", "train.warmup_steps=4", "train.lr=0.01", "train.min_lr=0.001"])
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    for step in range(25):
        expected = cosine_schedule(step, steps=20, warmup_steps=4, lr=0.01, min_lr=0.001)
        assert all(g["lr"] == pytest.approx(expected) for g in optimizer.param_groups), step
        optimizer.step()
        scheduler.step()


def tiny_checkpoint(run, step):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return save_checkpoint(run, step, model, optimizer, scheduler, keep=5), (model, optimizer, scheduler)


def test_incomplete_checkpoints_do_not_count(tmp_path):
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None
    good, _ = tiny_checkpoint(run, 5)
    root = run / "checkpoints"
    # a crash mid-write leaves the temporary folder, even with both files in it
    shutil.copytree(good, root / ".tmp_step_000009")
    # a folder with weights but no state, and one with state but no weights
    (root / "step_000007").mkdir()
    shutil.copy(good / "model.safetensors", root / "step_000007")
    (root / "step_000008").mkdir()
    shutil.copy(good / "state.pt", root / "step_000008")
    (root / "step_000006.old").mkdir()
    shutil.copytree(good, root / "step_000006.old", dirs_exist_ok=True)
    assert latest_checkpoint(run) == good
    assert complete_checkpoints(run) == [good]


def test_checkpoints_sort_by_step_number(tmp_path):
    run = tmp_path / "run"
    for step in (9, 1000000, 100):
        tiny_checkpoint(run, step)
    assert [p.name for p in complete_checkpoints(run)] == ["step_000009", "step_000100", "step_1000000"]


def test_crash_while_saving_keeps_previous_latest(tmp_path, monkeypatch):
    run = tmp_path / "run"
    good, (model, optimizer, scheduler) = tiny_checkpoint(run, 5)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(run, 10, model, optimizer, scheduler)
    assert latest_checkpoint(run) == good
    assert not (run / "checkpoints" / "step_000010").exists()


GOLDEN = Path(__file__).parent / "golden" / "tiny_train_loss.json"


def test_loss_curve_matches_golden(trained_run):
    """The 30-step loss curve of the tiny run is checked in, so a change to the model, loss, schedule,
    data order or augmentation shows up here. LIFT_FAST_UPDATE_GOLDEN=1 rewrites the file."""
    run, _ = trained_run
    losses = [round(record["loss"], 4) for record in read_metrics(run)]
    if os.environ.get("LIFT_FAST_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"config": TINY, "loss": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["config"] == TINY, "the tiny config changed: rerun with LIFT_FAST_UPDATE_GOLDEN=1"
    # Other CPUs round differently in BLAS; 0.02 absorbs that over 30 steps, not a real change.
    assert losses == pytest.approx(golden["loss"], abs=0.02)


def test_first_step_is_timed_apart(trained_run):
    run, result = trained_run
    records = read_metrics(run)
    assert records[0]["compile_seconds"] == pytest.approx(result["compile_seconds"])
    assert not any("compile_seconds" in record for record in records[1:])
    assert all(record["nonfinite_steps"] == 0 and record["grad_norm"] > 0 for record in records)


def test_sigusr1_saves_like_sigterm(synth_data, stores, tmp_path, monkeypatch):
    """SLURM's --signal=USR1@SECONDS warning: finish the step, save it, stop."""
    run = tmp_path / "run"
    interrupt_at(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with pytest.raises(TrainingInterrupted) as err:
        train(tiny_config("train.steps=6"), synth_data / "train", stores / "train", run, progress=False)
    assert (err.value.signum, err.value.step) == (signal.SIGUSR1, 3)
    assert latest_checkpoint(run).name == "step_000003"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == handlers


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_loader_workers_ignore_the_stop_signals(synth_data, stores, tmp_path, monkeypatch, start_method):
    """SLURM signals every process of a job step, loader workers and the fork server included. None
    may die of it (the main process would then fail on the next batch instead of saving): the main
    process alone acts on the signal, and it stops the workers itself. The loader forks its workers
    from the fork server while a DALI pipeline is alive in the process (worker_start_method), which
    in a full test run depends on when earlier tests' pipelines were collected: forced here."""
    from lift_fast.data import loader as loader_module

    monkeypatch.setattr(loader_module, "_dali_pipeline_alive", lambda: start_method == "forkserver")

    def sigterm_the_job():
        for pid in descendants(os.getpid()):  # the workers, and the fork server with the workers it forked
            os.kill(pid, signal.SIGTERM)

    interrupt_at(monkeypatch, 2, sigterm_the_job)
    # 12 steps: more batches than the worker has prefetched when it gets the signal
    result = train(tiny_config("train.steps=12", "data.num_workers=1"), synth_data / "train", stores / "train",
                   tmp_path / "run", progress=False)
    assert result["step"] == 12


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (children, their children, ...), from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):  # not a process, or one that has just exited
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def nan_loss_at(monkeypatch, steps, snapshots: dict | None = None) -> None:
    """Make the loss of the given (1-based) training steps NaN, still in the graph. snapshots: filled
    with {step: copies of the head's first weight} as it is when each step's loss is computed."""
    loss = loop_module.contrastive_loss
    calls = []
    build = build_module.build_optimizer

    def optimizer_kept(model, train_cfg):
        calls.append(model)
        return build(model, train_cfg)

    def wrapped(*args):
        calls.append(None)
        step = len(calls) - 1
        if snapshots is not None:
            snapshots[step] = calls[0].head.fc1.weight.detach().clone()
        value = loss(*args)
        return value * float("nan") if step in steps else value

    monkeypatch.setattr(build_module, "build_optimizer", optimizer_kept)
    monkeypatch.setattr(loop_module, "contrastive_loss", wrapped)


def test_nonfinite_loss_skips_the_update_and_is_counted(synth_data, stores, tmp_path, monkeypatch):
    run, weights = tmp_path / "run", {}
    nan_loss_at(monkeypatch, {2, 3, 5}, weights)
    result = train(tiny_config("train.steps=6", "train.checkpoint_every=0"), synth_data / "train", stores / "train",
                   run, progress=False)
    records = read_metrics(run)
    assert [record["loss"] is None for record in records] == [False, True, True, False, True, False]
    assert [record["nonfinite_steps"] for record in records] == [0, 1, 2, 2, 3, 3]
    assert result["nonfinite_steps"] == 3 and math.isfinite(result["loss"])
    # steps 2 and 3 left the weights as step 1 made them; steps 1 and 4 moved them
    assert torch.equal(weights[2], weights[3]) and torch.equal(weights[3], weights[4])
    assert not torch.equal(weights[1], weights[2]) and not torch.equal(weights[4], weights[5])
    assert torch.equal(weights[5], weights[6])
    # the schedule counts skipped steps: the lr is the schedule's at every step
    for record in records:
        assert record["lr"] == pytest.approx(cosine_schedule(record["step"], steps=6, warmup_steps=3, lr=3e-3))
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[1])["loss"] is None  # strict JSON: null


def test_nonfinite_steps_in_a_row_stop_training(synth_data, stores, tmp_path, monkeypatch):
    run = tmp_path / "run"
    nan_loss_at(monkeypatch, set(range(3, 100)))
    cfg = tiny_config("train.steps=20", "train.max_nonfinite=4", "train.checkpoint_every=2")
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, synth_data / "train", stores / "train", run, progress=False)
    message = str(err.value)
    assert err.value.step == 6 and message.startswith("step 6: loss nan")
    assert "train.max_nonfinite=4" in message and "last updated at step 2" in message
    assert str(run / "checkpoints" / "step_000004") in message
    assert [record["step"] for record in read_metrics(run)] == [1, 2, 3, 4, 5]


def test_tensorboard_has_the_metrics(synth_data, stores, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(tiny_config("train.steps=3", "train.checkpoint_every=0"), synth_data / "train", stores / "train", run,
          progress=False)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = read_metrics(run)
    for name in ("loss", "lr", "logit_scale", "samples_per_second", "grad_norm", "nonfinite_steps"):
        curve = events.Scalars(f"train/{name}")
        assert [point.step for point in curve] == [1, 2, 3]
        assert [point.value for point in curve] == pytest.approx([record[name] for record in records], rel=1e-6)
    assert [point.step for point in events.Scalars("train/compile_seconds")] == [1]


def test_tensorboard_off_or_missing(synth_data, stores, tmp_path, monkeypatch, caplog):
    cfg = tiny_config("train.steps=1", "train.checkpoint_every=0")
    train(tiny_config("train.steps=1", "train.tensorboard=false"), synth_data / "train", stores / "train",
          tmp_path / "off", progress=False)
    assert not (tmp_path / "off" / "tensorboard").exists()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    monkeypatch.setattr(metrics_module, "_told_tensorboard_missing", False)
    with caplog.at_level(logging.WARNING, logger=metrics_module.__name__):
        for name in ("missing", "missing_again"):
            train(cfg, synth_data / "train", stores / "train", tmp_path / name, progress=False)
            assert (tmp_path / name / "metrics.jsonl").is_file() and not (tmp_path / name / "tensorboard").exists()
    assert len([r for r in caplog.records if "tensorboard package is not installed" in r.getMessage()]) == 1


def features_dtype(monkeypatch) -> list:
    """Record the dtypes of the image features and text embeddings each step's loss gets."""
    loss, seen = loop_module.contrastive_loss, []

    def wrapped(loss_fn, image_features, text_embeddings, *rest):
        seen.append((image_features.dtype, text_embeddings.dtype))
        return loss(loss_fn, image_features, text_embeddings, *rest)

    monkeypatch.setattr(loop_module, "contrastive_loss", wrapped)
    return seen


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("auto", torch.float32),
                                              ("fp32", torch.float32)])
def test_precision_on_cpu(synth_data, stores, tmp_path, monkeypatch, precision, dtype):
    seen = features_dtype(monkeypatch)
    result = train(tiny_config("train.steps=3", "train.checkpoint_every=0", f"train.precision={precision}"),
                   synth_data / "train", stores / "train", tmp_path / "run", progress=False)
    assert seen == [(dtype, dtype)] * 3
    losses = [record["loss"] for record in read_metrics(tmp_path / "run")]
    assert all(math.isfinite(loss) for loss in losses) and result["nonfinite_steps"] == 0
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step_000003" / "model.safetensors"))
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())  # autocast keeps fp32 master weights


@pytest.mark.parametrize("choice, compiled", [("auto", False), ("off", False), ("on", True)])
def test_compile_switch_on_cpu(synth_data, stores, tmp_path, monkeypatch, choice, compiled):
    """auto and off run eagerly on CPU; on hands the model to torch.compile (stubbed here: compiling
    takes minutes on a small CPU) and times the first step apart."""
    compiled_modules = []

    def fake_compile(module, *args, **kwargs):
        compiled_modules.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    result = train(tiny_config("train.steps=2", "train.checkpoint_every=0", f"train.compile={choice}"),
                   synth_data / "train", stores / "train", tmp_path / "run", progress=False)
    assert len(compiled_modules) == int(compiled)
    if compiled:
        assert isinstance(compiled_modules[0], torch.nn.Module) and hasattr(compiled_modules[0], "logit_scale")
    assert 0 < result["compile_seconds"] < result["seconds"]
    assert read_metrics(tmp_path / "run")[0]["compile_seconds"] == pytest.approx(result["compile_seconds"])


def test_compile_on_without_a_compiler_is_refused(synth_data, stores, tmp_path, monkeypatch):
    monkeypatch.setattr(device_module.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="train.compile=on: .*C\\+\\+ compiler"):
        train(tiny_config("train.compile=on"), synth_data / "train", stores / "train", tmp_path / "run",
              progress=False)
    assert not (tmp_path / "run").exists()


def test_fused_projection_follows_the_unfused_head(synth_data, stores, tmp_path):
    """model.fuse_projection computes the head's last Linear, the norm and the loss in one call: the
    same function in another order of float32 sums. The first step (same weights) gives the plain
    head's loss and gradient norm to rounding; later steps stay close (Adam divides each gradient by
    its own size, so rounding in near-zero gradients grows into the weights, about 5e-5 in the loss
    after two steps here), while a wrong projection or norm would move them by far more."""
    records = {}
    for fused in ("false", "true"):
        train(tiny_config("train.steps=5", "train.checkpoint_every=0", f"model.fuse_projection={fused}"),
              synth_data / "train", stores / "train", tmp_path / fused, progress=False)
        records[fused] = read_metrics(tmp_path / fused)
    first, first_plain = records["true"][0], records["false"][0]
    assert first["loss"] == pytest.approx(first_plain["loss"], rel=1e-6)
    assert first["grad_norm"] == pytest.approx(first_plain["grad_norm"], rel=1e-4)  # seen: 1.2e-5
    assert [r["loss"] for r in records["true"]] == pytest.approx([r["loss"] for r in records["false"]], rel=1e-3)


def test_max_nonfinite_is_checked_at_logged_steps(synth_data, stores, tmp_path, monkeypatch):
    """With train.log_every=4 the limit reached at step 6 (NaN from step 3, train.max_nonfinite=4) is
    read back at step 8, the next logged step; the error still names step 6 and the last update."""
    nan_loss_at(monkeypatch, set(range(3, 100)))
    cfg = tiny_config("train.steps=20", "train.max_nonfinite=4", "train.checkpoint_every=0", "train.log_every=4")
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, synth_data / "train", stores / "train", tmp_path / "run", progress=False)
    message = str(err.value)
    assert err.value.step == 6 and message.startswith("step 6: loss nan")
    assert "read back at step 8" in message and "last updated at step 2" in message
    assert [record["step"] for record in read_metrics(tmp_path / "run")] == [4]


def test_metrics_report_achieved_tflops_and_mfu_when_the_peak_is_given(synth_data, stores, tmp_path):
    from lift_fast.models.flops import train_flops_per_sample
    from lift_fast.models.vit import vit_spec

    cfg = tiny_config("train.steps=4", "train.checkpoint_every=0", "train.peak_tflops=2.0")
    train(cfg, synth_data / "train", stores / "train", tmp_path / "run", progress=False)
    last = read_metrics(tmp_path / "run")[-1]
    per_sample = train_flops_per_sample(vit_spec(cfg.model.name, depth=cfg.model.depth), cfg.data.image_size, 384,
                                        cfg.train.batch_size)
    assert last["tflops"] == pytest.approx(last["samples_per_second"] * per_sample / 1e12)
    assert last["mfu"] == pytest.approx(last["tflops"] / 2.0)
    assert "peak_memory_gib" not in last  # CUDA only


def test_data_settings_reach_the_loader(synth_data, stores, tmp_path, monkeypatch):
    """data.prefetch (the DALI feed thread's depth; 0: the synchronous feed) and data.caption_weights
    (the draw over the store's caption sources) are what build_loader gets."""
    asked = []

    def recording_build_loader(*args, **kwargs):
        asked.append((kwargs["prefetch"], kwargs["caption_weights"]))
        return build(*args, **kwargs)

    build = build_module.build_loader
    monkeypatch.setattr(build_module, "build_loader", recording_build_loader)
    train(tiny_config("train.steps=1", "train.checkpoint_every=0", "data.prefetch=0", "data.caption_weights=txt=1"),
          synth_data / "train", stores / "train", tmp_path / "run", progress=False)
    assert asked == [(0, "txt=1")]
