"""train() as two DDP ranks (gloo, forked processes, the torchrun environment variables set) against
one process on the same global batches.

The sample stream gives rank r the r-th slice of the global batch one process would read, with the
same crops and flips (they are drawn from each sample's own seed), so the two runs see the same
images, augmentation included; `test_ranks_split_the_single_process_batches` checks it on the
loader itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lift_fast.config import ConfigError, load_config
from lift_fast.data import build_loader
from lift_fast.train import loop as loop_module
from lift_fast.train.loop import TrainingInterrupted, train

WORLD_SIZE = 2
CONFIG = ["data.image_size=32", "model.depth=1", "train.steps=6", "train.batch_size=8", "train.lr=3e-3",
          "train.warmup_steps=2", "train.log_every=1", "train.checkpoint_every=3", "train.tensorboard=false",
          "data.num_workers=0", "data.hflip=true", "data.shuffle_window=2"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, overrides: list[str], data, store, run, sigterm_at=None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if sigterm_at is not None and sigterm_at[0] == rank:  # SIGTERM to this rank alone, inside that step's loss
        loss, calls = loop_module.contrastive_loss, []

        def signalled(*args):
            calls.append(1)
            if len(calls) == sigterm_at[1]:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss(*args)

        loop_module.contrastive_loss = signalled  # in the forked child only
    try:
        result = train(load_config(overrides=overrides), data, store, run, progress=False)
    except TrainingInterrupted as err:
        result = {"interrupted": err.signum, "step": err.step, "checkpoint": str(err.checkpoint)}
    (run.parent / f"result.rank{rank}.json").write_text(json.dumps(result))


def _two_ranks(overrides, data, store, run, sigterm_at=None):
    # fork: the children inherit the imported torch instead of importing it again (seconds each)
    mp.start_processes(_rank_main, args=(_free_port(), overrides, data, store, run, sigterm_at), nprocs=WORLD_SIZE,
                       join=True, start_method="fork")
    return [json.loads((run.parent / f"result.rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def _metric(run, name: str) -> list[float]:
    return [json.loads(line)[name] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ranks_split_the_single_process_batches(synth_data, stores):
    """The ranks' batches, in rank order, are the single-process batch, image for image."""
    common = dict(split="train", image_size=32, seed=3, num_workers=0, hflip=True, shuffle_window=2)
    single = iter(build_loader(synth_data / "train", stores / "train", batch_size=8, **common))
    ranks = [iter(build_loader(synth_data / "train", stores / "train", batch_size=4, rank=rank,
                               world_size=WORLD_SIZE, **common)) for rank in range(WORLD_SIZE)]
    seen = set()
    for _ in range(8):
        expected = next(single)
        parts = [next(loader) for loader in ranks]
        assert parts[0]["keys"] + parts[1]["keys"] == expected["keys"]
        torch.testing.assert_close(torch.cat([p["images"] for p in parts]), expected["images"], rtol=0, atol=0)
        seen.update(expected["keys"])
    assert len(seen) == 64  # one epoch: every sample once


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_ranks_match_one_process(synth_data, stores, tmp_path, loss):
    overrides = CONFIG + [f"train.loss={loss}"]
    single = train(load_config(overrides=overrides), synth_data / "train", stores / "train",
                   tmp_path / "single" / "run", progress=False)
    run = tmp_path / "ddp" / "run"
    results = _two_ranks(overrides, synth_data / "train", stores / "train", run)

    # the logged loss is the mean over ranks of their local parts: the global-batch loss
    expected = _metric(tmp_path / "single" / "run", "loss")
    assert len(expected) == 6
    assert _metric(run, "loss") == pytest.approx(expected, rel=1e-5)
    # the gradient after DDP's average is the global-batch gradient, scale included (Adam would
    # hide a wrong scale in the weights)
    assert _metric(run, "grad_norm") == pytest.approx(_metric(tmp_path / "single" / "run", "grad_norm"), rel=1e-4)
    for result in results:
        assert result["step"] == 6 and result["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert result["checkpoint"] == str(run / "checkpoints" / "step_000006")
    final = load_file(str(run / "checkpoints" / "step_000006" / "model.safetensors"))
    reference = load_file(str(tmp_path / "single" / "run" / "checkpoints" / "step_000006" / "model.safetensors"))
    assert final.keys() == reference.keys()
    # Adam moves a weight by up to about lr a step, and divides each gradient by its own size, so the
    # float32 rounding of a gradient summed in another order shows in the weights at about 1e-6
    # here; a rank on other data, or a missing term, moves them by about lr (3e-3).
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-3 * 3e-3 * 6, msg=name)
    # rank 0 alone wrote the run folder: one line per step, one config, the kept checkpoints
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[0]["samples_per_second"] > 0 and "compile_seconds" in records[0]
    assert load_config(run / "config.yaml") == load_config(overrides=overrides)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000006"]


def test_fused_projection_on_two_ranks_matches_one_process(synth_data, stores, tmp_path):
    """model.fuse_projection under DDP: the fused loss of each rank is its part of the global-batch loss
    (rank=/world_size= reach fused_projection_clip_loss), so the run follows one process's."""
    overrides = CONFIG + ["model.fuse_projection=true", "train.checkpoint_every=0"]
    train(load_config(overrides=overrides), synth_data / "train", stores / "train", tmp_path / "single" / "run",
          progress=False)
    run = tmp_path / "ddp" / "run"
    _two_ranks(overrides, synth_data / "train", stores / "train", run)
    assert _metric(run, "loss") == pytest.approx(_metric(tmp_path / "single" / "run", "loss"), rel=1e-5)
    assert _metric(run, "grad_norm") == pytest.approx(_metric(tmp_path / "single" / "run", "grad_norm"), rel=1e-4)


def test_a_stop_between_logged_steps_reaches_both_ranks_one_step_later(synth_data, stores, tmp_path):
    """The ranks' stop flag is read a step after its all-reduce (no wait for the device in the step
    that carries it), except at logged steps: SIGTERM to rank 1 alone in step 2 (train.log_every=4)
    stops both ranks after step 3, which they save together."""
    overrides = CONFIG + ["train.log_every=4", "train.checkpoint_every=0"]
    run = tmp_path / "ddp" / "run"
    results = _two_ranks(overrides, synth_data / "train", stores / "train", run, sigterm_at=(1, 2))
    assert [(r["interrupted"], r["step"]) for r in results] == [(signal.SIGTERM, 3)] * WORLD_SIZE
    assert results[0]["checkpoint"] == str(run / "checkpoints" / "step_000003")
    assert (run / "checkpoints" / "step_000003" / "model.safetensors").is_file()


def test_batch_that_does_not_split_over_the_ranks(stores, synth_data, tmp_path, monkeypatch):
    for name, value in dict(RANK="0", WORLD_SIZE="4", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"train.batch_size=18 .* 4 ranks .* train.batch_size=16 or 20"):
        train(load_config(overrides=CONFIG + ["train.batch_size=18"]), synth_data / "train", stores / "train",
              tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_documented_torchrun_command(synth_data, stores, tmp_path):
    """docs/training.md's launch line, as a user types it (2 CPU processes), against one process."""
    args = ["train", "--data", str(synth_data / "train"), "--embeddings", str(stores / "train"), *CONFIG]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "lift_fast", "--", *args, "--run", str(tmp_path / "ddp"), "-q"],
                         check=True, capture_output=True, text=True, env=env, timeout=300)
    assert len(_json_objects(ddp.stdout)) == 2  # every rank prints its result line
    assert {result["step"] for result in _json_objects(ddp.stdout)} == {6}
    subprocess.run([sys.executable, "-m", "lift_fast", *args, "--run", str(tmp_path / "one"), "-q"],
                   check=True, capture_output=True, text=True, env=env, timeout=300)
    assert _metric(tmp_path / "ddp", "loss") == pytest.approx(_metric(tmp_path / "one", "loss"), rel=1e-5)


def _json_objects(text: str) -> list[dict]:
    """The JSON objects in the ranks' shared stdout (their lines may run together: one pipe, two writers)."""
    decoder, objects, at = json.JSONDecoder(), [], text.find("{")
    while at != -1:
        obj, end = decoder.raw_decode(text, at)
        objects.append(obj)
        at = text.find("{", end)
    return objects
