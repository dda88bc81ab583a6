"""Padding-free batches and rows that reach the host without a wait per batch.

    inputs = packed_inputs(batch_ids, device, skip=0)       # input_ids, position_ids [1, T]; segments [T] ...
    hidden = model(input_ids=..., position_ids=...)          # no attention mask: transformers reads the packing
    rows = pool_packed(hidden[0], inputs, "mean")            # [n, D] float32, one per caption

A packed batch lays its captions end to end in one sequence of T tokens with position ids that start
again at 0 for every caption; transformers (5.x, masking_utils.find_packed_sequence_indices) turns
those into a block-diagonal mask for sdpa and eager attention (a T x T mask: exact, but attention
costs T^2) and into flash-attention's variable-length call (cu_seqlens, no mask, no T^2) on CUDA
with flash_attention_2. No padding token is run. Whether a model honours packed position ids is
measured, not assumed (`packing_works`): a model whose forward ignores them (NV-Embed-v2's
bidirectional Mistral builds its own mask) gives other rows, and the encoder falls back to
exact-length batches (lift_fast.embed.batching.plan_exact).

HostRows gathers the rows of one encode call: each batch's rows are copied into one pinned host
buffer with non_blocking copies (CUDA), and the host waits once, when the rows are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Rows of the packed probe must agree with the same captions run one by one to this cosine.
PROBE_COSINE = 0.9999


@dataclass
class PackedInputs:
    """One packed batch on the device."""

    model_inputs: dict[str, torch.Tensor]  # input_ids, position_ids [1, T]
    segments: torch.Tensor  # [T] int64: the caption (0..n-1) of each token
    starts: torch.Tensor  # [n] int64: first token of each caption
    lengths: torch.Tensor  # [n] int64
    pool_mask: torch.Tensor  # [T] bool: tokens the mean counts (all but the first `skip` of each caption)
    tokens: int


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`, copied from pinned memory without blocking the host on CUDA."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def packed_inputs(batch_ids: list[list[int]], device: torch.device, skip: int = 0) -> PackedInputs:
    """The captions `batch_ids` (n token id lists) as one packed sequence of T = sum of lengths tokens.

    skip: leading tokens of each caption the pooling leaves out (NV-Embed's instruction mask).
    """
    lengths = np.fromiter((len(seq) for seq in batch_ids), dtype=np.int64, count=len(batch_ids))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total = int(lengths.sum())
    input_ids = np.fromiter((t for seq in batch_ids for t in seq), dtype=np.int64, count=total)
    segments = np.repeat(np.arange(len(batch_ids), dtype=np.int64), lengths)
    positions = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
    return PackedInputs(
        model_inputs={"input_ids": _to_device(input_ids[None], device), "position_ids": _to_device(positions[None], device)},
        segments=_to_device(segments, device), starts=_to_device(starts, device), lengths=_to_device(lengths, device),
        pool_mask=_to_device(positions >= skip, device), tokens=total)


def pool_packed(hidden: torch.Tensor, inputs: PackedInputs, pooling: str) -> torch.Tensor:
    """Pool the token states of a packed batch: hidden [T, D] -> [n, D] float32, by `mean` (over the
    pool mask), `cls` (each caption's first token) or `last` (its last token)."""
    if pooling == "mean":
        weights = inputs.pool_mask.to(torch.float32)
        count = inputs.lengths.shape[0]
        sums = torch.zeros((count, hidden.shape[-1]), dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, inputs.segments, hidden.float() * weights.unsqueeze(-1))
        totals = torch.zeros(count, dtype=torch.float32, device=hidden.device).index_add_(0, inputs.segments, weights)
        return sums / totals.clamp(min=1.0).unsqueeze(-1)
    if pooling == "cls":
        return hidden[inputs.starts].float()
    if pooling == "last":
        return hidden[inputs.starts + inputs.lengths - 1].float()
    raise ValueError(f"embed.pooling={pooling!r} is not one of mean, cls, last")


def packing_works(forward, pooling: str, device: torch.device, vocab_size: int) -> tuple[bool, str]:
    """Whether `forward(**inputs).last_hidden_state` honours packed position ids: two captions of 5 and 3
    random tokens packed give the rows they give one at a time (cosine >= PROBE_COSINE).

    Returns (works, why not). A forward that refuses position ids, or any error, counts as not working.
    """
    generator = torch.Generator().manual_seed(0)
    captions = [torch.randint(5, max(vocab_size, 6), (n,), generator=generator).tolist() for n in (5, 3)]
    try:
        with torch.inference_mode():
            alone = torch.cat([pool_packed(forward(**packed_inputs([c], device).model_inputs).last_hidden_state[0],
                                           packed_inputs([c], device), pooling) for c in captions])
            packed = packed_inputs(captions, device)
            together = pool_packed(forward(**packed.model_inputs).last_hidden_state[0], packed, pooling)
    except (TypeError, ValueError, RuntimeError) as err:
        return False, f"a packed forward pass fails ({type(err).__name__}: {err})"
    cosine = float(F.cosine_similarity(alone.float(), together.float(), dim=-1).min())
    if not cosine >= PROBE_COSINE:
        return False, f"packed captions attend to each other (cosine {cosine:.4f} to the captions run alone)"
    return True, ""


class HostRows:
    """The rows of one encode call, gathered on the host: [count, dim] float32 in caption order.

    add(rows [n, dim] on the device, indices n) copies into a host buffer (pinned, non_blocking, on
    CUDA) in batch order; `result()` waits once (an event recorded after the last copy) and puts the
    rows in caption order. `waits` counts the host's waits for the device.
    """

    waits = 0  # over all instances: what a test counts

    def __init__(self, count: int, device: torch.device):
        self.count = count
        self.device = device
        self.staging: torch.Tensor | None = None  # [count, dim] in batch order
        self.order: list[int] = []
        self.event = None

    def add(self, rows: torch.Tensor, indices: list[int]) -> None:
        if self.staging is None:
            self.staging = torch.empty((self.count, rows.shape[1]), dtype=torch.float32,
                                       pin_memory=self.device.type == "cuda")
        start = len(self.order)
        self.staging[start:start + len(indices)].copy_(rows, non_blocking=True)
        self.order.extend(indices)
        if self.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self, width: int) -> torch.Tensor:
        """The rows [count, dim] in caption order (after one wait for the device's copies)."""
        if self.staging is None:
            return torch.empty((self.count, width), dtype=torch.float32)
        if self.event is not None:
            self.event.synchronize()
        HostRows.waits += 1
        out = torch.empty_like(self.staging, pin_memory=False)
        out[torch.tensor(self.order, dtype=torch.long)] = self.staging[:len(self.order)]
        return out
