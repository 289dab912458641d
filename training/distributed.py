"""torchrun integration: process group, device, seeds, rank-0 helpers."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device_choice: str = "auto") -> DistInfo:
    """Read torchrun's environment, pick the device, start the process group (nccl/gloo)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for but CUDA is not available")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(minutes=30),
            device_id=device if use_cuda else None,
        )
    return DistInfo(rank, local_rank, world_size, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def from_main(compute, info: DistInfo):
    """``compute()`` on rank 0 only; every rank gets its (picklable) result."""
    if not info.distributed:
        return compute()
    box = [compute() if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. stop requests)."""
    if not info.distributed:
        return flag
    t = torch.tensor(
        [1.0 if flag else 0.0], device=info.device if info.device.type == "cuda" else "cpu"
    )
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def exit_together(error: str, info: DistInfo, elsewhere: str) -> None:
    """Every rank stops (SystemExit) when any rank has an ``error``; the ranks without one say
    ``elsewhere``. Every rank must call it: it is a collective."""
    if any_rank(bool(error), info):
        raise SystemExit(error or elsewhere)


def sum_over_ranks(value: float, info: DistInfo) -> float:
    if not info.distributed:
        return value
    t = torch.tensor(
        [value], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu"
    )
    dist.all_reduce(t)
    return float(t.item())


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
