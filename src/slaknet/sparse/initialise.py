"""Initial masks: exact random masks per layer, with the layer-wise counts of the configured initialisation.

A mixin of :class:`slaknet.sparse.SparseEngine` (it fills the engine's layers, dense_layers and
init_densities). How many weights each layer keeps comes from the engine's
:class:`slaknet.sparse.init_rules.InitRule` (``uniform``, ``ERK``, ``snip`` or a registered one); where
they go is the same for every rule: ``k`` seeded uniformly random positions.
"""
from __future__ import annotations

import logging
import numbers
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from slaknet.errors import ConfigError
from slaknet.sparse.init_rules import InitRule
from slaknet.sparse.layer import SparseLayer, layer_key as _key

logger = logging.getLogger("slaknet.sparse")


class InitMixin:
    """Builds the initial masks (see :class:`SparseEngine`)."""

    config: Any
    model: nn.Module
    sparse_init: InitRule
    candidates: List[Tuple[str, nn.Parameter]]
    layers: List[SparseLayer]
    dense_layers: List[str]
    init_densities: Dict[str, float]

    def _init_masks(self, snip_batch: Optional[Tuple[Any, Any]], snip_loss: Optional[Callable]) -> None:
        cfg = self.config
        numels = {n: p.numel() for n, p in self.candidates}
        counts = self.sparse_init.counts(self, 1.0 - cfg.sparsity, snip_batch, snip_loss)
        self._check_counts(counts, numels)
        for index, (name, param) in enumerate(self.candidates):
            k = int(counts[name])
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

    def _check_counts(self, counts: Dict[str, int], numels: Dict[str, int]) -> None:
        """ConfigError unless the initialisation gave an integer count in [0, numel] for every candidate."""
        for name, numel in numels.items():
            k = counts.get(name)
            if not isinstance(k, numbers.Integral) or not 0 <= k <= numel:
                raise ConfigError(f"sparse_init {self.config.sparse_init!r} gave {k!r} kept weights for {name!r} "
                                  f"(an int in [0, {numel}] expected)")

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
