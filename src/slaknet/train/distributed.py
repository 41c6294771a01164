"""torch.distributed set-up for ``torchrun`` launches (DDP), and helpers that are no-ops without it.

``torchrun --nproc_per_node N -m slaknet train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`init_distributed` then joins the process group (NCCL on CUDA, gloo on CPU). Multi-node works
through torchrun's rendezvous (``--nnodes``, ``--rdzv-endpoint``) with no change here.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["DistInfo", "init_distributed", "is_dist", "world_size", "rank", "barrier", "all_reduce_sum",
           "ShardSampler", "cleanup"]


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the torchrun process group if launched by torchrun; pick the device of this process."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    rk = int(os.environ.get("RANK", "0"))
    lr = int(os.environ.get("LOCAL_RANK", "0"))
    if want.startswith("cuda") and not torch.cuda.is_available():
        from slaknet.errors import ConfigError

        raise ConfigError("--device cuda requested but CUDA is not available; use --device cpu")
    if want == "cuda":
        dev = torch.device("cuda", lr if ws > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(want)
    if ws > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rk, world_size=ws)
    return DistInfo(rk, ws, lr, dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a float64 copy on the right device for the backend)."""
    if not is_dist():
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = t.to(dev)
    dist.all_reduce(x)
    return x.to(t.device)


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r gets indices r, r+W, ... (no padding, so summed metrics are exact)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))
