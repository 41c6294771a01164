"""Samplers of the training loop.

Training order comes from torch's :class:`DistributedSampler` (also in one process): with
``seed = run_seed * 1_000_003`` and ``set_epoch(epoch)`` its order is ``randperm(n)`` under the generator
seed ``run_seed * 1_000_003 + epoch``, a pure function of ``(seed, epoch)`` -- which is what makes a resume
exact: the epoch's order is recomputed, and :class:`SkipSampler` drops the batches already done.
With data-loader workers, random augmentation is a pure function of ``(seed, epoch, index)`` too
(:class:`SeededItems`): each training item is drawn under generators seeded from those three numbers, so which
worker makes an item, and how many items that worker made before, never changes it -- a run resumed mid-epoch
sees the same images as an uninterrupted one. Without workers the items come from the main process's
generators, whose states the checkpoints store.
Evaluation uses :class:`slaknet.train.distributed.ShardSampler` instead (no padding: every held-out image
is counted once, where DistributedSampler would repeat some to even out the ranks).
"""
from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

__all__ = ["SkipSampler", "train_sampler", "SeededItems", "item_seed"]


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


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed that is a pure function of ``(seed, epoch, index)`` (splitmix64 over the three)."""
    x = 0
    for v in (int(seed), int(epoch), int(index)):
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x


class SeededItems(Dataset):
    """``dataset[i]`` made under Python, NumPy and torch (CPU) generators seeded from ``(seed, epoch, i)``.

    Used in data-loader worker processes, whose generators serve nothing else; a run without workers makes
    its items in the main process, whose generator states the checkpoints store and restore instead.
    """

    def __init__(self, dataset: Any, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, int(seed), int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        key = item_seed(self.seed, self.epoch, index)
        random.seed(key)
        np.random.seed(key & 0xFFFFFFFF)
        torch.default_generator.manual_seed(key)
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # counters and file lists of the wrapped dataset (known_bad...)
        # never the wrapped dataset's protocol methods (e.g. its batched __getitems__, which DataLoader would
        # call instead of this wrapper's __getitem__)
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
