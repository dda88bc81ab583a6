"""The schedule rule on resume: the cosine keeps the length the run started with whatever train.steps
becomes (a longer run goes on at train.min_lr, a shorter one stops early); train.schedule_steps set on
resume re-stretches it on purpose, from the very first resumed step."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from lift_fast.config import TrainConfig, load_config
from lift_fast.train.checkpoint import load_checkpoint, save_checkpoint
from lift_fast.train.loop import train
from lift_fast.train.optim import build_scheduler, cosine_schedule, resumed_schedule

TINY = ["data.image_size=32", "model.depth=1", "train.batch_size=16", "train.lr=3e-3", "train.min_lr=2e-4",
        "train.warmup_steps=2", "train.log_every=1", "data.num_workers=0", "data.shuffle_window=4", "data.backend=pil",
        "train.checkpoint_every=3", "train.keep_checkpoints=5", "train.tensorboard=false"]


def tiny_config(*extra: str):
    return load_config(overrides=TINY + list(extra))


def logged_lr(run_dir) -> dict[int, float]:
    """metrics.jsonl's lr by step (the rate the next step will use, as the scheduler reports it)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {record["step"]: record["lr"] for record in records}


def expected_lr(step: int, steps: int) -> float:
    return cosine_schedule(step, steps=steps, warmup_steps=2, lr=3e-3, min_lr=2e-4)


@pytest.fixture(scope="module")
def six_step_run(synth_data, stores, tmp_path_factory):
    """A 6-step run with checkpoints at steps 3 and 6; copy it before continuing it."""
    run = tmp_path_factory.mktemp("schedule") / "run"
    train(tiny_config("train.steps=6"), synth_data / "train", stores / "train", run, progress=False)
    return run


def test_longer_resume_keeps_the_schedule_and_goes_on_at_min_lr(six_step_run, synth_data, stores, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(six_step_run, run)
    with caplog.at_level(logging.WARNING, logger="lift_fast.train.optim"):
        train(tiny_config("train.steps=10"), synth_data / "train", stores / "train", run, resume="auto", progress=False)
    assert "train.steps=10 goes past the end" in caplog.text and "train.schedule_steps=10" in caplog.text
    lr = logged_lr(run)
    assert sorted(lr) == list(range(1, 11))
    for step, value in lr.items():
        assert value == pytest.approx(expected_lr(step, 6), rel=1e-12), step
    assert all(lr[step] == pytest.approx(2e-4) for step in range(6, 11))  # never back up after the end
    assert all(lr[step + 1] <= lr[step] for step in range(2, 10))
    # the re-stretched schedule the old code followed would have jumped back up
    assert expected_lr(6, 10) > 3 * lr[6]
    saved = load_config(run / "config.yaml").train
    assert (saved.steps, saved.schedule_steps) == (10, 6)  # recorded for the next resume

    # a second resume reads the length from config.yaml, not from its train.steps
    train(tiny_config("train.steps=12"), synth_data / "train", stores / "train", run, resume="auto", progress=False)
    lr = logged_lr(run)
    assert sorted(lr) == list(range(1, 13)) and lr[11] == lr[12] == pytest.approx(2e-4)
    assert load_config(run / "config.yaml").train.schedule_steps == 6


def test_shorter_resume_stops_early_on_the_same_curve(six_step_run, synth_data, stores, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(six_step_run, run)
    shutil.rmtree(run / "checkpoints" / "step_000006")  # resume from step 3
    train(tiny_config("train.steps=5"), synth_data / "train", stores / "train", run, resume="auto", progress=False)
    lr = logged_lr(run)
    assert sorted(lr) == [1, 2, 3, 4, 5]
    for step in (4, 5):  # on the 6-step cosine, not one squeezed into 5 steps
        assert lr[step] == pytest.approx(expected_lr(step, 6), rel=1e-12)
        assert lr[step] != pytest.approx(expected_lr(step, 5), rel=1e-3)
    saved = load_config(run / "config.yaml").train
    assert (saved.steps, saved.schedule_steps) == (5, 6)


def test_schedule_steps_on_resume_restretches_on_purpose(six_step_run, synth_data, stores, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(six_step_run, run)
    with caplog.at_level(logging.WARNING, logger="lift_fast.train.optim"):
        train(tiny_config("train.steps=10", "train.schedule_steps=10"), synth_data / "train", stores / "train", run,
              resume="auto", progress=False)
    assert "re-stretches the cosine schedule this run started with (6 steps)" in caplog.text
    lr = logged_lr(run)
    for step in range(7, 11):
        assert lr[step] == pytest.approx(expected_lr(step, 10), rel=1e-12), step
    assert load_config(run / "config.yaml").train.schedule_steps == 10


def test_fresh_run_records_zero_for_its_own_length(six_step_run):
    saved = load_config(six_step_run / "config.yaml").train
    assert (saved.steps, saved.schedule_steps) == (6, 0)
    lr = logged_lr(six_step_run)
    assert [lr[step] for step in range(1, 7)] == pytest.approx([expected_lr(step, 6) for step in range(1, 7)], rel=1e-12)


def test_resumed_schedule_rule():
    started = TrainConfig(steps=100, warmup_steps=10)
    assert resumed_schedule(started, TrainConfig(steps=100, warmup_steps=10), 50).schedule_steps == 0
    assert resumed_schedule(started, TrainConfig(steps=150, warmup_steps=10), 50).schedule_steps == 100
    assert resumed_schedule(started, TrainConfig(steps=80, warmup_steps=10), 50).schedule_steps == 100
    assert resumed_schedule(started, TrainConfig(steps=150, schedule_steps=150, warmup_steps=10), 50).schedule_steps == 150
    # a run that was already extended keeps its recorded length, and 0 asked means "keep"
    extended = TrainConfig(steps=150, schedule_steps=100, warmup_steps=10)
    assert resumed_schedule(extended, TrainConfig(steps=200, warmup_steps=10), 150).schedule_steps == 100
    assert resumed_schedule(extended, TrainConfig(steps=100, warmup_steps=10), 90).schedule_steps == 0
    assert resumed_schedule(extended, TrainConfig(steps=200, schedule_steps=100, warmup_steps=10), 150).schedule_steps == 100


def test_loaded_checkpoint_steps_at_the_resumed_schedules_rate(tmp_path):
    """The optimizer state holds the old schedule's rate for the next step; loading under another
    schedule sets the new one at once, so a re-stretch applies from the first resumed step."""
    model = torch.nn.Linear(3, 2)
    old_cfg, new_cfg = TrainConfig(steps=6, warmup_steps=2, lr=1e-2), TrainConfig(steps=6, schedule_steps=10,
                                                                                   warmup_steps=2, lr=1e-2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=old_cfg.lr)
    scheduler = build_scheduler(optimizer, old_cfg)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    folder = save_checkpoint(tmp_path / "run", 4, model, optimizer, scheduler)
    for cfg, steps in ((old_cfg, 6), (new_cfg, 10)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        scheduler = build_scheduler(optimizer, cfg)
        load_checkpoint(folder, model, optimizer, scheduler)
        rate = cosine_schedule(4, steps=steps, warmup_steps=2, lr=1e-2)
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([rate], rel=1e-12)
        assert scheduler.get_last_lr() == pytest.approx([rate], rel=1e-12)
