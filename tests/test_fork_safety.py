"""No DALI state survives into a forked PIL worker (issue 14): DALI and PIL loaders, good and corrupt
data, one after another in one process, never hang.

The sequences run in a subprocess under a timeout, so a regression fails the test instead of hanging
CI: before the fix the fourth loop of "dali, pil, dali on a corrupt JPEG, pil" waited forever in the
worker, which ran a garbage-collected DALI pipeline's __del__ against threads it does not have.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref

import pytest
from shard_tools import read_members, write_members

from lift_fast.data import build_loader
from lift_fast.data.dali import DaliDecoder, DecodeJob, ImageDecodeError, dali_available
from lift_fast.data.loader import worker_start_method
from lift_fast.data.shards import list_shards

pytestmark = pytest.mark.skipif(not dali_available()[0], reason=f"DALI is not usable here: {dali_available()[1]}")

TIMEOUT_S = 120

# Runs in a fresh interpreter: argv = good folder, corrupt folder, store, then "backend:good|bad" items.
SEQUENCE = """
import json, sys
import torch
torch.set_num_threads(1)
from lift_fast.data import build_loader
from lift_fast.data.shards import ShardError

good, bad, store, *items = sys.argv[1:]
results = []
for item in items:
    backend, which = item.split(":")
    loader = build_loader(good if which == "good" else bad, store, split="eval", batch_size=5, image_size=32,
                          backend=backend, num_workers=1)
    try:
        results.append([item, sum(len(batch["keys"]) for batch in loader)])
    except ShardError as error:
        results.append([item, str(error)])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def corrupt_eval(synth_data, tmp_path_factory):
    """The eval shards with sample eval-00000005's JPEG cut in half: DALI itself fails on it."""
    out = tmp_path_factory.mktemp("corrupt") / "eval"
    for shard in list_shards(synth_data / "eval"):
        members = [(name, data[: len(data) // 2] if name == "eval-00000005.jpg" else data)
                   for name, data in read_members(shard)]
        write_members(out / shard.name, members)
    return out


def run_sequence(synth_data, stores, corrupt_eval, items: list[str]) -> list:
    args = [sys.executable, "-c", SEQUENCE, str(synth_data / "eval"), str(corrupt_eval), str(stores / "eval"), *items]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{' -> '.join(items)} hung for {TIMEOUT_S} s (a DALI pipeline in a forked worker?): "
                             f"{(err.stderr or b'')[-2000:]!r}") from None
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("items", [["dali:good", "pil:good", "dali:bad", "pil:bad"],
                                   ["pil:bad", "dali:bad", "pil:good", "dali:good"]], ids=["issue-order", "reverse"])
def test_dali_and_pil_loaders_in_one_process_never_hang(synth_data, stores, corrupt_eval, items):
    results = dict(run_sequence(synth_data, stores, corrupt_eval, items))
    for item, result in results.items():
        if item.endswith(":good"):
            assert result == 32, (item, result)
        else:  # the corrupt sample is named, on both backends
            assert "'eval-00000005'" in result and "00000.tar" in result and "cannot be decoded" in result, (item, result)


def test_a_dropped_decoder_shuts_its_pipeline_down_without_the_garbage_collector(synth_data):
    """No decoder <-> pipeline cycle: dropping the last reference ends the pipeline at once."""
    gc.disable()
    try:
        decoder = DaliDecoder(32, 4, device_id=None, num_threads=1)
        jobs = [job_of(synth_data, 4)]
        assert len(list(decoder.run(jobs))) == 1
        pipe = weakref.ref(decoder._pipe)
        del decoder
        assert pipe() is None, "the DALI pipeline outlived its decoder: something holds a reference cycle"
    finally:
        gc.enable()


def test_a_failed_run_shuts_its_pipeline_down_even_while_its_error_is_held(synth_data):
    decoder = DaliDecoder(32, 4, device_id=None, num_threads=1)
    job = job_of(synth_data, 4)
    job.encoded[2] = job.encoded[2][: len(job.encoded[2]) // 2]  # DALI fails on it (PIL finds it)
    list(decoder.run([job_of(synth_data, 4)]))
    first = decoder._pipe
    with pytest.raises(ImageDecodeError) as held:
        list(decoder.run([job]))
    assert held.value.key == job.keys[2]
    # the error's traceback holds the failed run's frames, and with them the pipeline object: its
    # DALI side must be shut down all the same, not left to the garbage collector
    assert first._pipe is None and decoder._pipe is None
    assert worker_start_method() is None  # nothing of DALI is alive, so PIL workers may fork


def test_pil_workers_do_not_fork_while_a_dali_pipeline_is_alive(synth_data, stores):
    dali_batches = iter(build_loader(synth_data / "eval", stores / "eval", split="eval", batch_size=5,
                                     image_size=32, backend="dali"))
    first = next(dali_batches)  # a pipeline is running, with its threads
    assert worker_start_method() == "forkserver"
    pil = build_loader(synth_data / "eval", stores / "eval", split="eval", batch_size=5, image_size=32,
                       backend="pil", num_workers=1)
    assert pil.data.multiprocessing_context is not None
    assert [k for b in pil for k in b["keys"]][:5] == first["keys"]
    assert sum(len(b["keys"]) for b in dali_batches) == 32 - 5


def job_of(synth_data, count: int) -> DecodeJob:
    """A DecodeJob of the first `count` eval JPEGs, each decoded whole."""
    import io

    import numpy as np
    from PIL import Image

    images = [data for name, data in read_members(list_shards(synth_data / "eval")[0]) if name.endswith(".jpg")][:count]
    sizes = [Image.open(io.BytesIO(data)).size for data in images]
    return DecodeJob([np.frombuffer(data, dtype=np.uint8) for data in images],
                     np.array([(0, 0, w, h) for w, h in sizes]), np.zeros(count, dtype=bool),
                     [f"key{i}" for i in range(count)])
