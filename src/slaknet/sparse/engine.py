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
import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from slaknet.errors import CheckpointError, ConfigError
from slaknet.sparse.parking import _SECOND_MOMENT_KEYS, ParkingMixin
from slaknet.sparse.density import counts_from_scores, erk_counts, uniform_counts
from slaknet.sparse.bits import CHUNK as _CHUNK, INF_BITS as _INF_BITS  # noqa: F401 (tests use them)
from slaknet.sparse.bits import any_nonfinite_where as _any_nonfinite_where  # noqa: F401
from slaknet.sparse.bits import any_nonzero_where as _any_nonzero_where  # noqa: F401
from slaknet.sparse.bits import edit_bits_ as _edit_bits_
from slaknet.sparse.bits import zero_inactive_ as _zero_inactive_
from slaknet.sparse.distributed import DistributedMixin, dist_world as _dist_world
from slaknet.sparse.kselect import MagnitudeScores, RandomScores, select_k_mask
from slaknet.sparse.selection import ParamFilter, select_parameters, unwrap_model

__all__ = ["SparseConfig", "SparseEngine", "SparseLayer"]

logger = logging.getLogger("slaknet.sparse")

_INITS = ("uniform", "ERK", "snip")
_GROWTHS = ("random", "gradient", "momentum")
_REDISTS = ("none", "magnitude", "momentum")
_DECAYS = ("cosine", "constant")
_OPT_POLICIES = ("zero", "keep")
_MASKINGS = ("auto", "pass")
_MOMENTUM_KEYS = ("exp_avg", "momentum_buffer")  # Adam family first moment / SGD momentum

_STATE_VERSION = 1


@dataclasses.dataclass
class SparseConfig:
    """All options of the engine (names follow the training CLI flags; see docs/sparse.md).

    Attributes:
        sparsity: global fraction of zero weights over the sparse layers (``--sparsity``), in [0, 1).
        sparse_init: initial layer-wise density: ``uniform``, ``ERK`` or ``snip`` (``--sparse-init``).
        erk_power_scale: exponent on ERK's raw density ``(sum(shape)/prod(shape))``; 0 gives uniform.
        prune_rate: initial fraction of active weights pruned (and regrown) per update (``--prune-rate``).
        prune_rate_final: prune rate reached at ``total_steps`` by the cosine schedule.
        prune_rate_decay: ``cosine`` (default; needs ``total_steps``) or ``constant``.
        growth: regrowth criterion: ``random`` (paper), ``gradient`` (RigL) or ``momentum`` (``--growth``).
        update_frequency: topology update every this many real optimizer steps (``-u/--update-frequency``).
        total_steps: planned number of optimizer steps (cosine horizon).
        update_end: no topology updates at or after this step (default: ``total_steps``).
        redistribution: ``none`` (paper), ``magnitude`` or ``momentum`` (``--redistribution``): how the
            regrowth count is shared across layers.
        fix: static masks, never updated (``--fix``).
        layers: ``all`` (every conv / linear weight), ``large_kernel`` (only SLaK's large-kernel strips)
            or ``none`` (only ``include``).
        include / exclude: extra / excluded weights: glob patterns on parameter names or a predicate
            ``(name, module, param) -> bool``.
        dense_threshold: a layer whose initial density is at least this stays dense (no mask); 1.0 keeps
            exact counts, 0.99 is the research code's cut.
        optimizer_state: ``zero`` (default, RigL's: pruned and regrown positions get zeroed optimizer
            state, so a regrown weight starts from 0 with fresh moments) or ``keep`` (the research code's).
            Either way a regrown weight starts at 0, also one pruned and regrown in the same update.
        seed: seed of all mask randomness (keyed by seed, step and layer; under torch.distributed rank 0's
            seed is used on every rank, so per-rank seeding cannot split the masks).
        sync_check: under torch.distributed, compare a mask checksum across ranks once at initialisation
            (``ConfigError`` if they differ) and at each update (``RuntimeError``).
        masking: how inactive weights are kept at zero between updates. ``auto`` (default): with a fused
            ``torch.optim.Adam``/``AdamW`` on CPU and ``optimizer_state='zero'``, their second moment is
            held at +inf, so the optimizer's own update there is exactly 0 and no pass over the weights
            is needed; with any other optimizer, and with ``pass``, the masks are multiplied into the
            weights after every step.
    """

    sparsity: float = 0.4
    sparse_init: str = "ERK"
    erk_power_scale: float = 1.0
    prune_rate: float = 0.3
    prune_rate_final: float = 0.005
    prune_rate_decay: str = "cosine"
    growth: str = "random"
    update_frequency: int = 100
    total_steps: Optional[int] = None
    update_end: Optional[int] = None
    redistribution: str = "none"
    fix: bool = False
    layers: str = "all"
    include: ParamFilter = None
    exclude: ParamFilter = None
    dense_threshold: float = 1.0
    optimizer_state: str = "zero"
    seed: int = 0
    sync_check: bool = True
    masking: str = "auto"

    def validate(self) -> None:
        """Raise :class:`ConfigError` (one line) for an invalid or ill-defined combination."""
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.sparse_init not in _INITS:
            raise ConfigError(f"sparse_init must be one of {_INITS}, got {self.sparse_init!r}")
        if self.growth not in _GROWTHS:
            raise ConfigError(f"growth must be one of {_GROWTHS}, got {self.growth!r}")
        if self.redistribution not in _REDISTS:
            raise ConfigError(f"redistribution must be one of {_REDISTS}, got {self.redistribution!r}")
        if self.prune_rate_decay not in _DECAYS:
            raise ConfigError(f"prune_rate_decay must be one of {_DECAYS}, got {self.prune_rate_decay!r}")
        if self.optimizer_state not in _OPT_POLICIES:
            raise ConfigError(f"optimizer_state must be one of {_OPT_POLICIES}, got {self.optimizer_state!r}")
        if self.masking not in _MASKINGS:
            raise ConfigError(f"masking must be one of {_MASKINGS}, got {self.masking!r}")
        if not 0.0 <= self.prune_rate < 1.0:
            raise ConfigError(f"prune_rate must be in [0, 1), got {self.prune_rate}")
        if not 0.0 <= self.prune_rate_final <= 1.0:
            raise ConfigError(f"prune_rate_final must be in [0, 1], got {self.prune_rate_final}")
        if int(self.update_frequency) < 1:
            raise ConfigError(f"update_frequency must be >= 1, got {self.update_frequency}")
        if self.total_steps is not None and int(self.total_steps) < 1:
            raise ConfigError(f"total_steps must be >= 1, got {self.total_steps}")
        if (not self.fix and self.prune_rate_decay == "cosine" and self.total_steps is None):
            raise ConfigError("the cosine prune-rate schedule needs total_steps (planned optimizer steps); "
                              "pass total_steps or prune_rate_decay='constant'")
        if not 0.0 < self.dense_threshold <= 1.0:
            raise ConfigError(f"dense_threshold must be in (0, 1], got {self.dense_threshold}")

    def to_dict(self) -> Dict[str, Any]:
        """JSON/weights_only-safe dict (callable filters are recorded as their repr)."""
        out = dataclasses.asdict(self)
        for k in ("include", "exclude"):
            v = out[k]
            if callable(v):
                out[k] = f"<callable {getattr(v, '__name__', type(v).__name__)}>"
            elif v is not None and not isinstance(v, str):
                out[k] = list(v)
        return out


@dataclasses.dataclass
class SparseLayer:
    """One managed weight: its name, parameter, bool mask (True = active) and 'ever active' record."""

    name: str
    index: int
    param: nn.Parameter
    mask: torch.Tensor
    ever_active: torch.Tensor
    init_density: float

    @property
    def numel(self) -> int:
        return self.param.numel()

    count: int = -1  # active weights (kept exact by the engine; recomputed if negative)
    ever_count: int = -1  # weights ever active (ITOP numerator)

    def __post_init__(self) -> None:
        if self.count < 0:
            self.count = int(torch.count_nonzero(self.mask).item())
        if self.ever_count < 0:
            self.ever_count = int(torch.count_nonzero(self.ever_active).item())

    def active(self) -> int:
        return self.count


def _key(*parts: int) -> int:
    """Deterministic 63-bit mix of integers (splitmix64 steps): the seed of one layer's randomness."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x & 0x7FFFFFFFFFFFFFFF


class SparseEngine(ParkingMixin, DistributedMixin):
    """Dynamic sparse training for any ``nn.Module`` (see module docstring and docs/sparse.md).

    Args:
        model: the model (a DDP / DataParallel / compiled wrapper is unwrapped, never copied).
        optimizer: the optimizer updating the model; every managed weight must be in it.
        config: a :class:`SparseConfig`; keyword arguments override its fields
            (``SparseEngine(model, opt, sparsity=0.4, total_steps=n)``).
        snip_batch: ``(inputs, targets)`` for ``sparse_init="snip"``.
        snip_loss: loss for SNIP, ``loss_fn(outputs, targets)`` (default cross entropy), or, when
            ``snip_batch`` is None, a callable ``loss(model) -> Tensor`` that runs a batch itself.
        attach: register the optimizer post-step hook (default). With ``attach=False`` call
            :meth:`after_step` yourself after each *real* optimizer step.
        on_update: callbacks receiving the update record dict after each topology update.
        state: a :meth:`state_dict` to resume from: masks come from it and no initialisation runs
            (SNIP then needs no batch). Equivalent to constructing and calling :meth:`load_state_dict`,
            which is also allowed for ``sparse_init='snip'`` without a batch: such an engine waits
            for its state and refuses to run a forward or step before it arrives.
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
        cfg.validate()
        self.config = cfg
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
        self._parked: Dict[str, _Parked] = {}
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
        elif cfg.sparse_init == "snip" and snip_batch is None and snip_loss is None:
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
            raise ConfigError("sparse_init='snip' needs snip_batch=(inputs, targets) or snip_loss=callable(model)"
                              " (or load_state_dict before training)")

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

        Not needed for correctness (weights are re-masked after every step). Gradient growth needs the
        dense gradient at update steps: before the step that will trigger an update, the dense gradients
        are stashed (one copy, every ``update_frequency`` steps) and used for growth. With momentum
        growth this is a no-op (see docs/sparse.md).
        """
        if self.config.growth == "momentum" and not self.config.fix:
            # inactive weights' accumulated momentum is the growth signal: masking their gradients
            # would erase it, so this is a documented no-op with momentum growth
            if not getattr(self, "_warned_mask_grad", False):
                logger.warning("mask_gradients() does nothing with growth='momentum' (it would erase the "
                               "momentum of inactive weights that growth ranks by)")
                self._warned_mask_grad = True
            return
        if self.config.growth == "gradient" and self.update_due(self.step_count + 1):
            self._dense_grads = {layer.name: layer.param.grad.detach().clone() for layer in self.layers
                                 if layer.param.grad is not None}
        for layer in self.layers:
            if layer.param.grad is not None:
                _zero_inactive_(layer.param.grad, layer.mask)

    def masks(self) -> Dict[str, torch.Tensor]:
        """Name -> bool mask (True = active) of every sparse layer."""
        return {layer.name: layer.mask for layer in self.layers}

    # ----------------------------------------------------------------------------------- init -----------
    def _init_masks(self, snip_batch: Optional[Tuple[Any, Any]], snip_loss: Optional[Callable]) -> None:
        cfg = self.config
        density = 1.0 - cfg.sparsity
        names = [n for n, _ in self.candidates]
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
        del names

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

    # --------------------------------------------------------------------------------- schedule ---------
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

    # ----------------------------------------------------------------------------------- update ---------
    def _check_optimizer_for_momentum(self) -> None:
        cfg = self.config
        needs = cfg.growth == "momentum" or cfg.redistribution == "momentum"
        if not needs or cfg.fix:
            return
        opt = self.optimizer
        if opt is None:
            raise ConfigError("momentum growth/redistribution needs the optimizer (its momentum state)")
        if isinstance(opt, torch.optim.SGD) and not any(g.get("momentum", 0) for g in opt.param_groups):
            raise ConfigError("momentum growth/redistribution needs an optimizer with momentum "
                              "(SGD momentum=0 has no momentum buffer)")
        if not isinstance(opt, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam,
                                torch.optim.RAdam, torch.optim.Adamax)):
            logger.warning("momentum growth: %s must keep 'exp_avg' or 'momentum_buffer' state",
                           type(opt).__name__)

    def _momentum(self, layer: SparseLayer) -> torch.Tensor:
        st = self.optimizer.state.get(layer.param, {}) if self.optimizer is not None else {}
        for k in _MOMENTUM_KEYS:
            v = st.get(k)
            if torch.is_tensor(v) and v.shape == layer.param.shape:
                return v
        raise RuntimeError(f"momentum growth: optimizer has no momentum state for {layer.name!r} "
                           f"(expected one of {_MOMENTUM_KEYS})")

    @torch.no_grad()
    def update_topology(self) -> Dict[str, Any]:
        """Prune ``ceil(rate * active)`` smallest-magnitude active weights per layer and regrow as many.

        Regrowth picks among positions inactive after pruning (random / |gradient| / |momentum|); grown
        weights start at exactly 0, and with ``optimizer_state='zero'`` the optimizer state of pruned and
        grown positions is zeroed. Returns (and logs) the update record.
        """
        self.apply_masks()
        return self._update()

    @torch.no_grad()
    def _update(self) -> Dict[str, Any]:
        cfg = self.config
        step = self.step_count
        rate = self.prune_rate_at(step)
        self._check_all_parked()  # parked layers skipped the per-step pass: verify them now
        # 1) prune by magnitude: the k smallest |w| among active weights, as a bool mask per layer
        pruned: Dict[str, torch.Tensor] = {}
        n_prune: Dict[str, int] = {}
        for layer in self.layers:
            active = layer.count
            k = min(int(math.ceil(rate * active)), max(active - 1, 0))
            n_prune[layer.name] = k
            pruned[layer.name] = select_k_mask(MagnitudeScores(layer.param), k, largest=False,
                                               allowed=layer.mask.view(-1), n_allowed=active)
        # 2) how many to regrow per layer
        n_grow = self._regrowth_counts(n_prune, pruned)
        # 3) regrow among positions inactive after pruning
        records = []
        for layer in self.layers:
            shape = layer.param.shape
            mask = layer.mask.view(-1)  # updated in place (masks are contiguous)
            p_sel = pruned[layer.name]
            mask &= ~p_sel
            k = n_grow[layer.name]
            g_sel = select_k_mask(self._growth_scores(layer, step), k, largest=True, allowed=~mask,
                                  n_allowed=layer.numel - layer.count + n_prune[layer.name])
            mask |= g_sel
            # pruned weights -> 0, and every regrown weight starts at 0 (RigL's rule), also one pruned and
            # regrown in this same update (grown positions that were inactive before already hold 0)
            _zero_inactive_(layer.param.data, (mask & ~g_sel).view(shape))
            if cfg.optimizer_state == "zero" and self.optimizer is not None:
                # (a pruned position can be regrown in the same update: it is active again)
                self._zero_optimizer_state(layer, ~(p_sel | g_sel), newly_inactive=p_sel & ~mask)
            layer.count = layer.count - n_prune[layer.name] + k
            ever = layer.ever_active.view(-1)
            layer.ever_count += int(torch.count_nonzero(g_sel & ~ever))
            ever |= g_sel
            records.append({"name": layer.name, "pruned": n_prune[layer.name], "regrown": k,
                            "active": layer.count, "numel": layer.numel})
            del p_sel, g_sel
        pruned.clear()
        self._dense_grads = None
        self.update_count += 1
        record = {"step": step, "update": self.update_count, "prune_rate": rate,
                  "pruned": sum(r["pruned"] for r in records), "regrown": sum(r["regrown"] for r in records),
                  "density": self.global_density(), "itop_rate": self.itop_rate(), "layers": records}
        if cfg.sync_check and _dist_world() > 1:
            self.check_consistency()
        self.last_update = record
        self._refresh_versions()
        self.history.append({k: v for k, v in record.items() if k != "layers"})
        logger.info("sparse update %d @ step %d: rate %.4f, pruned %d, regrown %d, density %.4f, ITOP %.4f",
                    self.update_count, step, rate, record["pruned"], record["regrown"], record["density"],
                    record["itop_rate"])
        for cb in self.on_update:
            cb(record)
        return record

    def _growth_scores(self, layer: SparseLayer, step: int) -> Union[MagnitudeScores, RandomScores]:
        g = self.config.growth
        if g == "random":
            return RandomScores(layer.numel, _key(self.config.seed, step, layer.index, 2), layer.param.device)
        if g == "gradient":
            if self._dense_grads is not None and layer.name in self._dense_grads:
                return MagnitudeScores(self._dense_grads[layer.name])
            if layer.param.grad is None:
                raise RuntimeError(f"gradient growth: {layer.name!r} has no gradient at update step {step}")
            return MagnitudeScores(layer.param.grad)
        return MagnitudeScores(self._momentum(layer))

    def _regrowth_counts(self, n_prune: Dict[str, int], pruned: Dict[str, torch.Tensor]) -> Dict[str, int]:
        mode = self.config.redistribution
        if mode == "none":
            return dict(n_prune)
        total = sum(n_prune.values())
        scores: Dict[str, float] = {}
        cap: Dict[str, int] = {}
        for layer in self.layers:
            keep = layer.mask.reshape(-1) & ~pruned[layer.name]
            cap[layer.name] = layer.numel - (layer.count - n_prune[layer.name])
            src = layer.param if mode == "magnitude" else self._momentum(layer)
            vals = src.detach().reshape(-1)[keep].abs().float()
            scores[layer.name] = float(vals.mean().item()) if vals.numel() else 0.0
        out = {n: 0 for n in scores}
        remaining = total
        open_ = [n for n in scores if cap[n] > 0]
        while remaining > 0 and open_:
            s = sum(scores[n] for n in open_)
            share = {n: (scores[n] / s if s > 0 else 1.0 / len(open_)) * remaining for n in open_}
            base = {n: min(int(math.floor(share[n])), cap[n] - out[n]) for n in open_}
            for n in open_:
                out[n] += base[n]
            left = remaining - sum(base.values())
            # largest remainders get one more, deterministic order
            for n in sorted(open_, key=lambda m: (-(share[m] - math.floor(share[m])), m)):
                if left == 0:
                    break
                if out[n] < cap[n]:
                    out[n] += 1
                    left -= 1
            remaining = left
            open_ = [n for n in open_ if out[n] < cap[n]]
        return out

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
            elif k in _SECOND_MOMENT_KEYS and v.dtype in _INF_BITS:
                _edit_bits_(v, keep)  # may hold +inf from parking that was switched off: inf * 0 is NaN
            else:
                _zero_inactive_(v, keep)

    # ---------------------------------------------------------------------------------- monitoring -------
    def global_density(self) -> float:
        """Active fraction over all selected layers (dense layers count as fully active)."""
        num = sum(layer.active() for layer in self.layers)
        den = sum(layer.numel for layer in self.layers)
        dense = {n: p.numel() for n, p in self.candidates if n in set(self.dense_layers)}
        num += sum(dense.values())
        den += sum(dense.values())
        return num / den if den else 1.0

    def itop_rate(self) -> float:
        """In-time over-parameterization rate: fraction of sparse-layer weights ever active."""
        den = sum(layer.numel for layer in self.layers)
        return sum(layer.ever_count for layer in self.layers) / den if den else 1.0

    def stats(self) -> Dict[str, Any]:
        """Machine-readable monitoring dict (JSON-serialisable)."""
        layers = []
        for layer in self.layers:
            a = layer.active()
            layers.append({"name": layer.name, "numel": layer.numel, "active": a, "density": a / layer.numel,
                           "init_density": layer.init_density, "dense": False,
                           "ever_active": layer.ever_count})
        for n, p in self.candidates:
            if n in self.dense_layers:
                layers.append({"name": n, "numel": p.numel(), "active": p.numel(), "density": 1.0,
                               "init_density": self.init_densities[n], "dense": True,
                               "ever_active": p.numel()})
        total = sum(r["numel"] for r in layers)
        active = sum(r["active"] for r in layers)
        return {"step": self.step_count, "updates": self.update_count, "skipped_steps": self.skipped_steps,
                "prune_rate": self.prune_rate_at(self.step_count), "sparsity_target": self.config.sparsity,
                "density": active / total if total else 1.0, "sparse_params": total, "active_params": active,
                "itop_rate": self.itop_rate(), "num_sparse_layers": len(self.layers),
                "num_dense_layers": len(self.dense_layers), "parked_layers": len(self._parked),
                "last_update": ({k: v for k, v in self.last_update.items() if k != "layers"}
                                if self.last_update else None),
                "layers": layers}

    def density_report(self) -> Dict[str, Any]:
        """Per-layer initial densities and how many large-kernel (SLaK strip) weights are sparse / dense.

        For a run header: ``{"layers": {name: density}, "large_kernel": {"sparse": n, "dense": m}}``
        (``large_kernel`` counts only weights this engine selected).
        """
        lk = {n for n, _, _ in select_parameters(self.model, "large_kernel")} if self.candidates else set()
        names = [n for n, _ in self.candidates]
        sparse = {l.name for l in self.layers}
        return {"layers": {n: self.init_densities.get(n, 1.0) for n in names},
                "large_kernel": {"sparse": sum(1 for n in names if n in lk and n in sparse),
                                 "dense": sum(1 for n in names if n in lk and n not in sparse)}}

    def summary(self, max_layers: int = 12) -> str:
        """A short human-readable report (global figures and the first ``max_layers`` layers)."""
        s = self.stats()
        cfg = self.config
        lines = [f"sparse engine: init={cfg.sparse_init} target sparsity={cfg.sparsity:.3f} "
                 f"growth={cfg.growth} u={cfg.update_frequency} redistribution={cfg.redistribution}"
                 f"{' (fixed masks)' if cfg.fix else ''}",
                 f"  step {s['step']} updates {s['updates']} skipped {s['skipped_steps']} "
                 f"prune rate {s['prune_rate']:.4f}",
                 f"  density {s['density']:.4f} ({s['active_params']:,}/{s['sparse_params']:,}) "
                 f"ITOP {s['itop_rate']:.4f}; {s['num_sparse_layers']} sparse, {s['num_dense_layers']} dense layers",
                 f"  masking: {s['parked_layers']} layers held at zero by the optimizer state, "
                 f"{s['num_sparse_layers'] - s['parked_layers']} re-masked after every step"]
        for r in s["layers"][:max_layers]:
            lines.append(f"    {r['name']:<48} {r['active']:>10,}/{r['numel']:<10,} "
                         f"{r['density']:.4f}{' dense' if r['dense'] else ''}")
        if len(s["layers"]) > max_layers:
            lines.append(f"    ... {len(s['layers']) - max_layers} more layers")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------ EMA ----------
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

    # --------------------------------------------------------------------------------- state -------------
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
        for k in ("sparsity", "growth", "update_frequency", "redistribution", "sparse_init"):
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
