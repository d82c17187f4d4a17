"""Process-group setup from the launcher's environment variables."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def free_tcp_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed_from_env(timeout_minutes: int = 30) -> tuple[int, int, int]:
    """Join the job's process group (nccl on GPU, gloo on CPU) unless already joined.

    Reads MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK (set by launch/slurm.py);
    a process started without them runs as a single rank on 127.0.0.1. Returns
    (rank, world_size, local_rank).
    """
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_tcp_port())
    local_rank = int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timedelta(minutes=timeout_minutes),
        )
    return dist.get_rank(), dist.get_world_size(), local_rank
