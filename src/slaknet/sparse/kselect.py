"""Exact top-k selection returned as a bool mask, cheap on CPU for tens of millions of entries.

A topology update picks, per layer, exactly ``k`` positions with the smallest |weight| (pruning) and
exactly ``k`` positions with the largest growth score (random numbers, |gradient| or |momentum|), each
among an allowed subset. ``torch.topk`` over a whole layer, or materialising index tensors of millions of
positions, costs far more than the training step it is amortised over, so the selection here:

1. brackets the k-th best value between two thresholds: from a fixed sample of the scores, or exactly
   from the known distribution when the scores are uniform random numbers;
2. makes one chunked pass (chunks fit in cache; scratch buffers are reused): entries beyond the inner
   threshold are surely selected and written straight into the output mask; the few between the two
   thresholds are collected;
3. picks the missing ``k - sure`` among the collected few with a small ``topk``.

If the bracket is ever wrong (it is drawn with a wide safety margin) it falls back to a full ``topk``, so
the result is always exactly ``k`` entries, equal to ``topk``'s set up to the choice among ties.
Everything is deterministic for identical inputs (random scores come from a seeded generator), so every
rank of a distributed run selects the same positions.
"""
from __future__ import annotations

import functools
import math
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["MagnitudeScores", "RandomScores", "select_k_mask"]

CHUNK = 1 << 20            # entries per pass chunk (4 MiB of fp32 scores: stays in cache)
SMALL = 1 << 18            # below this many entries a plain topk is cheapest
_SAMPLE = 1 << 16          # sample size used to bracket magnitude-like scores


@functools.lru_cache(maxsize=64)
def _sample_positions(n: int, device: torch.device) -> torch.Tensor:
    """Fixed sample positions in [0, n): scattered by a multiplicative hash (no aliasing with rows or
    channels), sorted so the gather streams through memory; cached per size (a layer keeps its size)."""
    return ((torch.arange(_SAMPLE, device=device, dtype=torch.long) * 2654435761) % n).sort().values


class MagnitudeScores:
    """Scores ``|src|`` of a tensor (a weight, a gradient, a momentum buffer), read chunk by chunk."""

    def __init__(self, src: torch.Tensor) -> None:
        self.flat = src.detach().reshape(-1)  # a view for contiguous tensors, a copy otherwise
        self.numel = self.flat.numel()
        self.device = self.flat.device

    def chunks(self, size: int) -> Iterator[Tuple[int, torch.Tensor]]:
        buf = torch.empty(min(size, self.numel), dtype=torch.float32, device=self.device)
        for s in range(0, self.numel, size):
            c = min(size, self.numel - s)
            yield s, torch.abs(self.flat[s:s + c], out=buf[:c]) if self.flat.dtype == torch.float32 \
                else buf[:c].copy_(self.flat[s:s + c]).abs_()

    def gather(self, pos: torch.Tensor) -> torch.Tensor:
        return self.flat[pos].abs().float()

    def bracket(self, k: int, largest: bool, allowed: Optional[torch.Tensor], n_allowed: int
                ) -> Optional[Tuple[float, float]]:
        """(t_edge, t_sure) from the order statistics of a fixed, deterministic sample (or None)."""
        n = self.numel
        pos = _sample_positions(n, self.device)
        sample = self.gather(pos)
        if allowed is not None:
            sample = sample[allowed[pos]]
        m = sample.numel()
        if m < 1024:
            return None
        q = k / n_allowed
        margin = 4.0 * math.sqrt(q * (1.0 - q) / m) + 2.0 / m
        if largest:
            j_edge, j_sure = int(math.floor((1.0 - q - margin) * m)), int(math.ceil((1.0 - q + margin) * m))
        else:
            j_edge, j_sure = int(math.ceil((q + margin) * m)), int(math.floor((q - margin) * m))
        if not 1 <= j_edge <= m:
            return None
        t_edge = float(sample.kthvalue(j_edge).values)
        if 1 <= j_sure <= m:
            t_sure = float(sample.kthvalue(j_sure).values)
        else:  # nothing is surely selected
            t_sure = math.inf if largest else -math.inf
        return t_edge, t_sure


class RandomScores:
    """Uniform random scores in [0, 1), drawn chunk by chunk from a generator seeded with ``seed``.

    On CPU the numbers come from numpy's PCG64 (float32, 24 random bits like torch's), about twice as fast
    as torch's CPU generator, which is most of the cost of random regrowth; elsewhere from a torch
    generator on the device. Re-iterating re-seeds, so the same scores are seen again (needed by the full
    fallback).
    """

    def __init__(self, numel: int, seed: int, device: torch.device) -> None:
        self.numel, self.seed, self.device = numel, seed, torch.device(device)

    def chunks(self, size: int) -> Iterator[Tuple[int, torch.Tensor]]:
        buf = torch.empty(min(size, self.numel), dtype=torch.float32, device=self.device)
        if self.device.type == "cpu":
            rng = np.random.Generator(np.random.PCG64(self.seed))
            out = buf.numpy()
            for s in range(0, self.numel, size):
                c = min(size, self.numel - s)
                rng.random(out=out[:c], dtype=np.float32)
                yield s, buf[:c]
            return
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed)
        for s in range(0, self.numel, size):
            c = min(size, self.numel - s)
            yield s, buf[:c].uniform_(generator=gen)

    def bracket(self, k: int, largest: bool, allowed: Optional[torch.Tensor], n_allowed: int
                ) -> Optional[Tuple[float, float]]:
        """Exact distribution: the count above t among n_allowed is Binomial(n_allowed, 1 - t)."""
        q = k / n_allowed
        delta = 6.0 * math.sqrt(q * (1.0 - q) / n_allowed) + 8.0 / n_allowed
        if largest:
            return 1.0 - q - delta, 1.0 - q + delta
        return q + delta, q - delta


Scores = Union[MagnitudeScores, RandomScores]


def _full(scores: Scores, k: int, largest: bool, allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """Reference path: materialise every score and take a plain topk."""
    sc = torch.cat([c.clone() for _, c in scores.chunks(CHUNK)])
    if allowed is not None:
        sc.masked_fill_(~allowed, -math.inf if largest else math.inf)
    out = torch.zeros(scores.numel, dtype=torch.bool, device=sc.device)
    out[torch.topk(sc, k, largest=largest, sorted=False).indices] = True
    return out


def sparse_nonzero(b: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of a flat bool tensor; fast when they are few (scans 8 bytes at once)."""
    n = b.numel()
    if n % 8 or not b.is_contiguous() or b.device.type != "cpu":
        return b.nonzero().squeeze(1)
    words = (b.view(torch.int64) != 0).nonzero().squeeze(1)
    pos = (words.unsqueeze(1) * 8 + torch.arange(8, device=b.device)).reshape(-1)
    return pos[b[pos]]


def select_k_mask(scores: Scores, k: int, largest: bool, allowed: Optional[torch.Tensor] = None,
                  n_allowed: Optional[int] = None) -> torch.Tensor:
    """A flat bool mask with exactly ``k`` True entries: the ``k`` largest (or smallest) ``scores``
    among the positions where the flat bool ``allowed`` is True (all when None).

    ``scores`` is a :class:`MagnitudeScores` or :class:`RandomScores`; ``n_allowed`` (the number of allowed
    entries, if known) saves a pass. Requires ``0 <= k <= n_allowed``.
    """
    n = scores.numel
    dev = scores.device
    if n_allowed is None:
        n_allowed = n if allowed is None else int(torch.count_nonzero(allowed))
    if not 0 <= k <= n_allowed:
        raise ValueError(f"cannot select {k} of {n_allowed} allowed entries")
    if k == 0:
        return torch.zeros(n, dtype=torch.bool, device=dev)
    if k == n_allowed:
        return allowed.clone() if allowed is not None else torch.ones(n, dtype=torch.bool, device=dev)
    br = scores.bracket(k, largest, allowed, n_allowed) if n >= SMALL and dev.type == "cpu" else None
    if br is None:
        return _full(scores, k, largest, allowed)
    t_edge, t_sure = br
    out = torch.empty(n, dtype=torch.bool, device=dev)
    beyond_sure, beyond_edge = (torch.gt, torch.ge) if largest else (torch.lt, torch.le)
    band = torch.empty(min(CHUNK, n), dtype=torch.bool, device=dev)
    band_idx, band_val = [], []
    n_sure = 0
    for s, sc in scores.chunks(CHUNK):
        c = sc.numel()
        sure = out[s:s + c]
        beyond_sure(sc, t_sure, out=sure)
        cand = beyond_edge(sc, t_edge, out=band[:c])
        if allowed is not None:
            a = allowed[s:s + c]
            sure &= a
            cand &= a
        cand ^= sure  # sure is a subset of cand: what remains is the band between the thresholds
        n_sure += int(torch.count_nonzero(sure))
        idx = sparse_nonzero(cand)
        band_val.append(sc[idx])
        band_idx.append(idx + s)
    need = k - n_sure
    idx = torch.cat(band_idx)
    if need < 0 or need > idx.numel():  # the bracket missed (practically never): exact fallback
        return _full(scores, k, largest, allowed)
    if need:
        pick = torch.topk(torch.cat(band_val), need, largest=largest, sorted=False).indices
        out[idx[pick]] = True
    return out
