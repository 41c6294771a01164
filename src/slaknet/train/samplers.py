"""Samplers of the training loop.

Training order comes from torch's :class:`DistributedSampler` (also in one process): with
``seed = run_seed * 1_000_003`` and ``set_epoch(epoch)`` its order is ``randperm(n)`` under the generator
seed ``run_seed * 1_000_003 + epoch``, a pure function of ``(seed, epoch)`` -- which is what makes a resume
exact: the epoch's order is recomputed, and :class:`SkipSampler` drops the batches already done.
Evaluation uses :class:`slaknet.train.distributed.ShardSampler` instead (no padding: every held-out image
is counted once, where DistributedSampler would repeat some to even out the ranks).
"""
from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import DistributedSampler, Sampler

__all__ = ["SkipSampler", "train_sampler"]


def train_sampler(dataset: Any, seed: int, rank: int = 0, world: int = 1) -> DistributedSampler:
    """Shuffled, rank-sharded order (padded by wrap-around) that is a pure function of ``(seed, epoch)``."""
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=int(seed) * 1_000_003,
                              drop_last=False)


class SkipSampler(Sampler[int]):
    """Yields ``base``'s indices from position ``skip`` on (resume in the middle of an epoch)."""

    def __init__(self, base: Sampler, skip: int = 0) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        for i, idx in enumerate(self.base):
            if i >= self.skip:
                yield idx

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)  # type: ignore[arg-type]
