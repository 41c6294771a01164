"""Topology updates: the prune-rate schedule, pruning, regrowth and the optimizer-state policy.

A mixin of :class:`slaknet.sparse.SparseEngine`. It composes the configured strategies: prune scores come
from the :class:`slaknet.sparse.prune.PruneCriterion` (``prune``), how many weights each layer regrows from
the :class:`slaknet.sparse.redistribution.Redistribution` (``redistribution``), and regrowth scores from
the :class:`slaknet.sparse.growth.GrowthCriterion` (``growth``).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional

import torch

from slaknet.errors import ConfigError
from slaknet.sparse.bits import INF_BITS as _INF_BITS
from slaknet.sparse.bits import edit_bits_ as _edit_bits_
from slaknet.sparse.bits import zero_inactive_ as _zero_inactive_
from slaknet.sparse.distributed import dist_world as _dist_world
from slaknet.sparse.growth import GrowthCriterion
from slaknet.sparse.kselect import select_k_mask
from slaknet.sparse.layer import SparseLayer
from slaknet.sparse.parking import SECOND_MOMENT_KEYS
from slaknet.sparse.prune import PruneCriterion
from slaknet.sparse.redistribution import Redistribution

logger = logging.getLogger("slaknet.sparse")

_MOMENTUM_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam,
                        torch.optim.RAdam, torch.optim.Adamax)


class UpdateMixin:
    """Prune-and-regrow (see :class:`SparseEngine`)."""

    config: Any
    optimizer: Optional[torch.optim.Optimizer]
    growth: GrowthCriterion
    prune: PruneCriterion
    redistribution: Redistribution
    layers: List[SparseLayer]
    step_count: int
    update_count: int
    history: List[Dict[str, Any]]
    last_update: Optional[Dict[str, Any]]
    on_update: List[Callable[[Dict[str, Any]], None]]
    _dense_grads: Optional[Dict[str, torch.Tensor]]

    def prune_rate_at(self, step: int) -> float:
        """Prune rate used by an update at optimizer step ``step`` (cosine from prune_rate to final)."""
        cfg = self.config
        if cfg.prune_rate_decay == "constant" or not cfg.total_steps:
            return cfg.prune_rate
        t = min(max(step, 0), cfg.total_steps) / cfg.total_steps
        return cfg.prune_rate_final + 0.5 * (cfg.prune_rate - cfg.prune_rate_final) * (1.0 + math.cos(math.pi * t))

    def update_due(self, step: int) -> bool:
        """True when a topology update runs after optimizer step ``step`` (1-based)."""
        cfg = self.config
        if cfg.fix or not self.layers or step % int(cfg.update_frequency) != 0:
            return False
        end = cfg.update_end if cfg.update_end is not None else cfg.total_steps
        return end is None or step < end

    def _check_optimizer_for_momentum(self) -> None:
        """ConfigError unless the optimizer keeps momentum, when a configured strategy reads it."""
        cfg = self.config
        strategies = (("growth", self.growth), ("prune", self.prune), ("redistribution", self.redistribution))
        readers = [f"{f}={getattr(cfg, f)!r}" for f, s in strategies if s.needs_momentum]
        if not readers or cfg.fix:
            return
        who = " and ".join(readers) + (" need" if len(readers) > 1 else " needs")
        opt = self.optimizer
        if opt is None:
            raise ConfigError(f"{who} the optimizer (its momentum state)")
        if isinstance(opt, torch.optim.SGD) and not any(g.get("momentum", 0) for g in opt.param_groups):
            raise ConfigError(f"{who} an optimizer with momentum (SGD momentum=0 has no momentum buffer)")
        if not isinstance(opt, _MOMENTUM_OPTIMIZERS):
            logger.warning("%s: %s must keep 'exp_avg' or 'momentum_buffer' state", " and ".join(readers),
                           type(opt).__name__)

    def dense_grad(self, layer: SparseLayer) -> Optional[torch.Tensor]:
        """The dense gradient of ``layer`` stashed for this update by :meth:`mask_gradients`, or None."""
        if self._dense_grads is None:
            return None
        return self._dense_grads.get(layer.name)

    @torch.no_grad()
    def update_topology(self) -> Dict[str, Any]:
        """Prune ``ceil(rate * active)`` lowest-scored active weights per layer and regrow as many.

        Pruning scores come from the prune criterion (``magnitude``: smallest |w| first), the regrowth
        count per layer from the redistribution (``none``: as many as pruned). Regrowth picks among
        positions inactive after pruning (by the growth criterion's scores); grown weights start at
        exactly 0, and with ``optimizer_state='zero'`` the optimizer state of pruned and grown positions is
        zeroed. Returns (and logs) the update record.
        """
        self.apply_masks()
        return self._update()

    @torch.no_grad()
    def _update(self) -> Dict[str, Any]:
        step = self.step_count
        rate = self.prune_rate_at(step)
        self._check_all_parked()  # parked layers skipped the per-step pass: verify them now
        # 1) prune: the k lowest prune scores (smallest |w| for magnitude) among active weights, as a bool
        #    mask per layer
        pruned: Dict[str, torch.Tensor] = {}
        n_prune: Dict[str, int] = {}
        for layer in self.layers:
            active = layer.count
            k = min(int(math.ceil(rate * active)), max(active - 1, 0))
            n_prune[layer.name] = k
            pruned[layer.name] = select_k_mask(self.prune.scores(self, layer, step), k, largest=False,
                                               allowed=layer.mask.view(-1), n_allowed=active)
        # 2) how many to regrow per layer
        n_grow = self.redistribution.counts(self, n_prune, pruned)
        # 3) regrow among positions inactive after pruning
        records = []
        for layer in self.layers:
            records.append(self._regrow_layer(layer, step, pruned.pop(layer.name), n_prune[layer.name],
                                              n_grow[layer.name]))
        self._dense_grads = None
        self.update_count += 1
        return self._finish_update({"step": step, "update": self.update_count, "prune_rate": rate,
                                    "pruned": sum(r["pruned"] for r in records),
                                    "regrown": sum(r["regrown"] for r in records),
                                    "density": self.global_density(), "itop_rate": self.itop_rate(),
                                    "layers": records})

    def _regrow_layer(self, layer: SparseLayer, step: int, p_sel: torch.Tensor, n_pruned: int,
                      k: int) -> Dict[str, Any]:
        """Apply one layer's pruning (flat bool ``p_sel``) and regrow ``k`` weights; its update record."""
        shape = layer.param.shape
        mask = layer.mask.view(-1)  # updated in place (masks are contiguous)
        mask &= ~p_sel
        g_sel = select_k_mask(self.growth.scores(self, layer, step), k, largest=True, allowed=~mask,
                              n_allowed=layer.numel - layer.count + n_pruned)
        mask |= g_sel
        # pruned weights -> 0, and every regrown weight starts at 0 (RigL's rule), also one pruned and
        # regrown in this same update (grown positions that were inactive before already hold 0)
        _zero_inactive_(layer.param.data, (mask & ~g_sel).view(shape))
        if self.config.optimizer_state == "zero" and self.optimizer is not None:
            # (a pruned position can be regrown in the same update: it is active again)
            self._zero_optimizer_state(layer, ~(p_sel | g_sel), newly_inactive=p_sel & ~mask)
        layer.count = layer.count - n_pruned + k
        ever = layer.ever_active.view(-1)
        layer.ever_count += int(torch.count_nonzero(g_sel & ~ever))
        ever |= g_sel
        return {"name": layer.name, "pruned": n_pruned, "regrown": k, "active": layer.count,
                "numel": layer.numel}

    def _finish_update(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Check ranks, record, log and call back after an update."""
        if self.config.sync_check and _dist_world() > 1:
            self.check_consistency()
        self.last_update = record
        self._refresh_versions()
        self.history.append({k: v for k, v in record.items() if k != "layers"})
        logger.info("sparse update %d @ step %d: rate %.4f, pruned %d, regrown %d, density %.4f, ITOP %.4f",
                    self.update_count, record["step"], record["prune_rate"], record["pruned"],
                    record["regrown"], record["density"], record["itop_rate"])
        for cb in self.on_update:
            cb(record)
        return record

    def _zero_optimizer_state(self, layer: SparseLayer, keep: torch.Tensor, newly_inactive: torch.Tensor) -> None:
        """Zero every optimizer-state tensor shaped like the weight where the flat bool ``keep`` is False.

        Floating state is multiplied by the 0/1 mask (one streaming pass; exact for finite state), second
        moments are edited on their bit patterns (exact also over +inf). A parked layer's second moments
        instead become +inf at the ``newly_inactive`` positions (and 0 at the regrown ones), so those
        weights are held at zero too.
        """
        state = self.optimizer.state.get(layer.param)
        if not state:
            return
        shape = layer.param.shape
        keep = keep.view(shape)
        held = self._parked.get(layer.name)
        parked = held.slots if held is not None else ()
        for k, v in state.items():
            if not (torch.is_tensor(v) and v.shape == shape):
                continue
            if not v.is_floating_point():
                v.masked_fill_(~keep, 0)
            elif any(v is t for t in parked):
                _edit_bits_(v, keep, to_inf=newly_inactive.view(shape))
            elif k in SECOND_MOMENT_KEYS and v.dtype in _INF_BITS:
                _edit_bits_(v, keep)  # may hold +inf from parking that was switched off: inf * 0 is NaN
            else:
                _zero_inactive_(v, keep)
