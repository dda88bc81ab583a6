"""The training step's feed: a loader's host batch -> device tensors, without a host sync (`DeviceFeed`).

The loader is built raw (build_loader(raw=True)): images as uint8 pixels [b, 3, H, W] (a quarter of
float32's bytes) and the text rows in the store's dtype (float16 by default: half of float32's).
DeviceFeed copies what is on the host to the device and prepares it there: the images normalised
(augment.normalize_images, in the step's compute dtype), the rows and token ids as they are (the
step casts the rows).

Why the copies take this path on CUDA: `.to(device, non_blocking=True)` from pageable memory is not
asynchronous. CUDA stages it through a driver buffer and the call returns only once the stream has
run everything queued before it: the host waits for the previous step at the start of every step.
From pinned (page-locked) memory the copy is a DMA the host only enqueues. So:

  - a tensor already pinned (the PIL loader's pin-memory thread pins whole batches) is copied from
    where it is; any other host tensor (the DALI feed's rows, token ids) is first written into one of
    two pinned buffers per field (double buffering: batch n+1 is written into the other buffer while
    the copy out of batch n's may still run);
  - the copies run on a side stream, so they wait for nothing queued on the step's stream, and an
    event recorded after them makes the step's stream wait on the GPU, not on the host;
  - every device tensor is marked with record_stream for the step's stream: it was allocated on the
    side stream, and the caching allocator must not hand its memory out again while the step still
    reads it;
  - before a pinned buffer is written again, the host waits for the event of the copy out of it two
    batches ago (long finished: nothing makes the side stream wait).

On a CPU-only machine the step runs on the CPU and nothing is copied (`staged=False`: the batch is
used where it is). `staged=True` with `pin=False` runs the buffer logic on the CPU (plain buffers,
no stream), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import contextlib

import torch

from lift_fast.data.augment import normalize_images

DEVICE_FIELDS = ("images", "text_embeddings", "tokens")  # the batch's tensors the step reads on the device
SLOTS = 2  # pinned buffers per field: one being written while the copy out of the other runs


class DeviceFeed:
    """Call it on each loader batch: returns the batch with its DEVICE_FIELDS on `device`, the images
    normalised in `image_dtype` ([b, 3, H, W]), text_embeddings [b, D] and tokens [b, T] in their host dtype.

    device: the training device. image_dtype: the step's compute dtype (the patch embedding casts to
    it under autocast anyway; float32 for fp32 training). staged: copy host tensors through the
    buffers (default: on CUDA; off on a CPU, where the batch is used as it is). pin: page-locked
    buffers (default: when CUDA is available; False keeps the same logic on plain memory).
    """

    def __init__(self, device: torch.device, *, image_dtype: torch.dtype = torch.float32,
                 staged: bool | None = None, pin: bool | None = None):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.image_dtype = image_dtype
        self.staged = cuda if staged is None else staged
        self.pin = torch.cuda.is_available() and self.staged if pin is None else pin
        self.stream = torch.cuda.Stream(self.device) if cuda and self.staged else None
        self.buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(SLOTS)]  # per slot: field -> flat buffer
        self.copied: list[torch.cuda.Event | None] = [None] * SLOTS  # per slot: the copy out of its buffers
        self.batches = 0

    def __call__(self, batch: dict) -> dict:
        moved = dict(batch)
        slot = self.batches % SLOTS
        self.batches += 1
        if self.staged:
            if self.copied[slot] is not None:
                self.copied[slot].synchronize()  # batch n-2's copy out of these buffers: done long ago
            on_side = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
            with on_side:
                for name in DEVICE_FIELDS:
                    if isinstance(batch.get(name), torch.Tensor):
                        moved[name] = self.to_device(name, batch[name], slot)
            copied = [moved[name] for name in DEVICE_FIELDS if name in batch and moved[name] is not batch[name]]
            if self.stream is not None:
                self.copied[slot] = self.stream.record_event()
                step_stream = torch.cuda.current_stream(self.device)
                step_stream.wait_event(self.copied[slot])  # the step's stream waits on the GPU, not the host
                for tensor in copied:  # allocated on the side stream, read on the step's
                    tensor.record_stream(step_stream)
        if moved["images"].dtype == torch.uint8:  # a raw loader's pixels; a non-raw one's are normalised already
            moved["images"] = normalize_images(moved["images"], self.image_dtype)
        return moved

    def to_device(self, name: str, host: torch.Tensor, slot: int) -> torch.Tensor:
        """`host` on the device: as it is when it is there already, else a copy from pinned memory."""
        if self.device.type != "cpu" and host.device.type == self.device.type and self.device.index in (
                None, host.device.index):  # e.g. DALI's images, decoded on the GPU ("cuda" is the current one)
            return host
        source = host if self.pin and host.is_pinned() else self.stage(name, host, slot)
        out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        self.copy(out, source)
        return out

    def stage(self, name: str, host: torch.Tensor, slot: int) -> torch.Tensor:
        """`host` written into field `name`'s buffer of `slot` (grown when too small): a view of it."""
        buffer = self.buffers[slot].get(name)
        if buffer is None or buffer.dtype != host.dtype or buffer.numel() < host.numel():
            buffer = torch.empty(host.numel(), dtype=host.dtype, pin_memory=self.pin)
            self.buffers[slot][name] = buffer
        view = buffer[:host.numel()].view(host.shape)
        view.copy_(host)
        return view

    def copy(self, out: torch.Tensor, source: torch.Tensor) -> None:
        """The one host-to-device copy of the feed: `source` (pinned, or a buffer of the staging path)."""
        out.copy_(source, non_blocking=self.pin)

    def is_buffer(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` lies in one of the feed's buffers (for checks and tests)."""
        return any(buffer.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
                   for slot in self.buffers for buffer in slot.values())
