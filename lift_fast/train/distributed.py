"""torch.distributed for `lift-fast train`: the process group torchrun asks for, and the few
collectives the loop needs.

torchrun (or srun + torchrun) starts one process per device and sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `setup` reads them, joins the group (nccl on the
process's own GPU, gloo on CPU) and `teardown` leaves it. Without those variables, or with
WORLD_SIZE=1, nothing is initialised and every helper here is a no-op, so the single-process
path runs exactly as before. A group the caller initialised already is used and left open.

train.parallel chooses how the model is spread over the ranks (`wrap_model`, `wrap_towers`): ddp (every
rank holds the whole model, gradients are all-reduced in buckets of train.ddp_bucket_mb, viewed in
place, optionally in bf16: `data_parallel`; CLIP mode's text tower in a DDP of its own) or fsdp
(FSDP2: weights, gradients and AdamW state are sharded over the ranks, `shard_model`). Under fsdp the 0-d parameters (the logit scale, SigLIP's
bias), which fully_shard refuses, stay whole on every rank; `reduce_replicated_gradients` averages
their gradients, and `clip_grad_norm` takes the norm over sharded and whole gradients together.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lift_fast.config import ConfigError
from lift_fast.train import DistributedSetupError  # defined torch-free, for the CLI

log = logging.getLogger(__name__)

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# train.ddp_bucket_mb's default: torchtitan's DDP bucket; torch's 25 MB splits a compiled ViT-B/16 + head
# (423 MB of float32 gradients) into ~17 graphs, 100 MB into ~5
DDP_BUCKET_MB = 100.0
GRAD_COMPRESS = ("none", "bf16")  # train.ddp_grad_compress


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job. world_size 1: a single process, no group."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # initialised by `setup`, so `teardown` destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run folder and shows progress."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={value!r} is not an integer; "
                                    "launch with torchrun, which sets it") from None


def launch_world_size() -> int:
    """The number of processes this job was launched with: the initialised group's size, else
    WORLD_SIZE from the environment (1 when absent). Reads only; initialises nothing."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE", 1))


def setup() -> Distributed:
    """Join the process group torchrun describes, on this process's device; see the module docstring.

    Returns the process's Distributed (device: cuda:LOCAL_RANK where CUDA is available, else CPU).
    Raises DistributedSetupError naming the variable that is missing or wrong (MASTER_ADDR/PORT,
    RANK outside [0, WORLD_SIZE), LOCAL_RANK without a GPU of that index).
    """
    cuda = torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():
        rank, world_size, owns = dist.get_rank(), dist.get_world_size(), False
        local_rank = _env_int("LOCAL_RANK", 0)
    else:
        world_size = launch_world_size()
        if world_size == 1:
            return Distributed(device=torch.device("cuda" if cuda else "cpu"))
        rank, local_rank, owns = _env_int("RANK", -1), _env_int("LOCAL_RANK", 0), True
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise DistributedSetupError(f"WORLD_SIZE={world_size} asks for a distributed run, but {', '.join(missing)} "
                                        f"{'is' if len(missing) == 1 else 'are'} not set; launch with torchrun "
                                        "(it sets " + ", ".join(LAUNCH_VARIABLES) + ")")
        if not 0 <= rank < world_size:
            raise DistributedSetupError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    device = torch.device("cpu")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(f"LOCAL_RANK={local_rank}, but this node has {torch.cuda.device_count()} "
                                        "GPU(s); start at most one process per GPU (torchrun --nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if owns:
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                device_id=device if cuda else None)
        log.info("joined the process group: rank %d of %d (%s, %s)", rank, world_size, backend, device)
    return Distributed(rank=rank, local_rank=local_rank, world_size=world_size, device=device, owns_group=owns)


def teardown(ctx: Distributed) -> None:
    """Leave the process group if `setup` joined it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: Distributed, parallel: str = "ddp", *, compile: bool = False,
               param_dtype: torch.dtype | None = None, bucket_mb: float = DDP_BUCKET_MB, grad_compress: str = "none",
               exclude: str | None = None) -> nn.Module:
    """The module the loop calls, for train.parallel = `parallel` (ddp or fsdp).

    ddp: `data_parallel(model, ...)` when distributed, else `model`; torch.compile over the whole
    when `compile`. Parameters used outside forward (the logit scale, SigLIP's bias, and the text
    tower unless `exclude` names it) still get their gradients all-reduced: DDP hooks every
    parameter's gradient, wherever the graph uses it. exclude: a submodule whose parameters this
    wrapper leaves alone (`wrap_towers` reduces the text tower with a DDP of its own).
    fsdp, distributed: `shard_model(model, ctx, ...)`, which changes `model` in place and returns it.
    fsdp in a single process: as ddp (there is nothing to shard over). param_dtype: see `shard_model`.
    Raises ConfigError for another `parallel`.
    """
    if parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"train.parallel={parallel!r} is not one of ddp, fsdp")
    if parallel == "fsdp" and ctx.enabled:
        return shard_model(model, ctx, compile=compile, param_dtype=param_dtype)
    if parallel == "fsdp":
        log.info("train.parallel=fsdp in a single process: nothing to shard over, the model runs whole")
    forward = model
    if ctx.enabled:
        forward = data_parallel(model, ctx, bucket_mb=bucket_mb, grad_compress=grad_compress, exclude=exclude)
    return torch.compile(forward) if compile else forward


def wrap_towers(model: nn.Module, ctx: Distributed, parallel: str = "ddp", *, compile: bool = False,
                param_dtype: torch.dtype | None = None, bucket_mb: float = DDP_BUCKET_MB,
                grad_compress: str = "none") -> tuple[nn.Module, nn.Module | None]:
    """(what the step calls for the images, what it calls for the tokens: None in LIFT mode).

    The image side is `wrap_model`. CLIP mode's text tower (`model.text`) is treated as the image
    tower is: under ddp across ranks it gets a DistributedDataParallel of its own (same bucket size
    and gradient compression; the image wrapper leaves its parameters out), so its gradients are
    all-reduced in buckets that overlap the backward, and it is compiled when `compile`. Under fsdp
    across ranks `shard_model` has sharded it (and compiled its blocks): the step calls it as it is.
    """
    text = getattr(model, "text", None)
    sharded = parallel == "fsdp" and ctx.enabled
    forward = wrap_model(model, ctx, parallel, compile=compile, param_dtype=param_dtype, bucket_mb=bucket_mb,
                         grad_compress=grad_compress, exclude="text" if text is not None and not sharded else None)
    if text is None or sharded:
        return forward, text
    text_forward = data_parallel(text, ctx, bucket_mb=bucket_mb, grad_compress=grad_compress) if ctx.enabled else text
    return forward, torch.compile(text_forward) if compile else text_forward


def data_parallel(module: nn.Module, ctx: Distributed, *, bucket_mb: float = DDP_BUCKET_MB, grad_compress: str = "none",
                  exclude: str | None = None) -> nn.parallel.DistributedDataParallel:
    """DistributedDataParallel over `module` on ctx's device, as train.ddp_* set it up.

    gradient_as_bucket_view: each gradient is a view into its all-reduce bucket, so the gradients
    take no memory of their own and are not copied into and out of the buckets (423 MB and a copy
    a step for ViT-B/16 and its head). bucket_mb (train.ddp_bucket_mb): torch.compile splits the
    graph at bucket boundaries (DDPOptimizer) so each bucket's all-reduce overlaps the rest of the
    backward: larger buckets, fewer pieces. grad_compress (train.ddp_grad_compress) "bf16": torch's
    bf16_compress_hook (each rank's gradient rounded to bf16 and divided by the world size, summed
    in bf16, written back in the gradient's dtype), half the bytes on the wire. exclude: the name
    of a submodule whose parameters and buffers DDP leaves alone. Raises ConfigError for another
    grad_compress.
    """
    if grad_compress not in GRAD_COMPRESS:
        raise ConfigError(f"train.ddp_grad_compress={grad_compress!r} is not one of {', '.join(GRAD_COMPRESS)}")
    if exclude is not None:
        left_out = [f"{exclude}.{name}" for name, _ in getattr(module, exclude).named_parameters()]
        left_out += [f"{exclude}.{name}" for name, _ in getattr(module, exclude).named_buffers()]
        # what DDP reads its ignored names from (torch's removed _set_params_and_buffers_to_ignore_for_data_parallel
        # set this attribute; tests/test_ddp.py checks that DDP still honours it)
        module._ddp_params_and_buffers_to_ignore = left_out
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    wrapped = nn.parallel.DistributedDataParallel(module, device_ids=device_ids, bucket_cap_mb=bucket_mb,
                                                  gradient_as_bucket_view=True)
    if grad_compress == "bf16":
        wrapped.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return wrapped


def sharded_param_dtype(parallel: str, ctx: Distributed, precision: torch.dtype | None) -> torch.dtype | None:
    """The dtype FSDP2 gathers the weights in (its MixedPrecisionPolicy), or None: autocast does the casting.

    bf16 under fsdp on CUDA: each shard is cast once, before its all-gather, which then moves half
    the bytes; the step runs without autocast, as in torchtitan (on bf16 weights autocast's casts
    would be no-ops, and one mechanism decides the dtypes; layer norms then take bf16 inputs).
    On CPU (gloo) and under ddp, autocast stays the one mechanism, as in a single process.
    """
    if parallel == "fsdp" and ctx.enabled and ctx.device.type == "cuda":
        return precision
    return None


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters fully_shard cannot shard, kept whole on every rank: the 0-d ones (the logit
    scale, SigLIP's logit bias). fully_shard shards on dim 0 and refuses scalars."""
    return [param for param in model.parameters() if param.ndim == 0]


def shard_model(model: nn.Module, ctx: Distributed, *, compile: bool = False,
                param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 over the LIFT image encoder (`model.visual.blocks`), in place, as torchtitan applies it.

    One fully_shard group per ViT block, then one for the root (patch embedding, position
    embedding, final norm, head); the 0-d parameters stay whole (`replicated_parameters`). In CLIP
    mode the text tower (`model.text`) gets one group per text block and one for the rest of the
    tower (embeddings, final norm, projection), which the step calls on its own: its pre-forward
    hook gathers those weights. Every
    block but the last frees its gathered weights after forward and gathers them again in
    backward; the last block's and the root's are needed at once when backward starts, so they are
    kept. compile: each block is compiled before it is sharded (the stem and the head stay eager),
    so the FSDP hooks run outside the compiled graphs. param_dtype (bf16 or None): the dtype the
    weights are gathered and computed in; gradients are reduced in float32 and the sharded master
    weights and AdamW state stay float32. Returns `model`, now an FSDPModule.
    """
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    blocks = list(model.visual.blocks)
    for index, block in enumerate(blocks):
        if compile:
            block.compile()  # in place: the state-dict names stay those of the plain model
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1)
    text = getattr(model, "text", None)  # CLIP mode's text tower, called by the step on its own (its own hooks)
    if text is not None:
        for block in text.blocks:
            if compile:
                block.compile()
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(text, mesh=mesh, mp_policy=policy)  # token/position embeddings, final norm, projection
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=set(replicated_parameters(model)))
    log.info("FSDP2 over %d ranks: %d block groups%s + the root%s%s", ctx.world_size, len(blocks),
             f", {len(text.blocks)} text block groups + the text tower" if text is not None else "",
             f", weights gathered in {param_dtype}" if param_dtype else "", ", blocks compiled" if compile else "")
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is FSDP2-sharded (`shard_model`): its full state is then a collective."""
    return isinstance(model, FSDPModule)


def reduce_replicated_gradients(model: nn.Module, ctx: Distributed) -> None:
    """Under fsdp, average the gradients of the parameters FSDP leaves whole over the ranks.

    Each rank's loss is its part of the global-batch loss, so the mean over ranks is the gradient of
    the global loss, which is what DDP and FSDP's reduce-scatter give the other parameters. A no-op
    for an unsharded model (DDP reduces every gradient itself). One all-reduce of a few numbers.
    """
    if not ctx.enabled or not is_sharded(model):
        return
    grads = [param.grad for param in replicated_parameters(model) if param.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat)  # SUM: gloo has no AVG
    flat /= ctx.world_size
    for grad, value in zip(grads, flat.split([grad.numel() for grad in grads]), strict=True):
        grad.copy_(value.view_as(grad))


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip the gradients to a total norm of max_norm; returns the total norm before clipping, a 0-d
    tensor on the gradients' device (never read back here: reading it would wait for the device).

    torch.nn.utils.clip_grad_norm_ for plain gradients. FSDP2's gradients are DTensor shards: their
    norm is reduced over the ranks, then combined with that of the whole (replicated) gradients, so
    every rank gets the global-batch norm and clips by the same factor. A non-finite norm multiplies
    the gradients by NaN, which is harmless: the step that has one is skipped on the device.
    """
    params = [param for param in parameters if param.grad is not None]
    sharded = [param for param in params if isinstance(param.grad, DTensor)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    whole = [param for param in params if not isinstance(param.grad, DTensor)]
    norms = [torch.nn.utils.get_total_norm([param.grad for param in sharded]).full_tensor()]
    if whole:
        norms.append(torch.nn.utils.get_total_norm([param.grad for param in whole]))
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in (sharded, whole):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def barrier(ctx: Distributed) -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint)."""
    if not ctx.enabled:
        return
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


class Agreement:
    """What the ranks agree on each step, without the step waiting for the device to say it.

    `reduce` all-reduces [loss, stop, skipped] (one collective of three numbers, so every rank takes
    the same decision on a non-finite loss or a preemption signal, at the same step): the mean loss
    stays on the device, where the step's non-finite check reads it; the stop flag and the summed
    skipped count are copied into a host buffer (pinned on CUDA) without waiting. `collect` reads
    the previous step's copy, by then long done, or with `now=True` this step's too (at a logged
    step, which reads back anyway). Two buffers alternate, so a copy never lands in one being read.
    Every rank calls both at the same steps, so every rank reads the same reduced values at the same
    step and they stop together. In one process nothing is reduced and the values are the host's own.
    """

    def __init__(self, ctx: Distributed):
        self.ctx = ctx
        pinned = ctx.enabled and ctx.device.type == "cuda"
        self._buffers = [torch.zeros(2, dtype=torch.float64, pin_memory=pinned) for _ in range(2)]
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []  # oldest first
        self._local = [False, 0]

    def reduce(self, loss: torch.Tensor, stop: bool, skipped: int = 0) -> torch.Tensor:
        """The mean of the ranks' losses, a 0-d float32 tensor on the device (this rank's loss in one process).

        loss: this rank's 0-d loss (its part of the global-batch loss, as ClipLoss(local_loss=True)
        gives it); stop: whether this rank was asked to stop; skipped: its skipped samples this step.
        """
        loss = loss.detach().float()
        if not self.ctx.enabled:
            self._local = [self._local[0] or stop, self._local[1] + skipped]
            return loss
        values = torch.zeros(3, dtype=torch.float32, device=loss.device)
        values[0] = loss  # fill kernels, no host-to-device copy: the numbers travel as kernel arguments
        values[1] = float(stop)
        values[2] = float(skipped)
        dist.all_reduce(values)  # SUM: gloo has no AVG
        free = [buffer for buffer in self._buffers if all(buffer is not held for held, _ in self._pending)]
        if not free:
            raise RuntimeError("Agreement.reduce called again before collect: both host buffers hold copies not read")
        buffer = free[0]
        buffer.copy_(values[1:], non_blocking=True)
        event = None
        if values.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((buffer, event))
        return values[0] / self.ctx.world_size

    def collect(self, now: bool = False) -> tuple[bool, int]:
        """(whether any rank asked to stop, the ranks' skipped samples summed) over the steps reduced
        and not yet collected, except this step's unless `now`; the same on every rank."""
        if not self.ctx.enabled:
            (stop, skipped), self._local = self._local, [False, 0]
            return stop, skipped
        ready = self._pending if now else self._pending[:-1]
        stop, skipped = False, 0
        for buffer, event in ready:
            if event is not None:
                event.synchronize()  # an event of an earlier step: by now it has long passed
            stops, skipped_sum = buffer.tolist()
            stop, skipped = stop or stops > 0, skipped + int(skipped_sum)
        self._pending = self._pending[len(ready):]
        return stop, skipped
