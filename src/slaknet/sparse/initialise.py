"""Initial masks: layer-wise densities (uniform, ERK, SNIP) and exact random masks per layer.

A mixin of :class:`slaknet.sparse.SparseEngine` (it fills the engine's layers, dense_layers and
init_densities).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from slaknet.errors import ConfigError
from slaknet.sparse.density import counts_from_scores, erk_counts, uniform_counts
from slaknet.sparse.distributed import dist_world as _dist_world
from slaknet.sparse.layer import SparseLayer, layer_key as _key

logger = logging.getLogger("slaknet.sparse")


class InitMixin:
    """Builds the initial masks (see :class:`SparseEngine`)."""

    config: Any
    model: nn.Module
    candidates: List[Tuple[str, nn.Parameter]]
    layers: List[SparseLayer]
    dense_layers: List[str]
    init_densities: Dict[str, float]

    def _init_masks(self, snip_batch: Optional[Tuple[Any, Any]], snip_loss: Optional[Callable]) -> None:
        cfg = self.config
        density = 1.0 - cfg.sparsity
        numels = {n: p.numel() for n, p in self.candidates}
        if cfg.sparse_init == "uniform":
            counts = uniform_counts(numels, density)
        elif cfg.sparse_init == "ERK":
            counts, _ = erk_counts({n: tuple(p.shape) for n, p in self.candidates}, density, cfg.erk_power_scale)
        else:
            scores = self._snip_scores(snip_batch, snip_loss)
            counts = counts_from_scores(scores, density)
        for index, (name, param) in enumerate(self.candidates):
            k = counts[name]
            d = k / numels[name]
            self.init_densities[name] = d
            if k >= numels[name] or d >= cfg.dense_threshold:
                self.dense_layers.append(name)
                continue
            mask = self._random_mask(param, k, _key(cfg.seed, 0, index, 1))
            self.layers.append(SparseLayer(name, index, param, mask, mask.clone(), d))
        if not self.layers:
            logger.info("sparse engine: every selected layer is dense at sparsity %.3f", cfg.sparsity)
        logger.info("sparse init %s: %d sparse layers, %d dense, global density %.4f; layer densities:\n%s",
                    cfg.sparse_init, len(self.layers), len(self.dense_layers), self.global_density(),
                    "\n".join(f"  {n}: {d:.4f}{' (dense)' if n in self.dense_layers else ''}"
                              for n, d in self.init_densities.items()))

    @staticmethod
    def _random_mask(param: torch.Tensor, k: int, seed: int) -> torch.Tensor:
        """A bool mask with exactly ``k`` True entries at uniformly random positions."""
        g = torch.Generator(device=param.device)
        g.manual_seed(seed)
        n = param.numel()
        idx = torch.randperm(n, generator=g, device=param.device)[:k]
        mask = torch.zeros(n, dtype=torch.bool, device=param.device)
        mask[idx] = True
        return mask.view_as(param)

    def _snip_scores(self, batch: Optional[Tuple[Any, Any]], loss: Optional[Callable]) -> Dict[str, torch.Tensor]:
        """|w * dL/dw| on one batch, on the unwrapped module, without touching .grad, BN stats or RNG.

        Under torch.distributed the gradients are averaged across ranks so every rank gets the same
        densities.
        """
        model = self.model
        if batch is None and loss is None:
            raise ConfigError("sparse_init='snip' needs snip_batch=(inputs, targets) or snip_loss=callable(model)")
        params = [p for _, p in self.candidates]
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
        if _dist_world() > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= _dist_world()
            grads = list(torch.split(flat, [p.numel() for p in params]))
            grads = [g.view_as(p) for g, p in zip(grads, params)]
        return {n: (p.detach() * g).abs() for (n, p), g in zip(self.candidates, grads)}
