"""The feed of a GPU node (issue 17 item 3): uint8 images and store-dtype rows from the loaders, one
normalisation (augment.normalize_images) for every consumer, the training step's copies through pinned
double buffers (DeviceFeed, its logic checked here on the CPU with plain buffers), the DALI threads'
auto count, and the warning when `auto` falls back to PIL on a GPU node."""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lift_fast.config import ConfigError, load_config
from lift_fast.data import build_loader
from lift_fast.data import loader as loader_module
from lift_fast.data.augment import CLIP_MEAN, CLIP_STD, normalize_images, to_tensor
from lift_fast.data.dali import dali_available
from lift_fast.train import feed as feed_module
from lift_fast.train import loop as loop_module
from lift_fast.train.feed import DeviceFeed
from lift_fast.train.loop import train

needs_dali = pytest.mark.skipif(not dali_available()[0], reason=f"DALI is not usable here: {dali_available()[1]}")


# -- one normalisation -------------------------------------------------------------------------------

def test_normalize_images_is_the_pil_loaders_float32_bit_for_bit_and_casts_after():
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (5, 3, 7, 9), dtype=np.uint8))
    # what the PIL loader computed per sample before it shipped uint8
    expected = (pixels.numpy().astype(np.float32) / 255.0 - np.array(CLIP_MEAN, np.float32)[:, None, None]) \
        / np.array(CLIP_STD, np.float32)[:, None, None]
    assert torch.equal(normalize_images(pixels), torch.from_numpy(expected))
    half = normalize_images(pixels, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, torch.from_numpy(expected).to(torch.bfloat16))
    image = Image.fromarray(pixels[0].permute(1, 2, 0).numpy())
    assert torch.equal(to_tensor(image), normalize_images(pixels[0]))  # the eval view goes the same way
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(pixels.float())


def test_normalising_into_bf16_a_few_images_at_a_time_gives_the_whole_batchs_values(monkeypatch):
    from lift_fast.data import augment

    pixels = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (11, 3, 6, 5), dtype=np.uint8))
    whole = normalize_images(pixels, torch.bfloat16)
    monkeypatch.setattr(augment, "NORMALIZE_CHUNK", 3 * pixels[0].numel() + 1)  # 3 images a chunk, 11 in all
    assert torch.equal(normalize_images(pixels, torch.bfloat16), whole)
    assert torch.equal(whole, normalize_images(pixels).to(torch.bfloat16))


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_a_raw_loader_ships_uint8_and_float16_that_normalise_to_the_loaders_batches(synth_data, stores, backend,
                                                                                      split):
    def batches(raw: bool) -> list[dict]:
        loader = build_loader(synth_data / "eval", stores / "eval", split=split, batch_size=7, image_size=32,
                              backend=backend, num_workers=0, raw=raw)
        return [batch for batch, _ in zip(loader, range(3))]

    for raw, normalised in zip(batches(True), batches(False)):
        assert raw["keys"] == normalised["keys"]
        assert raw["images"].dtype == torch.uint8 and raw["text_embeddings"].dtype == torch.float16
        assert normalised["images"].dtype == torch.float32 and normalised["text_embeddings"].dtype == torch.float32
        assert torch.equal(normalize_images(raw["images"]), normalised["images"])
        assert torch.equal(raw["text_embeddings"].float(), normalised["text_embeddings"])


@needs_dali
@pytest.mark.parametrize("resample", ["dali", "torch"])
def test_the_dali_decoders_uint8_output_normalises_to_its_float_output(synth_data, resample):
    """Both DALI graphs end in uint8 pixels; a float dtype is normalize_images of them, on the output device."""
    from shard_tools import read_members

    from lift_fast.data.dali import DaliDecoder, DecodeJob
    from lift_fast.data.shards import list_shards

    images = [data for name, data in read_members(list_shards(synth_data / "eval")[0]) if name.endswith(".jpg")][:5]
    sizes = [Image.open(io.BytesIO(data)).size for data in images]
    job = DecodeJob([np.frombuffer(data, dtype=np.uint8) for data in images],
                    np.array([(1, 2, w - 3, h - 2) for w, h in sizes]), np.arange(5) % 2 == 1, [f"k{i}" for i in range(5)])
    (pixels,) = DaliDecoder(24, 5, device_id=None, num_threads=1, dtype=torch.uint8, resample=resample).run([job])
    (normalised,) = DaliDecoder(24, 5, device_id=None, num_threads=1, resample=resample).run([job])
    assert pixels.dtype == torch.uint8 and pixels.shape == (5, 3, 24, 24)
    assert torch.equal(normalize_images(pixels), normalised)


# -- DeviceFeed: pinned double buffers (their logic, on the CPU) -----------------------------------

def host_batch(seed: int, size: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    return {"images": torch.from_numpy(rng.integers(0, 256, (size, 3, 8, 8), dtype=np.uint8)),
            "text_embeddings": torch.from_numpy(rng.standard_normal((size, 5)).astype(np.float16)),
            "tokens": torch.from_numpy(rng.integers(0, 99, (size, 4))), "keys": [str(i) for i in range(size)],
            "skipped": 0}


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_the_staging_path_copies_through_two_buffers_and_never_hands_out_a_buffer():
    feed = DeviceFeed(torch.device("cpu"), image_dtype=torch.bfloat16, staged=True, pin=False)
    hosts = [host_batch(seed) for seed in range(4)]
    fed = [feed(batch) for batch in hosts]
    slot_buffers = [{name: storage(buffer) for name, buffer in slot.items()} for slot in feed.buffers]
    assert slot_buffers[0].keys() == slot_buffers[1].keys() == {"images", "text_embeddings", "tokens"}
    assert not set(slot_buffers[0].values()) & set(slot_buffers[1].values())  # two buffers per field
    for host, out in zip(hosts, fed):  # batches 0 and 1 were not overwritten by 2 and 3 (same buffers)
        assert out["images"].dtype == torch.bfloat16
        assert torch.equal(out["images"], normalize_images(host["images"], torch.bfloat16))
        assert out["text_embeddings"].dtype == torch.float16  # the store's dtype: cast by the step
        assert torch.equal(out["text_embeddings"], host["text_embeddings"]) and torch.equal(out["tokens"], host["tokens"])
        assert out["keys"] == host["keys"]
        for name in ("text_embeddings", "tokens"):
            assert not feed.is_buffer(out[name]) and storage(out[name]) != storage(host[name])
    smaller = feed(host_batch(9, size=3))  # a short batch reuses the buffers (views of their front)
    assert torch.equal(smaller["tokens"], host_batch(9, size=3)["tokens"])
    assert [{name: storage(buffer) for name, buffer in slot.items()} for slot in feed.buffers] == slot_buffers


def test_on_a_cpu_run_the_batch_is_used_where_it_is():
    feed = DeviceFeed(torch.device("cpu"))
    assert not feed.staged and not feed.pin and feed.stream is None
    host = host_batch(0)
    out = feed(host)
    assert out["text_embeddings"] is host["text_embeddings"] and out["tokens"] is host["tokens"]
    assert torch.equal(out["images"], normalize_images(host["images"]))


class StreamLog:
    """Stand-ins for torch.cuda's streams and events that log what DeviceFeed does with them."""

    def __init__(self, monkeypatch):
        self.log, self.current, self.events = [], ["step"], 0
        log = self.log

        class Event:
            def __init__(self, number: int):
                self.number = number

            def synchronize(self):
                log.append(("host waits", self.number))

        class Stream:
            def __init__(stream, device=None, name="side"):
                stream.name = name

            def record_event(stream):
                self.events += 1
                log.append(("event", stream.name, self.events))
                return Event(self.events)

            def wait_event(stream, event):
                log.append(("stream waits", stream.name, event.number))

        @contextlib.contextmanager
        def on(stream):
            self.current.append(stream.name)
            try:
                yield
            finally:
                self.current.pop()

        step = Stream(name="step")
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", on)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: step)
        monkeypatch.setattr(torch.Tensor, "record_stream",
                            lambda tensor, stream: log.append(("record_stream", stream.name, tuple(tensor.shape))))
        copy = DeviceFeed.copy
        monkeypatch.setattr(DeviceFeed, "copy", lambda feed, out, source: (
            log.append(("copy", self.current[-1], out.device.type, tuple(out.shape))), copy(feed, out, source)))


def test_on_cuda_the_copies_run_on_a_side_stream_that_the_step_waits_for_on_the_device(monkeypatch):
    """The CUDA protocol, with fake CUDA tensors and logged stand-ins for streams and events (no GPU
    here): copies on the side stream, an event after them that the step's stream waits on, every
    copied tensor marked for the step's stream, and a buffer rewritten only after the host waited
    for the copy out of it two batches before. A tensor already on the GPU (DALI's images) stays."""
    streams = StreamLog(monkeypatch)
    host = host_batch(0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        feed = DeviceFeed(torch.device("cuda"), image_dtype=torch.bfloat16, pin=False)
        outs = [feed(host) for _ in range(3)]
        on_gpu = feed({**host, "images": torch.zeros(6, 3, 8, 8, dtype=torch.uint8, device="cuda")})
    assert feed.staged and outs[0]["images"].device.type == "cuda" and outs[0]["images"].dtype == torch.bfloat16
    assert outs[0]["text_embeddings"].device.type == "cuda" and outs[0]["text_embeddings"].dtype == torch.float16
    fields = [(6, 3, 8, 8), (6, 5), (6, 4)]
    one_batch = lambda event: [*(("copy", "side", "cuda", shape) for shape in fields), ("event", "side", event),
                               ("stream waits", "step", event), *(("record_stream", "step", shape) for shape in fields)]
    assert streams.log == [*one_batch(1), *one_batch(2), ("host waits", 1), *one_batch(3), ("host waits", 2),
                           ("copy", "side", "cuda", (6, 5)), ("copy", "side", "cuda", (6, 4)), ("event", "side", 4),
                           ("stream waits", "step", 4), ("record_stream", "step", (6, 5)), ("record_stream", "step", (6, 4))]
    assert on_gpu["images"].dtype == torch.bfloat16


class HostReads(TorchDispatchMode):
    """Every op that reads a tensor sharing storage with one of `hosts` (the loader's batches)."""

    def __init__(self, hosts: set[int]):
        super().__init__()
        self.hosts, self.reads = hosts, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for position, arg in enumerate(tree_leaves((args, kwargs or {}))):
            if isinstance(arg, torch.Tensor) and arg.numel() and storage(arg) in self.hosts:
                self.reads.append((func, position, args))
        return func(*args, **(kwargs or {}))


def test_every_host_tensor_a_training_step_copies_comes_from_the_pinned_buffer_path(synth_data, stores, tmp_path,
                                                                                   monkeypatch):
    """The whole loop on the CPU with the feed's staging switched on (pin=False: no CUDA here): the
    loader's host tensors are read by nothing but the copy into a feed buffer, and every copy to the
    device reads a buffer. Fails when the step takes a batch tensor as the loader gave it."""
    hosts, sources, feeds = set(), [], []

    class Recording(DeviceFeed):
        def __init__(self, device, **kwargs):
            super().__init__(device, **{**kwargs, "staged": True, "pin": False})
            feeds.append(self)

        def __call__(self, batch):
            kept.append(batch)  # alive until the end: their memory is not reused by other tensors
            hosts.update(storage(batch[name]) for name in feed_module.DEVICE_FIELDS if name in batch)
            return super().__call__(batch)

        def copy(self, out, source):
            sources.append(source)
            super().copy(out, source)

    kept: list[dict] = []
    monkeypatch.setattr(loop_module, "DeviceFeed", Recording)
    cfg = load_config(overrides=["data.image_size=32", "model.depth=1", "train.steps=3", "train.batch_size=8",
                                 "train.warmup_steps=1", "data.num_workers=0", "data.backend=pil",
                                 "train.checkpoint_every=0"])
    with HostReads(hosts) as mode:
        train(cfg, synth_data / "train", stores / "train", tmp_path / "run", progress=False)
    (feed,) = feeds
    assert len(kept) == 3 and len(sources) == 3 * 2  # images and rows of three steps
    assert all(feed.is_buffer(source) for source in sources)
    stray = [(str(func), position) for func, position, args in mode.reads
             if not (func is torch.ops.aten.copy_.default and position == 1 and feed.is_buffer(args[0]))]
    assert mode.reads and not stray, f"ops reading the loader's host tensors, not into a feed buffer: {stray}"


# -- how many threads, and which loader ------------------------------------------------------------

def test_num_workers_auto_is_this_ranks_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(loader_module.os, "sched_getaffinity", lambda pid: set(range(112)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_module.worker_count("auto", dali=True) == 14  # DALI threads: the GPU's share of the cores
    assert loader_module.worker_count("auto", dali=False) == 13  # PIL workers: one core left to the step
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader_module.worker_count("auto", dali=True) == 112
    monkeypatch.setattr(loader_module.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert loader_module.worker_count("auto", dali=False) == loader_module.worker_count("auto", dali=True) == 1
    assert loader_module.worker_count(0, dali=False) == 0 and loader_module.worker_count(5, dali=True) == 5
    with pytest.raises(ConfigError, match="data.num_workers"):
        loader_module.worker_count("many", dali=True)


def test_num_workers_config_takes_auto_and_counts(tmp_path):
    assert load_config().data.num_workers == "auto"
    assert load_config(overrides=["data.num_workers=3"]).data.num_workers == 3
    (tmp_path / "run.yaml").write_text("data:\n  num_workers: 2\n")
    assert load_config(tmp_path / "run.yaml").data.num_workers == 2
    for bad in ("many", "-1"):
        with pytest.raises(ConfigError, match="data.num_workers"):
            load_config(overrides=[f"data.num_workers={bad}"])


@pytest.fixture
def gpu_node_without_dali(monkeypatch):
    """As on a CUDA 12 node with the cu130 wheel: torch sees a GPU, nvidia.dali does not import."""
    from lift_fast.data import dali

    why = "import nvidia.dali failed: ImportError: libcudart.so.13: cannot open shared object file"
    monkeypatch.setattr(dali, "dali_available", lambda device_id=None: (False, why))
    monkeypatch.setattr(loader_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loader_module, "_cuda_device", lambda: 0)
    monkeypatch.setattr(loader_module, "_cuda_driver_major", lambda: 12)
    return why


def test_auto_falling_back_to_pil_on_a_gpu_node_is_a_warning_naming_why_and_what_to_install(gpu_node_without_dali,
                                                                                             caplog):
    with caplog.at_level(logging.INFO, logger=loader_module.__name__):
        assert loader_module._resolve_backend("auto") is False
    (record,) = [r for r in caplog.records if "data.backend" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert gpu_node_without_dali in record.getMessage() and "pip install nvidia-dali-cuda120" in record.getMessage()
    with pytest.raises(ConfigError, match="libcudart.so.13.*nvidia-dali-cuda120"):
        loader_module._resolve_backend("dali")


def test_auto_falling_back_to_pil_without_a_gpu_stays_info(monkeypatch, caplog):
    from lift_fast.data import dali

    monkeypatch.setattr(dali, "dali_available", lambda device_id=None: (False, "import nvidia.dali failed"))
    monkeypatch.setattr(loader_module.torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger=loader_module.__name__):
        assert loader_module._resolve_backend("auto") is False
    assert [r.levelno for r in caplog.records if "data.backend" in r.getMessage()] == [logging.INFO]
