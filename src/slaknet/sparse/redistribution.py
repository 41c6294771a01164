"""Regrowth redistribution: a registry of name -> :class:`Redistribution` (``SparseConfig.redistribution``).

After pruning, a redistribution says how many weights each layer regrows (the engine then picks *which*
with the growth criterion). ``none`` (the paper's) regrows what each layer pruned; ``magnitude`` and
``momentum`` share the update's total across layers by a per-layer score (:class:`ScoreRedistribution`),
so a new score-based rule is one method::

    from slaknet.sparse import ScoreRedistribution, register_redistribution

    @register_redistribution("by_size")
    class BySize(ScoreRedistribution):     # larger layers regrow more
        def layer_score(self, engine, layer, kept):
            return float(layer.numel)

    SparseEngine(model, opt, redistribution="by_size", ...)
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Type

import torch

from slaknet.sparse.density import add_one_each
from slaknet.sparse.growth import momentum_state
from slaknet.sparse.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.sparse.engine import SparseEngine
    from slaknet.sparse.layer import SparseLayer

__all__ = ["Redistribution", "ScoreRedistribution", "register_redistribution", "redistribution_names",
           "redistribution_rule", "share_by_scores", "mean_abs"]


class Redistribution:
    """How many weights each layer regrows in one topology update, and what that needs from training.

    Attributes:
        needs_momentum: the counts read the optimizer's momentum (:func:`slaknet.sparse.growth.momentum_state`):
            the engine checks the optimizer keeps one.
    """

    needs_momentum: bool = False

    def counts(self, engine: "SparseEngine", n_prune: Dict[str, int],
               pruned: Dict[str, torch.Tensor]) -> Dict[str, int]:
        """Regrowth count per layer name of ``engine.layers``, at most each layer's free positions.

        ``n_prune`` is how many weights each layer prunes in this update and ``pruned`` their flat bool
        masks (the layers' masks are not yet updated; weights and optimizer state are still untouched).
        Regrowing ``sum(n_prune.values())`` in all keeps the global density.
        """
        raise NotImplementedError


_REDISTRIBUTION: Registry[Redistribution] = Registry("redistribution", "redistribution")


def register_redistribution(name: str, *, replace: bool = False
                            ) -> Callable[[Type[Redistribution]], Type[Redistribution]]:
    """Class decorator: make ``name`` a valid ``SparseConfig.redistribution`` (``replace`` to override one)."""
    return _REDISTRIBUTION.register(name, replace=replace)


def redistribution_names() -> List[str]:
    """The registered redistribution names, in registration order (built-ins first)."""
    return _REDISTRIBUTION.names()


def redistribution_rule(name: str) -> Redistribution:
    """A fresh instance of the redistribution registered as ``name`` (``ConfigError`` if none is)."""
    return _REDISTRIBUTION.create(name)


def share_by_scores(scores: Mapping[str, float], caps: Mapping[str, int], total: int) -> Dict[str, int]:
    """Split ``total`` units across names in proportion to ``scores``, each name at most its cap.

    Largest-remainder rounding (ties by name); the units a capped name cannot take go to the others, so
    the sum is ``total`` unless every name is full. Equal shares when all open scores are 0.
    """
    out = {n: 0 for n in scores}
    remaining = total
    open_ = [n for n in scores if caps[n] > 0]
    while remaining > 0 and open_:
        s = sum(scores[n] for n in open_)
        share = {n: (scores[n] / s if s > 0 else 1.0 / len(open_)) * remaining for n in open_}
        base = {n: min(int(math.floor(share[n])), caps[n] - out[n]) for n in open_}
        for n in open_:
            out[n] += base[n]
        left = remaining - sum(base.values())
        # largest remainders get one more, deterministic order
        order = sorted(open_, key=lambda m: (-(share[m] - math.floor(share[m])), m))
        remaining = add_one_each(order, out, caps, left)
        open_ = [n for n in open_ if out[n] < caps[n]]
    return out


def mean_abs(src: torch.Tensor, kept: torch.Tensor) -> float:
    """Mean |src| over the flat bool ``kept`` positions (0.0 when none), in fp32."""
    vals = src.detach().reshape(-1)[kept].abs().float()
    return float(vals.mean().item()) if vals.numel() else 0.0


class ScoreRedistribution(Redistribution):
    """Shares the update's total regrowth across layers in proportion to one score per layer.

    A layer can regrow up to its free positions after pruning; see :func:`share_by_scores`.
    """

    def layer_score(self, engine: "SparseEngine", layer: "SparseLayer", kept: torch.Tensor) -> float:
        """The layer's share weight (>= 0); ``kept`` flags its weights still active after pruning (flat bool)."""
        raise NotImplementedError

    def counts(self, engine: "SparseEngine", n_prune: Dict[str, int],
               pruned: Dict[str, torch.Tensor]) -> Dict[str, int]:
        scores: Dict[str, float] = {}
        caps: Dict[str, int] = {}
        for layer in engine.layers:
            kept = layer.mask.reshape(-1) & ~pruned[layer.name]
            caps[layer.name] = layer.numel - (layer.count - n_prune[layer.name])
            scores[layer.name] = self.layer_score(engine, layer, kept)
        return share_by_scores(scores, caps, sum(n_prune.values()))


@register_redistribution("none")
class NoRedistribution(Redistribution):
    """The paper's: every layer regrows as many weights as it pruned (layer densities never change)."""

    def counts(self, engine: "SparseEngine", n_prune: Dict[str, int],
               pruned: Dict[str, torch.Tensor]) -> Dict[str, int]:
        return dict(n_prune)


@register_redistribution("magnitude")
class MagnitudeRedistribution(ScoreRedistribution):
    """Layers with a larger mean |w| over their kept weights regrow more."""

    def layer_score(self, engine: "SparseEngine", layer: "SparseLayer", kept: torch.Tensor) -> float:
        return mean_abs(layer.param, kept)


@register_redistribution("momentum")
class MomentumRedistribution(ScoreRedistribution):
    """Layers with a larger mean |momentum| over their kept weights regrow more (read before pruning zeroes it)."""

    needs_momentum = True

    def layer_score(self, engine: "SparseEngine", layer: "SparseLayer", kept: torch.Tensor) -> float:
        return mean_abs(momentum_state(engine.optimizer, layer), kept)
