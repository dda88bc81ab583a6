"""Peak memory of one training step, measured by running it: the real model (models/vit.py), the
real loss (lift_fast.kernels, as train/build.py builds it), AdamW, gradient clipping and the feed's
device buffers, on fake tensors (FakeTensorMode: shapes and dtypes, no storage) or on real ones.

The bytes are counted by a dispatch mode (StepTracker, after torch's MemTracker) that sees every
tensor an op creates and forgets it when its storage is freed (weakref callbacks): the peak of the
bytes alive over a steady step (AdamW's state made beforehand by its own step on zero gradients).
Nothing is a formula. What it cannot see, it is told: the weights and the feed's buffers are
registered with it, and the loss's custom ops (lift_fast::clip_forward, ...), whose fake kernels
give only their outputs, run their real implementation under it, so their slabs count too.

Rules: `cuda` runs the step on CPU tensors under CUDA's autocast policy (plan/autocast_rules.py;
the CUDA backward cannot run without a driver; the caching allocator's 512-byte rounding is left
out: under 1 MB over a step's few thousand tensors); `cpu` runs it as the trainer runs on a CPU (fp32, or bf16 CPU autocast
for train.precision=bf16), which tests/test_plan.py checks against the CPU allocator's own peak.
Under `world_size` > 1 a fake process group (torch's FakeProcessGroup) stands in for the others:
the loss gathers N = world_size x batch texts as it would. Gradient all-reduce is not simulated:
DDP with gradient_as_bucket_view keeps the gradients in its buckets, adding nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from torch._library.custom_ops import OPDEFS
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from lift_fast.config import Config
from lift_fast.plan.autocast_rules import cuda_autocast_rules

RULES = ("cuda", "cpu")


class StepTracker(TorchDispatchMode):
    """The bytes of the tensor storages alive, and their peak, while open.

    Every storage an op returns is counted once, until its Python object is freed (a weakref
    callback), as torch's MemTracker does (torch.distributed._tools.mem_tracker), without its
    per-module snapshots, which cost most of a step's time here. lift_fast's custom ops (the
    loss) run their real implementation under the tracker, so their temporaries count too.
    """

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def track(self, *tensors: torch.Tensor) -> None:
        """Count the storages of `tensors` (made before the tracker opened: weights, state, buffers)."""
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen[storage] = nbytes
            weakref.finalize(storage, self._free, nbytes)
            self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        opdef = OPDEFS.get(func._schema.name) if func.namespace == "lift_fast" else None
        if opdef is not None:
            with self:  # a nested entry: the implementation's ops come back here
                return opdef._init_fn(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        self.track(*(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)))
        return out


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """A fake process group of `world_size` ranks (this process is rank 0) while open; nothing when 1.

    Raises RuntimeError when a process group already exists (the planner runs outside torchrun;
    train/build.py starts it in a fresh interpreter there).
    """
    import torch.distributed as dist

    if world_size == 1:
        yield
        return
    if dist.is_initialized():
        raise RuntimeError("the planner simulates the other ranks with a fake process group, and this process already "
                           "has a process group; run it outside torchrun")
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@dataclasses.dataclass
class StepMemory:
    """One measurement: peak bytes of a steady training step and what is resident through it."""

    batch: int  # local batch (images per GPU)
    policy: str  # model.grad_checkpointing the model was built with
    blocks: int  # model.grad_checkpointing_blocks (0: all)
    rest: str  # model.grad_checkpointing_rest
    rules: str  # cuda or cpu
    peak_bytes: int
    parameters_bytes: int
    optimizer_bytes: int  # AdamW state
    feed_bytes: int  # the feed's device buffers
    allocator_peak_bytes: int | None = None  # real tensors only: the CPU allocator's peak over the same step

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30


def _feed_buffers(cfg: Config, batch: int, dim: int, rules: str, device: torch.device) -> tuple[list, list]:
    """What the feed holds on the device: 1 + data.prefetch batches of uint8 images [B, 3, H, W] and
    of the store's fp16 text rows [B, D] (the batch being trained on and those prepared ahead).
    Under CPU rules the loader hands over float32 images and rows, one batch at a time."""
    size = cfg.data.image_size
    if rules == "cpu":
        return [torch.rand(batch, 3, size, size, device=device)], [torch.randn(batch, dim, device=device)]
    count = 1 + cfg.data.prefetch
    images = [torch.zeros(batch, 3, size, size, dtype=torch.uint8, device=device) for _ in range(count)]
    texts = [torch.zeros(batch, dim, dtype=torch.float16, device=device) for _ in range(count)]
    return images, texts


def measure_step(cfg: Config, batch: int, dim: int, *, policy: str, blocks: int = 0, rest: str = "none",
                 world_size: int = 1, rules: str = "cuda", fake: bool = True) -> StepMemory:
    """Peak memory of one steady training step (AdamW's state already made) at `batch` images on this rank.

    cfg: the run's config (model, data.image_size, data.prefetch, train.loss/optimizer settings,
    model.fuse_projection); dim: the text embedding width; policy: none, selective or full, on the
    first `blocks` blocks (0: all) and `rest` (none or selective) on the others;
    world_size: ranks of the job (the loss sees world_size x batch texts); rules: cuda (CUDA autocast
    in bf16 unless train.precision=fp32, 512-byte blocks) or cpu (as the trainer runs on a CPU);
    fake: fake tensors (no memory used, any batch) or real CPU tensors (for the check against the
    allocator). Returns a StepMemory. Raises ValueError for unknown rules or policy, and what
    build_model raises for a bad model config (ConfigError).
    """
    from lift_fast.models.vit import CHECKPOINT_POLICIES, build_model
    from lift_fast.train.build import build_loss
    from lift_fast.train.optim import build_optimizer

    if rules not in RULES:
        raise ValueError(f"rules must be one of {', '.join(RULES)}, got {rules!r}")
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"policy must be one of {', '.join(CHECKPOINT_POLICIES)}, got {policy!r}")
    if rules == "cuda":
        precision = None if cfg.train.precision == "fp32" else torch.bfloat16
    else:
        precision = torch.bfloat16 if cfg.train.precision == "bf16" else None
    model_cfg = dataclasses.replace(cfg.model, grad_checkpointing=policy, grad_checkpointing_blocks=blocks,
                                    grad_checkpointing_rest=rest, attention="sdpa" if
                                    cfg.model.attention in ("auto", "flash") else cfg.model.attention)
    device = torch.device("cpu")
    fake_mode = FakeTensorMode() if fake else contextlib.nullcontext()
    autocast_rules = cuda_autocast_rules() if rules == "cuda" and precision is not None else contextlib.nullcontext()
    with fake_process_group(world_size), fake_mode, autocast_rules:
        torch.manual_seed(0)
        if fake:  # built on the meta device (the init's random draws are data-dependent), then given fake storage
            with torch.device("meta"):
                model = build_model(model_cfg, cfg.data.image_size, dim, cfg.train.logit_scale_init)
            model = on_fake_storage(model)
        else:
            model = build_model(model_cfg, cfg.data.image_size, dim, cfg.train.logit_scale_init)
        if cfg.train.loss == "siglip":
            model.register_parameter("logit_bias", torch.nn.Parameter(torch.tensor(-10.0)))
        model.train()
        optimizer = build_optimizer(model, cfg.train)
        loss_fn = build_loss(cfg, SimpleNamespace(rank=0, world_size=world_size, enabled=world_size > 1), model)
        feed_images, feed_texts = _feed_buffers(cfg, batch, dim, rules, device)
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # OpenAI CLIP's, as data/ uses
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        compute = precision or torch.float32

        def step() -> None:
            images = feed_images[0]
            if images.dtype == torch.uint8:  # normalised on the device, in the compute dtype
                images = images.to(compute).div_(255).sub_(mean.to(compute)).div_(std.to(compute))
            with torch.autocast("cpu", dtype=compute, enabled=precision is not None):
                features = model(images, project=not cfg.model.fuse_projection)
            loss = loss_fn(features.to(compute), feed_texts[0].to(compute), model.logit_scale.exp(),
                           getattr(model, "logit_bias", None))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip, foreach=True)
            optimizer.step()

        # AdamW makes its state in its first step: one step on zero gradients, outside the tracker,
        # so that the tracked step is a steady one. Its gradients stay, as the previous step's do
        # in the trainer until the zero_grad after the forward (train/loop.py).
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        optimizer.step()
        tracker = StepTracker()
        # real tensors: the allocator's own count over the same step, for the check (_allocator_peak)
        with _memory_profiler(not fake) as profiler:
            if not fake:  # real kernels make their caches (oneDNN primitives, thread scratch) in their first call
                step()
            state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
            tracker.track(*model.parameters(), *(p.grad for p in model.parameters()), *model.buffers(), *state,
                          *feed_images, *feed_texts, mean, std)
            resident = tracker.current
            with _span(not fake), tracker:
                step()
        allocator_peak = None if fake else resident + _allocator_peak(profiler)
        return StepMemory(batch=batch, policy=policy, blocks=blocks, rest=rest, rules=rules, peak_bytes=tracker.peak,
                          parameters_bytes=_nbytes(model.parameters()), optimizer_bytes=_nbytes(state),
                          feed_bytes=_nbytes([*feed_images, *feed_texts]), allocator_peak_bytes=allocator_peak)


_SPAN = "lift_fast::measured_step"


def _memory_profiler(enabled: bool):
    """torch's profiler recording the CPU allocator's [memory] events while open, when `enabled`."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], profile_memory=True)


def _span(enabled: bool):
    """Marks the measured step in the profile (_allocator_peak reads its start and end)."""
    from torch.profiler import record_function

    return record_function(_SPAN) if enabled else contextlib.nullcontext()


def _allocator_peak(profiler) -> int:
    """The CPU allocator's peak over the measured step, above what it held when the step began: the
    running sum of the profiler's [memory] events, taken over the step's span.

    The profiler opens before the warm-up step because it drops the frees of blocks allocated before
    it started: the warm-up's gradients, freed by the measured step's zero_grad(set_to_none=True),
    would otherwise stay in the sum through the backward (the parameters' bytes counted twice there:
    under full recompute, whose peak is in the backward, the check read the tracker 13-16 % low)."""
    events = sorted(profiler.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    span = next(e for e in events if e.name() == _SPAN)
    current = peak = start = 0
    for event in events:
        if event.start_ns() > span.end_ns():
            break
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU:
            if event.start_ns() < span.start_ns():
                start = current = current + event.nbytes()
                peak = start
            else:
                current += event.nbytes()
                peak = max(peak, current)
    return peak - start


def on_fake_storage(model: torch.nn.Module, device: str = "cpu") -> torch.nn.Module:
    """Give every meta parameter and buffer of `model` an uninitialised tensor on `device`, made under
    the active FakeTensorMode (a meta-built model; fake init draws would be data-dependent). Returns model."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            module._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device),
                                                         param.requires_grad)
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
    return model


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
