"""The DALI feed overlapped with the step: `train()` end to end with a stand-in for a GPU step.

On a GPU the step's host part is short (kernel launches) and the rest is a wait on the device that
releases the GIL. The stand-in here is that: the trainer's own step on a 2-sample slice of the batch
(a 2-block vit_tiny at 64 px: milliseconds, so the loop's bookkeeping is the real one), then
time.sleep() up to a fixed step time. The batch itself is the loader's full batch: 64 photo-like
500x375 JPEGs read by offset from indexed shards, cropped and resized to 64 px by the DALI backend
on the CPU with 2 threads, joined with a 384-d store.

Two sides, each a whole train() run, in one process:

  baseline     build_loader(prefetch=0): the feed runs on the training thread when the loop asks
               for a batch (reads, caption hashes, headers, crop draws, DALI's outputs, the resize),
               so the loop waits the whole feed time per step;
  feed_thread  build_loader(prefetch=2): the same work on the feed thread, up to 2 batches ahead.

The step time is set above the feed's time per batch (measured first, synchronously): 1.5x it, at
least 60 ms. Reported from metrics.jsonl (the logged windows after the first, which holds start-up):
data_wait_seconds / step_seconds. Goal for the feed thread: under 5 %. The script's runs also hold
the GIL for 10 ms of each step (pure Python, as a step's kernel launches would) and time it: how
much the feed thread, which needs the GIL for its Python parts, slows the step's host part.

    pytest --benchmark bench/bench_feed.py      # the pair (pytest-benchmark), ratios in bench/results
    python bench/bench_feed.py [ROUNDS]         # both sides ROUNDS times, interleaved, and a table
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # image_shards, photos: run as a script too

IMAGES, BATCH, SIZE, THREADS, STEPS, LOG_EVERY = 1024, 64, 64, 2, 40, 5
WIDTH, HEIGHT = 500, 375
SIDES = {"baseline": 0, "feed_thread": 2}  # side -> build_loader prefetch
GOAL = 0.05
LAUNCH_S = 0.01  # the script's stand-in step also holds the GIL this long (a step's kernel launches)


def write_set(folder: Path) -> tuple[Path, Path]:
    from image_shards import write_image_shards

    return write_image_shards(folder, count=IMAGES, width=WIDTH, height=HEIGHT, dim=384)


def feed_seconds_per_batch(data: Path, store: Path, batches: int = 8) -> float:
    """The synchronous feed's time per batch (what the baseline's loop waits each step), after one batch
    of start-up."""
    from lift_fast.data import build_loader

    loader = build_loader(data, store, split="train", batch_size=BATCH, image_size=SIZE, backend="dali",
                          num_workers=THREADS, prefetch=0)
    stream = iter(loader)
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = (time.perf_counter() - start) / batches
    stream.close()
    return seconds


def python_work(iterations: int) -> None:
    """Pure Python that holds the GIL throughout: a stand-in for a step's kernel launches."""
    total = 0
    for i in range(iterations):
        total += i * i
    return total


def launch_iterations(seconds: float = 0.01) -> int:
    """How many python_work iterations take `seconds` on this machine, with no feed running."""
    began = time.perf_counter()
    python_work(200_000)
    return int(200_000 * seconds / (time.perf_counter() - began))


@contextlib.contextmanager
def stand_in_step(step_s: float, prefetch: int, launches: int, host_seconds: list[float]):
    """Patch lift_fast.train.loop and train.build for one run: its loader built with `prefetch`, and its step the
    trainer's own on 2 samples of the batch, `launches` iterations of GIL-holding Python (timed into
    `host_seconds`: how much the feed thread slows the step's host part), then a sleep (the GIL
    released) up to `step_s`."""
    from lift_fast.train import build as parts
    from lift_fast.train import loop

    real_step, real_build = loop._train_step, parts.build_loader

    def step(cfg, ctx, parts, progress, batch, *args, **kwargs):
        start = time.perf_counter()
        few = {**batch, "images": batch["images"][:2], "text_embeddings": batch["text_embeddings"][:2],
               "keys": batch["keys"][:2]}
        result = real_step(cfg, ctx, parts, progress, few, *args, **kwargs)
        launched = time.perf_counter()
        python_work(launches)
        host_seconds.append(time.perf_counter() - launched)
        time.sleep(max(0.0, step_s - (time.perf_counter() - start)))  # the device's share of the step
        return result

    def build(*args, **kwargs):
        return real_build(*args, **{**kwargs, "prefetch": prefetch})

    loop._train_step, parts.build_loader = step, build
    try:
        yield
    finally:
        loop._train_step, parts.build_loader = real_step, real_build


def run(data: Path, store: Path, run_dir: Path, prefetch: int, step_s: float, launches: int = 0) -> dict:
    """One train() run; returns the means over its logged windows after the first: step_seconds,
    data_wait_seconds, and their ratio data_wait_share; and launch_seconds, the mean time of the
    step's GIL-holding part (`launches` iterations) after the first 5 steps."""
    from image_shards import ENCODER

    from lift_fast.config import load_config
    from lift_fast.train.loop import train

    cfg = load_config(overrides=[
        "model.name=vit_tiny_patch16", "model.depth=2", f"data.image_size={SIZE}", "data.backend=dali",
        f"data.num_workers={THREADS}", f"train.batch_size={BATCH}", f"train.steps={STEPS}",
        f"train.log_every={LOG_EVERY}", "train.checkpoint_every=0", "train.tensorboard=false", "train.threads=1",
        "train.precision=fp32", "train.compile=off", f"embed.model={ENCODER}"])
    host_seconds: list[float] = []
    with stand_in_step(step_s, prefetch, launches, host_seconds):
        train(cfg, data, store, run_dir, progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    step = sum(r["step_seconds"] for r in records) / len(records)
    wait = sum(r["data_wait_seconds"] for r in records) / len(records)
    steady = host_seconds[LOG_EVERY:]
    return {"step_seconds": step, "data_wait_seconds": wait, "data_wait_share": wait / step,
            "launch_seconds": sum(steady) / len(steady)}


def step_time(feed_s: float) -> float:
    return max(0.06, 1.5 * feed_s)


# -- the pytest-benchmark pair --------------------------------------------------------------------

@pytest.fixture(scope="module")
def feed_set(tmp_path_factory):
    from lift_fast.data.dali import dali_available

    usable, why = dali_available()
    if not usable:
        pytest.skip(f"DALI is not usable: {why}")
    data, store = write_set(tmp_path_factory.mktemp("feed"))
    return data, store, step_time(feed_seconds_per_batch(data, store))


@pytest.mark.parametrize("side", list(SIDES))
def test_train_data_wait(paired_benchmark, side, feed_set, tmp_path):
    data, store, step_s = feed_set
    threads = torch.get_num_threads()
    runs = iter(range(100))
    results = []

    def one_run():
        results.append(run(data, store, tmp_path / f"run{next(runs)}", SIDES[side], step_s))

    try:
        pair = (f"train() {STEPS} steps, stand-in step {step_s * 1e3:.0f} ms, DALI feed batch {BATCH} "
                f"{WIDTH}x{HEIGHT} -> {SIZE}px, {THREADS} threads cpu")
        paired_benchmark(pair, one_run, rounds=2, warmup_rounds=0)
    finally:
        torch.set_num_threads(threads)
    share = sum(r["data_wait_share"] for r in results) / len(results)
    paired_benchmark.record(data_wait_share=share, data_wait_seconds=sum(r["data_wait_seconds"] for r in results)
                            / len(results))
    if side == "feed_thread":
        assert share < GOAL, f"data wait {share:.1%} of the step with the feed thread (goal < {GOAL:.0%})"


# -- python bench/bench_feed.py -------------------------------------------------------------------

def main(rounds: int) -> None:
    from machine import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        data, store = write_set(Path(tmp))
        feed_s = feed_seconds_per_batch(data, store)
        step_s = step_time(feed_s)
        launches = launch_iterations(LAUNCH_S)
        print(f"synchronous feed: {feed_s * 1e3:.1f} ms a batch of {BATCH}; stand-in step {step_s * 1e3:.0f} ms with "
              f"{LAUNCH_S * 1e3:.0f} ms of GIL-holding Python (measured alone); {STEPS} steps a run, windows of "
              f"{LOG_EVERY} after the first", flush=True)
        print(f"{'round':>5}  {'side':<12} {'step ms':>8} {'data wait ms':>13} {'wait / step':>12} {'launch ms':>10}")
        shares: dict[str, list[float]] = {side: [] for side in SIDES}
        for number in range(rounds):
            for side, prefetch in SIDES.items():
                result = run(data, store, Path(tmp) / f"run-{side}-{number}", prefetch, step_s, launches)
                shares[side].append(result["data_wait_share"])
                print(f"{number:>5}  {side:<12} {result['step_seconds'] * 1e3:>8.1f} "
                      f"{result['data_wait_seconds'] * 1e3:>13.2f} {result['data_wait_share']:>11.1%} "
                      f"{result['launch_seconds'] * 1e3:>10.1f}", flush=True)
        for side, values in shares.items():
            print(f"{side}: data wait {min(values):.1%}..{max(values):.1%} of the step (mean {sum(values) / len(values):.1%})")
        print(json.dumps(machine_info()))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
