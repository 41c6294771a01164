"""Mask agreement across torch.distributed ranks: one seed for all ranks, checksums compared.

A mixin of :class:`slaknet.sparse.SparseEngine`; see docs/sparse.md, "Distributed".
"""
from __future__ import annotations

import logging
from typing import Any, List

import torch
import torch.distributed as dist

from slaknet.errors import ConfigError

logger = logging.getLogger("slaknet.sparse")


def dist_world() -> int:
    """World size of the initialised default process group, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DistributedMixin:
    """Checksums and the shared seed (state lives on the engine)."""

    layers: List[Any]
    @torch.no_grad()
    def mask_checksum(self) -> torch.Tensor:
        """int64 [L, 3] fingerprint of the masks: active count, sum of active indices, sum of idx^2 mod p."""
        rows = []
        for layer in self.layers:
            idx = layer.mask.reshape(-1).nonzero().squeeze(1)
            rows.append(torch.stack([idx.numel() * torch.ones((), dtype=torch.int64, device=idx.device),
                                     idx.sum(), (idx * idx % 1_000_003).sum()]))
        if not rows:
            return torch.zeros(0, 3, dtype=torch.int64)
        return torch.stack(rows)

    def check_consistency(self) -> None:
        """Raise RuntimeError if masks differ across ranks (two tiny all-reduces of a checksum)."""
        bad = self._differing_layers()
        if bad:
            raise RuntimeError(f"sparse masks differ across ranks at step {self.step_count} "
                               f"(layers {bad[:3]}...): are weights/seed identical on every rank?")

    def _differing_layers(self) -> List[str]:
        if dist_world() <= 1:
            return []
        c = self.mask_checksum()
        if dist.get_backend() == "nccl" and c.device.type != "cuda":
            c = c.cuda()
        n = torch.tensor([c.shape[0]], dtype=torch.int64, device=c.device)
        lo_n, hi_n = n.clone(), n.clone()
        dist.all_reduce(lo_n, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi_n, op=dist.ReduceOp.MAX)
        if int(lo_n) != int(hi_n):
            return ["(a different number of sparse layers)"]
        lo, hi = c.clone(), c.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return [self.layers[i].name for i in (lo != hi).any(1).nonzero().view(-1).tolist()]

    def _share_seed(self) -> None:
        """Under torch.distributed, take rank 0's mask seed: per-rank seeding (``seed + rank``) must not split
        the masks (they are a function of the seed alone for ERK / uniform and random growth)."""
        if dist_world() <= 1:
            return
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        t = torch.tensor([int(self.config.seed)], dtype=torch.int64, device=dev)
        dist.broadcast(t, 0)
        if int(t) != int(self.config.seed):
            logger.info("sparse engine: mask seed %d of this rank replaced by rank 0's %d", self.config.seed, int(t))
            self.config.seed = int(t)

    def _check_ranks_agree(self) -> None:
        """Once, after the masks are chosen or loaded: ConfigError if any rank holds other masks."""
        if not self.config.sync_check or dist_world() <= 1 or self._awaiting_state:
            return
        bad = self._differing_layers()
        if bad:
            raise ConfigError(f"sparse masks differ across ranks right after initialisation (layers {bad[:3]}): "
                              "the weights differ between ranks (SNIP scores them); build the engine after "
                              "wrapping the model in DistributedDataParallel, or load the same state on every rank")

