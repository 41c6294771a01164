"""The dynamic sparse training engine (SLaK / RigL-style prune-and-regrow with exact, resumable masks).

Usage in one's own loop (three lines)::

    engine = SparseEngine(model, optimizer, sparsity=0.4, total_steps=len(loader) * epochs)
    ...                                   # unchanged loop: optimizer.step() / scaler.step(optimizer)
    ckpt["sparse"] = engine.state_dict()  # and engine.load_state_dict(ckpt["sparse"]) on resume

The engine registers a post-step hook on the optimizer, so every *real* optimizer step (also through
``GradScaler.step``, which does not call ``optimizer.step()`` when it skips a step) is followed by
re-applying the masks and, every ``update_frequency`` real steps, by a topology update.
See docs/sparse.md for every option and the policies for optimizer state, AMP, DDP and EMA.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from slaknet.errors import ConfigError
from slaknet.sparse.parking import ParkingMixin
from slaknet.sparse.bits import CHUNK as _CHUNK, INF_BITS as _INF_BITS  # noqa: F401 (tests use them)
from slaknet.sparse.bits import any_nonfinite_where as _any_nonfinite_where  # noqa: F401
from slaknet.sparse.bits import any_nonzero_where as _any_nonzero_where  # noqa: F401
from slaknet.sparse.bits import edit_bits_ as _edit_bits_  # noqa: F401
from slaknet.sparse.bits import zero_inactive_ as _zero_inactive_
from slaknet.sparse.config import SparseConfig
from slaknet.sparse.distributed import DistributedMixin
from slaknet.sparse.growth import growth_criterion
from slaknet.sparse.init_rules import init_rule
from slaknet.sparse.initialise import InitMixin
from slaknet.sparse.layer import SparseLayer
from slaknet.sparse.prune import prune_criterion
from slaknet.sparse.redistribution import redistribution_rule
from slaknet.sparse.report import ReportMixin
from slaknet.sparse.selection import select_parameters, unwrap_model
from slaknet.sparse.state import StateMixin
from slaknet.sparse.update import UpdateMixin

__all__ = ["SparseConfig", "SparseEngine", "SparseLayer"]

logger = logging.getLogger("slaknet.sparse")


class SparseEngine(ParkingMixin, DistributedMixin, InitMixin, UpdateMixin, ReportMixin, StateMixin):
    """Dynamic sparse training for any ``nn.Module`` (see module docstring and docs/sparse.md).

    Args:
        model: the model (a DDP / DataParallel / compiled wrapper is unwrapped, never copied).
        optimizer: the optimizer updating the model; every managed weight must be in it.
        config: a :class:`SparseConfig`; keyword arguments override its fields
            (``SparseEngine(model, opt, sparsity=0.4, total_steps=n)``).
        snip_batch: ``(inputs, targets)`` for ``sparse_init="snip"`` (or another initialisation whose
            ``needs_batch`` is set).
        snip_loss: loss for SNIP, ``loss_fn(outputs, targets)`` (default cross entropy), or, when
            ``snip_batch`` is None, a callable ``loss(model) -> Tensor`` that runs a batch itself.
        attach: register the optimizer post-step hook (default). With ``attach=False`` call
            :meth:`after_step` yourself after each *real* optimizer step.
        on_update: callbacks receiving the update record dict after each topology update.
        state: a :meth:`state_dict` to resume from: masks come from it and no initialisation runs
            (SNIP then needs no batch). Equivalent to constructing and calling :meth:`load_state_dict`,
            which is also allowed for ``sparse_init='snip'`` (an initialisation that needs a batch) without
            one: such an engine waits for its state and refuses to run a forward or step before it arrives.

    The strategies named by the config are composed, never tested by name: ``engine.sparse_init``
    (:class:`~slaknet.sparse.init_rules.InitRule`), ``engine.prune``
    (:class:`~slaknet.sparse.prune.PruneCriterion`), ``engine.redistribution``
    (:class:`~slaknet.sparse.redistribution.Redistribution`) and ``engine.growth``
    (:class:`~slaknet.sparse.growth.GrowthCriterion`), each from its registry.
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 config: Optional[SparseConfig] = None, *, snip_batch: Optional[Tuple[Any, Any]] = None,
                 snip_loss: Optional[Callable[..., torch.Tensor]] = None, attach: bool = True,
                 on_update: Optional[List[Callable[[Dict[str, Any]], None]]] = None,
                 state: Optional[Dict[str, Any]] = None, **overrides: Any) -> None:
        cfg = dataclasses.replace(config) if config is not None else SparseConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise ConfigError(f"unknown sparse option {k!r}")
            setattr(cfg, k, v)
        if cfg.seed is None:  # None means "the run's seed" to the trainer; alone, the engine uses 0
            cfg.seed = 0
        cfg.validate()
        self.config = cfg
        # the strategies (each from its registry): initial densities, prune scores, regrowth counts, regrowth scores
        self.sparse_init = init_rule(cfg.sparse_init)
        self.prune = prune_criterion(cfg.prune)
        self.redistribution = redistribution_rule(cfg.redistribution)
        self.growth = growth_criterion(cfg.growth)
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self.step_count = 0          # real optimizer steps seen
        self.skipped_steps = 0       # skipped steps seen (fused-optimizer found_inf, or via engine.step(scaler))
        self.update_count = 0        # topology updates done
        self.history: List[Dict[str, Any]] = []  # global figures per update (small)
        self.last_update: Optional[Dict[str, Any]] = None
        self.on_update = list(on_update or [])
        self._hook = None
        self._dense_grads: Optional[Dict[str, torch.Tensor]] = None
        # layer name -> the optimizer-state tensors holding its inactive weights at zero (see _park)
        self._parked: Dict[str, Any] = {}
        self._park_disabled = False
        self._warned_rewrite: set = set()
        self._guard = None  # forward hooks repairing non-finite parked weights (see _install_guard)
        self._buffers: List[torch.Tensor] = []
        self._buffer_copy: List[torch.Tensor] = []
        self._rerun = False
        self._ema_sync: Dict[int, Tuple[int, Dict[str, torch.Tensor]]] = {}  # see sync_ema

        chosen = select_parameters(self.model, cfg.layers, cfg.include, cfg.exclude)
        if not chosen:
            raise ConfigError("the sparse engine found no weight to make sparse (check layers/include/exclude)")
        self.candidates = [(n, p) for n, _, p in chosen]
        self._check_params(optimizer)
        self._check_optimizer_for_momentum()
        self.layers: List[SparseLayer] = []
        self.dense_layers: List[str] = []
        self.init_densities: Dict[str, float] = {}
        self._modules = {n: mod for n, mod, _ in chosen}
        self._pending: List[Any] = []
        self._awaiting_state = False
        self._share_seed()
        if state is not None:
            self.load_state_dict(state)
        elif self.sparse_init.needs_batch and snip_batch is None and snip_loss is None:
            self._awaiting_state = True
        else:
            self._init_masks(snip_batch, snip_loss)
        # Masks reach the weights lazily, right before the first forward of a sparse layer (or at the first
        # optimizer step / apply_masks / load_state_dict), so that building the engine after loading trained
        # weights and then calling load_state_dict never zeroes trained weights with fresh random masks.
        if state is None:
            self._install_pending()
        if attach and optimizer is not None:
            self.attach(optimizer)
        self._check_ranks_agree()

    # ----------------------------------------------------------------------------------- wiring ---------
    def _check_params(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """ConfigError unless every managed weight is still the model's parameter and in ``optimizer``."""
        current = {id(p) for p in self.model.parameters()}
        stale = [n for n, p in self.candidates if id(p) not in current]
        if stale:
            raise ConfigError(f"sparse weight {stale[0]!r} is no longer a parameter of the model ({len(stale)} such "
                              "weights; replaced by load_state_dict(assign=True) or a new layer?): build a new "
                              "SparseEngine for the model, with state=old_engine.state_dict() to keep the masks")
        if optimizer is not None:
            in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
            missing = [n for n, p in self.candidates if id(p) not in in_opt]
            if missing:
                raise ConfigError(f"sparse weight {missing[0]!r} is not in the optimizer ({len(missing)} such "
                                  "weights): build the optimizer over the model's current parameters")

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Register the post-step hook on ``optimizer`` (done by the constructor unless attach=False).

        Checks, like the constructor, that the managed weights are still the model's parameters and all in
        ``optimizer`` (``ConfigError`` otherwise).
        """
        self._check_params(optimizer)
        self._remove_hook()
        if optimizer is not self.optimizer:
            self._unpark_all()
        self.optimizer = optimizer
        self._hook = optimizer.register_step_post_hook(self._post_step_hook)

    def detach(self) -> None:
        """Remove the optimizer hook; masks stay applied, later steps are no longer masked.

        Parked layers get finite optimizer state back (their +inf second moments become 0, as for a regrown
        weight), so the inactive weights can train again.
        """
        self._remove_hook()
        self._unpark_all()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def step(self, scaler: Optional[Any] = None, closure: Optional[Callable] = None) -> Any:
        """Convenience: ``scaler.step(optimizer)`` or ``optimizer.step(closure)``, masked afterwards.

        Works whether or not the hook is attached (a temporary hook is used when it is not), so a step
        the scaler skips is never counted.
        """
        if self.optimizer is None:
            raise ConfigError("SparseEngine.step needs an optimizer")
        handle = None
        if self._hook is None:
            handle = self.optimizer.register_step_post_hook(self._post_step_hook)
        seen = self.step_count + self.skipped_steps
        try:
            out = scaler.step(self.optimizer) if scaler is not None else self.optimizer.step(closure)
        finally:
            if handle is not None:
                handle.remove()
        if self.step_count + self.skipped_steps == seen:  # the scaler did not call optimizer.step()
            self.skipped_steps += 1
        return out

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # fused/capturable optimizers are stepped even when the scaler found inf and skip internally
        found = getattr(optimizer, "found_inf", None)
        if found is None and isinstance(kwargs, dict) and kwargs.get("grad_scaler") is not None:
            st = kwargs["grad_scaler"]._per_optimizer_states.get(id(optimizer), {})
            vals = list(st.get("found_inf_per_device", {}).values())
            found = sum(v.float().sum() for v in vals) if vals else None
        skipped = found is not None and bool(torch.as_tensor(found).float().sum().item() > 0)
        self.after_step(skipped=skipped)

    def after_step(self, skipped: bool = False) -> None:
        """Call after each optimizer step (the hook does): re-mask, count the step, update if due."""
        self._check_ready()
        self._remask()
        if skipped:
            self.skipped_steps += 1
            return
        self.step_count += 1
        if self.update_due(self.step_count):
            self._update()  # the masks were just re-applied
        elif self._parked and self.step_count % int(self.config.update_frequency) == 0:
            self._check_all_parked()  # e.g. fixed masks: no updates, still checked every u steps
        self._refresh_versions()

    # ------------------------------------------------------------------------------------ masks ---------
    def _install_pending(self) -> None:
        self._clear_pending()
        names = list(self._modules) if self._awaiting_state else [l.name for l in self.layers]
        mods = {id(self._modules[n]): self._modules[n] for n in names}
        self._pending = [m.register_forward_pre_hook(self._pending_hook) for m in mods.values()]

    def _clear_pending(self) -> None:
        for h in self._pending:
            h.remove()
        self._pending = []

    def _pending_hook(self, module: nn.Module, args: Any) -> None:
        self._check_ready()
        self.apply_masks()

    def _check_ready(self) -> None:
        if self._awaiting_state:
            raise ConfigError(f"sparse_init={self.config.sparse_init!r} needs snip_batch=(inputs, targets) or "
                              "snip_loss=callable(model) (or load_state_dict before training)")

    @property
    def masks_applied(self) -> bool:
        """False until the initial masks have been written into the weights (first forward / step)."""
        return not self._pending

    @torch.no_grad()
    def apply_masks(self, module: Optional[nn.Module] = None) -> None:
        """Zero every inactive weight; with ``module`` (e.g. an EMA copy) mask its same-named weights."""
        if module is None:
            if self._pending and not self._awaiting_state:
                self._clear_pending()
            for layer in self.layers:
                _zero_inactive_(layer.param.data, layer.mask)
            return
        params = dict(unwrap_model(module).named_parameters())
        for layer in self.layers:
            p = params.get(layer.name)
            if p is None or p.shape != layer.mask.shape:
                raise ConfigError(f"module has no weight {layer.name!r} of shape {tuple(layer.mask.shape)}")
            _zero_inactive_(p, layer.mask.to(p.device))

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero gradients of inactive weights (optional; e.g. before gradient-norm clipping).

        Not needed for correctness (weights are re-masked after every step). A growth criterion that
        needs dense gradients (``gradient``) gets them at update steps: before the step that will trigger
        an update, the dense gradients are stashed (one copy, every ``update_frequency`` steps) and used
        for growth. With a criterion that reads momentum this is a no-op (see docs/sparse.md).
        """
        if self.growth.needs_momentum and not self.config.fix:
            # inactive weights' accumulated momentum is the growth signal: masking their gradients
            # would erase it, so this is a documented no-op with momentum growth
            if not getattr(self, "_warned_mask_grad", False):
                logger.warning("mask_gradients() does nothing with growth=%r (it would erase the momentum of "
                               "inactive weights that growth ranks by)", self.config.growth)
                self._warned_mask_grad = True
            return
        if self.growth.needs_dense_gradients and self.update_due(self.step_count + 1):
            self._dense_grads = {layer.name: layer.param.grad.detach().clone() for layer in self.layers
                                 if layer.param.grad is not None}
        for layer in self.layers:
            if layer.param.grad is not None:
                _zero_inactive_(layer.param.grad, layer.mask)

    @property
    def needs_masked_gradients(self) -> bool:
        """True when the growth criterion needs :meth:`before_clip` every step (to stash dense gradients)."""
        return self.growth.needs_dense_gradients

    def before_clip(self, clip: bool) -> None:
        """Call every step after backward (and ``scaler.unscale_``), before clipping and the optimizer step.

        Masks the gradients when ``clip`` (gradient-norm clipping is on: the norm is the sparse model's)
        or when the growth criterion needs the dense gradient stashed first; otherwise does nothing. The
        trainer thus never tests a criterion by name.
        """
        if clip or self.needs_masked_gradients:
            self.mask_gradients()

    def masks(self) -> Dict[str, torch.Tensor]:
        """Name -> bool mask (True = active) of every sparse layer."""
        return {layer.name: layer.mask for layer in self.layers}

