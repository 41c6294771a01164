"""Layer-wise density (kept-weight counts) for a global target sparsity: uniform, ERK and SNIP.

All functions return exact integer *counts* per layer (not probabilities), so mask placement can keep
exactly that many weights. Counts are chosen so that their sum equals ``round(density * total)`` over
the sparse-candidate layers whenever that is achievable (largest-remainder rounding).
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from slaknet.errors import ConfigError

__all__ = ["uniform_counts", "erk_densities", "erk_counts", "counts_from_scores", "round_counts", "add_one_each"]


def add_one_each(order: Sequence[str], counts: Dict[str, int], caps: Mapping[str, int], left: int) -> int:
    """One pass of largest-remainder rounding: one more unit to each name in ``order`` still under its
    cap, until ``left`` units are handed out; ``counts`` is updated in place, the units left are returned."""
    for n in order:
        if left == 0:
            break
        if counts[n] < caps[n]:
            counts[n] += 1
            left -= 1
    return left


def round_counts(targets: Mapping[str, float], numels: Mapping[str, int], total: int,
                 minimum: int = 1) -> Dict[str, int]:
    """Round real-valued per-layer counts to integers summing to ``total`` (largest remainder).

    Each count is clamped to ``[minimum, numel]``; ``minimum=1`` guarantees no layer is left empty.
    """
    names = list(targets)
    floors = {n: int(math.floor(targets[n])) for n in names}
    counts = {n: min(max(floors[n], minimum), numels[n]) for n in names}
    diff = total - sum(counts.values())
    # hand out (or take back) the remaining units by fractional part, deterministic on ties (by name order)
    if diff > 0:
        order = sorted(names, key=lambda n: (-(targets[n] - floors[n]), names.index(n)))
        while diff > 0:
            left = add_one_each(order, counts, numels, diff)
            if left == diff:
                break
            diff = left
    elif diff < 0:
        order = sorted(names, key=lambda n: (targets[n] - floors[n], -counts[n], names.index(n)))
        while diff < 0:
            progressed = False
            for n in sorted(order, key=lambda n: -counts[n]):
                if diff == 0:
                    break
                if counts[n] > minimum:
                    counts[n] -= 1
                    diff += 1
                    progressed = True
            if not progressed:
                break
    return counts


def uniform_counts(numels: Mapping[str, int], density: float) -> Dict[str, int]:
    """Every layer keeps ``round(density * numel)`` weights (at least one)."""
    return {n: min(max(int(round(density * k)), 1), k) for n, k in numels.items()}


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float,
                  power_scale: float = 1.0) -> Dict[str, float]:
    """Erdos-Renyi-Kernel densities (RigL / SLaK): density_l proportional to (sum(shape)/prod(shape))**p.

    A layer whose density would exceed 1 is made dense and the scale is recomputed over the others, until
    no density exceeds 1 (the "dense-layer fallback"). The total kept weights equal ``density * total``.
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    numels = {n: int(math.prod(s)) for n, s in shapes.items()}
    raw = {n: (sum(s) / math.prod(s)) ** power_scale for n, s in shapes.items()}
    total = sum(numels.values())
    dense: set = set()
    while True:
        budget = density * total - sum(numels[n] for n in dense)
        divisor = sum(raw[n] * numels[n] for n in shapes if n not in dense)
        if divisor <= 0:
            break
        eps = budget / divisor
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1.0]
        if not over:
            break
        # make the layer with the largest raw density dense first (as RigL does), then recompute
        dense.add(max(over, key=lambda n: raw[n]))
    out = {}
    for n in shapes:
        out[n] = 1.0 if n in dense else min(1.0, eps * raw[n])
    return out


def erk_counts(shapes: Mapping[str, Sequence[int]], density: float,
               power_scale: float = 1.0) -> Tuple[Dict[str, int], Dict[str, float]]:
    """Exact ERK counts (summing to round(density * total)) and the underlying real densities."""
    dens = erk_densities(shapes, density, power_scale)
    numels = {n: int(math.prod(s)) for n, s in shapes.items()}
    total = int(round(density * sum(numels.values())))
    targets = {n: dens[n] * numels[n] for n in shapes}
    return round_counts(targets, numels, total), dens


def counts_from_scores(scores: Mapping[str, torch.Tensor], density: float) -> Dict[str, int]:
    """Per-layer counts from a global top-k of saliency scores (SNIP), never leaving a layer empty.

    The global count is ``round(density * total)``; layers that would keep nothing get one weight, taken
    from the layers keeping the most, so the global count stays exact.
    """
    names = list(scores)
    numels = {n: scores[n].numel() for n in names}
    total = sum(numels.values())
    k = int(round(density * total))
    if k < len(names):
        raise ConfigError(f"sparsity too high: {k} kept weights cannot cover {len(names)} layers")
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
    flat = torch.nan_to_num(flat, nan=0.0, posinf=float(torch.finfo(torch.float32).max))
    top = torch.topk(flat, k, largest=True, sorted=False).indices
    owner = torch.bucketize(top, torch.tensor([0] + [numels[n] for n in names]).cumsum(0)[1:], right=True)
    per = torch.bincount(owner, minlength=len(names)).tolist()
    counts: Dict[str, int] = {n: int(c) for n, c in zip(names, per)}
    # no empty layer: move single units from the fullest layers
    for n in names:
        if counts[n] == 0:
            donor = max(names, key=lambda m: counts[m])
            counts[donor] -= 1
            counts[n] = 1
    return counts


def describe_counts(counts: Mapping[str, int], numels: Mapping[str, int]) -> List[Tuple[str, int, int, float]]:
    """Rows ``(name, kept, numel, density)`` for logging."""
    return [(n, counts[n], numels[n], counts[n] / numels[n]) for n in counts]
