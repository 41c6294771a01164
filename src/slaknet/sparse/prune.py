"""Prune criteria: a registry of name -> :class:`PruneCriterion` (``SparseConfig.prune`` names one).

At each topology update the engine prunes, per layer, the ``ceil(rate * active)`` lowest-scored *active*
positions (with :func:`slaknet.sparse.kselect.select_k_mask`); a criterion only says how positions are
scored and what it needs from training::

    from slaknet.sparse import PruneCriterion, register_prune
    from slaknet.sparse.kselect import MagnitudeScores

    @register_prune("taylor")
    class Taylor(PruneCriterion):          # prune the smallest |w * dL/dw| (the last step's gradient)
        def scores(self, engine, layer, step):
            return MagnitudeScores(layer.param * layer.param.grad)

    SparseEngine(model, opt, prune="taylor", ...)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Type

from slaknet.sparse.kselect import MagnitudeScores, Scores
from slaknet.sparse.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.sparse.engine import SparseEngine
    from slaknet.sparse.layer import SparseLayer

__all__ = ["PruneCriterion", "register_prune", "prune_criterion", "prune_names"]


class PruneCriterion:
    """How pruning scores the active positions of a layer (lower = pruned first), and what it needs.

    Attributes:
        needs_momentum: the scores read the optimizer's momentum
            (:func:`slaknet.sparse.growth.momentum_state`): the engine checks the optimizer keeps one.
    """

    needs_momentum: bool = False

    def scores(self, engine: "SparseEngine", layer: "SparseLayer", step: int) -> Scores:
        """The prune scores of every position of ``layer`` at optimizer step ``step`` (only active ones count)."""
        raise NotImplementedError


_PRUNE: Registry[PruneCriterion] = Registry("prune", "prune criterion")


def register_prune(name: str, *, replace: bool = False) -> Callable[[Type[PruneCriterion]], Type[PruneCriterion]]:
    """Class decorator: make ``name`` a valid ``SparseConfig.prune`` (``replace`` to override one)."""
    return _PRUNE.register(name, replace=replace)


def prune_names() -> List[str]:
    """The registered prune criterion names, in registration order (built-ins first)."""
    return _PRUNE.names()


def prune_criterion(name: str) -> PruneCriterion:
    """A fresh instance of the prune criterion registered as ``name`` (``ConfigError`` if none is)."""
    return _PRUNE.create(name)


@register_prune("magnitude")
class MagnitudePrune(PruneCriterion):
    """The paper's (and RigL's): the smallest |w| among the active weights."""

    def scores(self, engine: "SparseEngine", layer: "SparseLayer", step: int) -> Scores:
        return MagnitudeScores(layer.param)
