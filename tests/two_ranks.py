"""Two forked gloo ranks for tests: a free port and the launch, the torchrun variables set."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(rank: int, port: int, main, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LIFT_FAST_KERNELS="torch")
    torch.set_num_threads(1)
    main(rank, *args)


def fork_ranks(main, *args) -> None:
    """Run main(rank, *args) in two forked processes (fork: they inherit the imported torch)."""
    mp.start_processes(_rank_entry, args=(free_port(), main, args), nprocs=WORLD_SIZE, join=True, start_method="fork")
