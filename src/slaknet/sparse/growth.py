"""Regrowth criteria: a registry of name -> :class:`GrowthCriterion` (``SparseConfig.growth`` names one).

A criterion says how the positions to regrow are scored (the engine regrows the ``k`` best-scored
positions among those inactive after pruning, with :func:`slaknet.sparse.kselect.select_k_mask`) and
what it needs from training, so the engine and the trainer never test a criterion by its name::

    from slaknet.sparse import GrowthCriterion, register_growth
    from slaknet.sparse.kselect import MagnitudeScores

    @register_growth("weight_grad")
    class WeightTimesGrad(GrowthCriterion):
        needs_dense_gradients = True      # stash the dense gradient before it is masked (see before_clip)
        def scores(self, engine, layer, step):
            return MagnitudeScores(layer.param.grad * layer.param)

    SparseEngine(model, opt, growth="weight_grad", ...)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Optional, Type

import torch

from slaknet.sparse.kselect import MagnitudeScores, RandomScores, Scores
from slaknet.sparse.layer import layer_key
from slaknet.sparse.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.sparse.engine import SparseEngine
    from slaknet.sparse.layer import SparseLayer

__all__ = ["GrowthCriterion", "register_growth", "growth_criterion", "growth_names", "momentum_state"]

MOMENTUM_KEYS = ("exp_avg", "momentum_buffer")  # Adam family first moment / SGD momentum

_GROWTH: Registry["GrowthCriterion"] = Registry("growth", "growth criterion")
_REGISTRY = _GROWTH.entries  # name -> class


class GrowthCriterion:
    """How regrowth scores positions (higher = regrown first), and what it needs from training.

    Attributes:
        needs_dense_gradients: the scores read the dense gradient (inactive weights included): the
            engine stashes it in ``engine.dense_grad(layer)`` when gradients are masked before an update
            step (``before_clip`` / ``mask_gradients``), and the trainer must call ``before_clip`` every step.
        needs_momentum: the scores read the optimizer's momentum (``momentum_state``): the engine checks the
            optimizer keeps one, and ``mask_gradients`` becomes a no-op (it would erase that signal).
    """

    needs_dense_gradients: bool = False
    needs_momentum: bool = False

    def scores(self, engine: "SparseEngine", layer: "SparseLayer", step: int) -> Scores:
        """The growth scores of every position of ``layer`` at optimizer step ``step``."""
        raise NotImplementedError


def register_growth(name: str, *, replace: bool = False) -> Callable[[Type[GrowthCriterion]], Type[GrowthCriterion]]:
    """Class decorator: make ``name`` a valid ``SparseConfig.growth`` (``replace`` to override one)."""
    return _GROWTH.register(name, replace=replace)


def growth_names() -> List[str]:
    """The registered criterion names, in registration order (built-ins first)."""
    return _GROWTH.names()


def growth_criterion(name: str) -> GrowthCriterion:
    """A fresh instance of the criterion registered as ``name`` (``ConfigError`` if none is)."""
    return _GROWTH.create(name)


def momentum_state(optimizer: Optional[torch.optim.Optimizer], layer: "SparseLayer") -> torch.Tensor:
    """The optimizer's first moment / momentum buffer of ``layer``'s weight (``RuntimeError`` if none)."""
    st = optimizer.state.get(layer.param, {}) if optimizer is not None else {}
    for k in MOMENTUM_KEYS:
        v = st.get(k)
        if torch.is_tensor(v) and v.shape == layer.param.shape:
            return v
    raise RuntimeError(f"momentum growth: optimizer has no momentum state for {layer.name!r} "
                       f"(expected one of {MOMENTUM_KEYS})")


@register_growth("random")
class RandomGrowth(GrowthCriterion):
    """The paper's: uniformly random positions (seeded by the run seed, the step and the layer)."""

    def scores(self, engine: "SparseEngine", layer: "SparseLayer", step: int) -> Scores:
        return RandomScores(layer.numel, layer_key(engine.config.seed, step, layer.index, 2), layer.param.device)


@register_growth("gradient")
class GradientGrowth(GrowthCriterion):
    """RigL's: the largest |dense gradient| (stashed before masking, else the current ``.grad``)."""

    needs_dense_gradients = True

    def scores(self, engine: "SparseEngine", layer: "SparseLayer", step: int) -> Scores:
        stashed = engine.dense_grad(layer)
        if stashed is not None:
            return MagnitudeScores(stashed)
        if layer.param.grad is None:
            raise RuntimeError(f"gradient growth: {layer.name!r} has no gradient at update step {step}")
        return MagnitudeScores(layer.param.grad)


@register_growth("momentum")
class MomentumGrowth(GrowthCriterion):
    """The largest |momentum| (the optimizer's first moment, read before pruning zeroes it)."""

    needs_momentum = True

    def scores(self, engine: "SparseEngine", layer: "SparseLayer", step: int) -> Scores:
        return MagnitudeScores(momentum_state(engine.optimizer, layer))
