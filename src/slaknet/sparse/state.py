"""Exact resume (:meth:`state_dict` / :meth:`load_state_dict`) and keeping an EMA copy on the masks.

A mixin of :class:`slaknet.sparse.SparseEngine`.
"""
from __future__ import annotations

import logging
from typing import Any, Dict

import torch
import torch.nn as nn

from slaknet.errors import CheckpointError
from slaknet.sparse.layer import SparseLayer
from slaknet.sparse.selection import unwrap_model

logger = logging.getLogger("slaknet.sparse")

_STATE_VERSION = 1


class StateMixin:
    """Checkpoint state and EMA following (see :class:`SparseEngine`)."""

    @torch.no_grad()
    def sync_ema(self, ema: Any) -> None:
        """Make an EMA copy follow the masks: call right after every ``ema.update(model)``.

        ``ema`` is the averaged module or a timm ``ModelEma*`` (its ``.module``). Inactive positions become 0
        (as :meth:`apply_masks`); regrown positions take the model's value instead of ramping up from 0,
        as the research code's sparse EMA does (it copies the model into active positions whose average is
        still 0): from the first ``sync_ema`` after an update, until the model's value there is non-zero.
        """
        module = unwrap_model(ema.module if hasattr(ema, "module") and isinstance(ema.module, nn.Module) else ema)
        self.apply_masks(module)
        params = dict(module.named_parameters())
        key = id(module)
        seen = self._ema_sync.get(key)
        if seen is None or seen[0] != self.update_count:
            prev = seen[1] if seen is not None else None
            fresh = seen[2] if seen is not None else {}
            new_fresh: Dict[str, torch.Tensor] = {}
            for layer in self.layers:
                p, m = params[layer.name], layer.mask.to(params[layer.name].device)
                grown = m & ~prev[layer.name] if prev is not None else m & (p == 0)
                idx = grown.reshape(-1).nonzero().squeeze(1)
                old = fresh.get(layer.name)
                if old is not None and old.numel():
                    idx = torch.cat([old[m.reshape(-1)[old]], idx]).unique()
                new_fresh[layer.name] = idx
            seen = (self.update_count, {l.name: l.mask.clone() for l in self.layers}, new_fresh)
            self._ema_sync[key] = seen
        for layer in self.layers:
            idx = seen[2].get(layer.name)
            if idx is None or not idx.numel():
                continue
            p = params[layer.name]
            src = layer.param.detach().reshape(-1)[idx.to(layer.param.device)].to(p.device)
            p[torch.unravel_index(idx, p.shape)] = src  # (also for channels_last EMA weights)
            seen[2][layer.name] = idx[src == 0]  # still 0 in the model: copy again next time

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly (loadable with ``torch.load(weights_only=True)``)."""
        return {"version": _STATE_VERSION, "config": self.config.to_dict(), "step": self.step_count,
                "skipped_steps": self.skipped_steps, "updates": self.update_count,
                "prune_rate": self.prune_rate_at(self.step_count),
                "masks": {layer.name: layer.mask.detach().cpu().clone() for layer in self.layers},
                "ever_active": {layer.name: layer.ever_active.detach().cpu().clone() for layer in self.layers},
                "init_densities": dict(self.init_densities), "dense_layers": list(self.dense_layers),
                "history": [dict(h) for h in self.history]}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore masks and counters (never re-initialises masks) and re-apply masks to the weights."""
        if not isinstance(state, dict) or "masks" not in state:
            raise CheckpointError("not a sparse-engine state (no 'masks')")
        if int(state.get("version", 0)) > _STATE_VERSION:
            raise CheckpointError(f"sparse state version {state.get('version')} is newer than supported")
        masks, ever = state["masks"], state.get("ever_active", {})
        names = {n for n, _ in self.candidates}
        unknown = [n for n in masks if n not in names]
        if unknown:
            raise CheckpointError(f"sparse state has a mask for {unknown[0]!r}, which this engine does not manage")
        saved_cfg = state.get("config", {})
        for k in ("sparsity", "growth", "update_frequency", "redistribution", "sparse_init", "prune"):
            if k in saved_cfg and saved_cfg[k] != getattr(self.config, k):
                logger.warning("sparse resume: %s was %r in the checkpoint, now %r", k, saved_cfg[k],
                               getattr(self.config, k))
        params = dict(self.candidates)
        index = {n: i for i, (n, _) in enumerate(self.candidates)}
        layers = []
        for name, mask in masks.items():
            p = params[name]
            if tuple(mask.shape) != tuple(p.shape):
                raise CheckpointError(f"mask {name!r} has shape {tuple(mask.shape)}, weight has {tuple(p.shape)}")
            m = mask.to(device=p.device, dtype=torch.bool).clone().contiguous()
            e = ever.get(name, mask).to(device=p.device, dtype=torch.bool).clone() | m
            d = float(state.get("init_densities", {}).get(name, m.float().mean().item()))
            layers.append(SparseLayer(name, index[name], p, m, e, d))
        layers.sort(key=lambda l: l.index)
        self.layers = layers
        self.dense_layers = [n for n, _ in self.candidates if n not in masks]
        self.init_densities = {n: float(v) for n, v in state.get("init_densities", {}).items()} or \
            {l.name: l.init_density for l in layers}
        self.step_count = int(state.get("step", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.update_count = int(state.get("updates", 0))
        self.history = [dict(h) for h in state.get("history", [])]
        self.last_update = None
        self._awaiting_state = False
        self._parked.clear()  # new masks: the next step re-masks and parks again
        self._ema_sync.clear()
        self.apply_masks()
        self._check_ranks_agree()
