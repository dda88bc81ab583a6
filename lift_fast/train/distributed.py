"""torch.distributed for `lift-fast train`: the process group torchrun asks for, and the few
collectives the loop needs.

torchrun (or srun + torchrun) starts one process per device and sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `setup` reads them, joins the group (nccl on the
process's own GPU, gloo on CPU) and `teardown` leaves it. Without those variables, or with
WORLD_SIZE=1, nothing is initialised and every helper here is a no-op, so the single-process
path runs exactly as before. A group the caller initialised already is used and left open.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lift_fast.train import DistributedSetupError  # noqa: F401 (raised here; defined torch-free for the CLI)

log = logging.getLogger(__name__)

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job. world_size 1: a single process, no group."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
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


def wrap_model(model: nn.Module, ctx: Distributed) -> nn.Module:
    """The module the loop calls: DistributedDataParallel over `model` when distributed, else `model`.

    Parameters used outside forward (the logit scale, SigLIP's bias) still get their gradients
    all-reduced: DDP hooks every parameter's gradient, wherever the graph uses it.
    """
    if not ctx.enabled:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def barrier(ctx: Distributed) -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint)."""
    if not ctx.enabled:
        return
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def agree(ctx: Distributed, loss: torch.Tensor, stop: bool, skipped: int = 0) -> tuple[float, bool, int]:
    """(the mean of the ranks' losses, whether any rank asked to stop, the ranks' skipped samples
    summed), identical on every rank.

    One all-reduce of three numbers, so every rank takes the same decision on a non-finite loss or
    a preemption signal, at the same step. loss: this rank's 0-d loss (its part of the global-batch
    loss, as ClipLoss(local_loss=True) gives it); skipped: this rank's count for the step.
    """
    if not ctx.enabled:
        return loss.item(), stop, skipped
    values = torch.tensor([0.0, float(stop), float(skipped)], device=loss.device)
    values[0] = loss.detach().float()
    dist.all_reduce(values)
    loss_sum, stops, skipped_sum = values.tolist()
    return loss_sum / ctx.world_size, stops > 0, int(skipped_sum)
