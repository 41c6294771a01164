"""One managed weight (:class:`SparseLayer`) and the deterministic seeds of its mask randomness."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

__all__ = ["SparseLayer", "layer_key"]


@dataclasses.dataclass
class SparseLayer:
    """One managed weight: its name, parameter, bool mask (True = active) and 'ever active' record."""

    name: str
    index: int
    param: nn.Parameter
    mask: torch.Tensor
    ever_active: torch.Tensor
    init_density: float

    @property
    def numel(self) -> int:
        return self.param.numel()

    count: int = -1  # active weights (kept exact by the engine; recomputed if negative)
    ever_count: int = -1  # weights ever active (ITOP numerator)

    def __post_init__(self) -> None:
        if self.count < 0:
            self.count = int(torch.count_nonzero(self.mask).item())
        if self.ever_count < 0:
            self.ever_count = int(torch.count_nonzero(self.ever_active).item())

    def active(self) -> int:
        return self.count



def layer_key(*parts: int) -> int:
    """Deterministic 63-bit mix of integers (splitmix64 steps): the seed of one layer's randomness."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x & 0x7FFFFFFFFFFFFFFF
