"""Initial layer-wise densities: a registry of name -> :class:`InitRule` (``SparseConfig.sparse_init``).

A rule says how many weights each candidate layer keeps at initialisation, and what it needs; the engine
(:mod:`slaknet.sparse.initialise`) then places that many active entries at seeded random positions, makes
layers at or above ``dense_threshold`` dense, and logs the densities. A new rule is one method::

    from slaknet.sparse import InitRule, register_init

    @register_init("same")
    class SameDensity(InitRule):           # every layer at the target density, rounded down
        def counts(self, engine, density, batch, loss):
            return {n: int(density * p.numel()) for n, p in engine.candidates}

    SparseEngine(model, opt, sparse_init="same", ...)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from slaknet.errors import ConfigError
from slaknet.sparse.density import counts_from_scores, erk_counts, uniform_counts
from slaknet.sparse.distributed import dist_world
from slaknet.sparse.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.sparse.engine import SparseEngine

__all__ = ["InitRule", "register_init", "init_names", "init_rule", "snip_scores"]


class InitRule:
    """How many weights each candidate layer keeps at initialisation, and what that needs.

    Attributes:
        needs_batch: the counts need data: the engine's ``snip_batch`` or ``snip_loss`` (passed on as
            ``batch`` / ``loss``). Without either the engine builds no masks and waits for
            ``load_state_dict`` (a resume), and the trainer fetches a batch before building the engine.
    """

    needs_batch: bool = False

    def counts(self, engine: "SparseEngine", density: float, batch: Optional[Tuple[Any, Any]],
               loss: Optional[Callable[..., torch.Tensor]]) -> Dict[str, int]:
        """Kept weights (0 to numel) per name of ``engine.candidates`` (``(name, param)`` pairs) for the
        global target ``density`` (1 - sparsity)."""
        raise NotImplementedError


_INIT: Registry[InitRule] = Registry("sparse_init", "initialisation")


def register_init(name: str, *, replace: bool = False) -> Callable[[Type[InitRule]], Type[InitRule]]:
    """Class decorator: make ``name`` a valid ``SparseConfig.sparse_init`` (``replace`` to override one)."""
    return _INIT.register(name, replace=replace)


def init_names() -> List[str]:
    """The registered initialisation names, in registration order (built-ins first)."""
    return _INIT.names()


def init_rule(name: str) -> InitRule:
    """A fresh instance of the initialisation registered as ``name`` (``ConfigError`` if none is)."""
    return _INIT.create(name)


@register_init("uniform")
class UniformInit(InitRule):
    """Every layer at the target density (``round(density * numel)``, at least one weight)."""

    def counts(self, engine: "SparseEngine", density: float, batch: Optional[Tuple[Any, Any]],
               loss: Optional[Callable[..., torch.Tensor]]) -> Dict[str, int]:
        return uniform_counts({n: p.numel() for n, p in engine.candidates}, density)


@register_init("ERK")
class ERKInit(InitRule):
    """Erdos-Renyi-Kernel (RigL / SLaK's default): denser small layers, exponent ``erk_power_scale``."""

    def counts(self, engine: "SparseEngine", density: float, batch: Optional[Tuple[Any, Any]],
               loss: Optional[Callable[..., torch.Tensor]]) -> Dict[str, int]:
        shapes = {n: tuple(p.shape) for n, p in engine.candidates}
        return erk_counts(shapes, density, engine.config.erk_power_scale)[0]


@register_init("snip")
class SnipInit(InitRule):
    """SNIP: a global top-k of the saliency |w * dL/dw| on one batch (no layer left empty)."""

    needs_batch = True

    def counts(self, engine: "SparseEngine", density: float, batch: Optional[Tuple[Any, Any]],
               loss: Optional[Callable[..., torch.Tensor]]) -> Dict[str, int]:
        return counts_from_scores(snip_scores(engine.model, engine.candidates, batch, loss), density)


def snip_scores(model: nn.Module, candidates: Sequence[Tuple[str, nn.Parameter]],
                batch: Optional[Tuple[Any, Any]], loss: Optional[Callable[..., torch.Tensor]]
                ) -> Dict[str, torch.Tensor]:
    """|w * dL/dw| of each candidate on one batch, without touching .grad, BN stats or the RNG.

    ``loss`` is ``loss_fn(outputs, targets)`` (default cross entropy) with ``batch=(inputs, targets)``, or
    ``loss(model) -> Tensor`` without a batch. Under torch.distributed the gradients are averaged across
    ranks so every rank gets the same densities.
    """
    if batch is None and loss is None:
        raise ConfigError("sparse_init='snip' needs snip_batch=(inputs, targets) or snip_loss=callable(model)")
    params = [p for _, p in candidates]
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    was_training = model.training
    devices = [p.device for p in params if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices}) if devices else []):
        try:
            model.train()
            with torch.enable_grad():
                if batch is None:
                    value = loss(model)
                else:
                    x, y = batch
                    out = model(x)
                    value = (loss or F.cross_entropy)(out, y)
                grads = torch.autograd.grad(value, params, allow_unused=True)
        finally:
            model.train(was_training)
            with torch.no_grad():  # restore BN running stats etc. touched by the forward
                for k, v in model.named_buffers():
                    v.copy_(buffers[k])
    grads = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]
    if dist_world() > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist_world()
        grads = list(torch.split(flat, [p.numel() for p in params]))
        grads = [g.view_as(p) for g, p in zip(grads, params)]
    return {n: (p.detach() * g).abs() for (n, p), g in zip(candidates, grads)}
