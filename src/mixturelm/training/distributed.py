"""More than one process: torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; data parallelism with DDP wraps
the model from outside (the model code stays single-device)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UsageError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of t over processes (a new tensor)."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of t over processes (a new tensor)."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def mean_in_place(self, t: torch.Tensor) -> None:
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world

    def sum_in_place(self, t: torch.Tensor) -> None:
        if self.world > 1:
            dist.all_reduce(t)


def init_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        # gloo for CPU tensors (losses, counters), nccl for CUDA ones
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def finish_distributed() -> bool:
    """After a finished run: wait for every process and say whether there was a process group. Not
    destroyed: gloo's teardown (destroy_process_group or interpreter exit) aborted about one finished
    torchrun run in ten here ("terminate called without an active exception", in C++, no Python frame)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    return True


def resolve_device(device: str) -> str:
    """'auto', 'cpu', 'cuda' or 'cuda:N', checked against what this machine has."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UsageError(f"device {device!r} is not a device; use auto, cpu or cuda") from None
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r} is not supported; use auto, cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device}: no CUDA device is available here; use cpu")
    return device


def pick_device(device: str, d: Dist) -> str:
    device = resolve_device(device)
    if device == "cuda" and d.world > 1:
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
    return device
