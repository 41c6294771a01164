"""The options of the sparse engine (:class:`SparseConfig`) and their validation."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from slaknet.errors import ConfigError
from slaknet.sparse.growth import growth_names
from slaknet.sparse.init_rules import init_names
from slaknet.sparse.prune import prune_names
from slaknet.sparse.redistribution import redistribution_names
from slaknet.sparse.selection import ParamFilter

__all__ = ["SparseConfig"]

_DECAYS = ("cosine", "constant")
_OPT_POLICIES = ("zero", "keep")
_MASKINGS = ("auto", "pass")


@dataclasses.dataclass
class SparseConfig:
    """All options of the engine (names follow the training CLI flags; see docs/sparse.md).

    Attributes:
        sparsity: global fraction of zero weights over the sparse layers (``--sparsity``), in [0, 1).
        sparse_init: initial layer-wise density: ``uniform``, ``ERK``, ``snip`` (``--sparse-init``) or one
            registered with :func:`slaknet.sparse.register_init`.
        erk_power_scale: exponent on ERK's raw density ``(sum(shape)/prod(shape))``; 0 gives uniform.
        prune_rate: initial fraction of active weights pruned (and regrown) per update (``--prune-rate``).
        prune_rate_final: prune rate reached at ``total_steps`` by the cosine schedule.
        prune_rate_decay: ``cosine`` (default; needs ``total_steps``) or ``constant``.
        growth: regrowth criterion: ``random`` (paper), ``gradient`` (RigL) or ``momentum`` (``--growth``), or
            one registered with :func:`slaknet.sparse.register_growth`.
        update_frequency: topology update every this many real optimizer steps (``-u/--update-frequency``).
        total_steps: planned number of optimizer steps (cosine horizon).
        update_end: no topology updates at or after this step (default: ``total_steps``).
        redistribution: ``none`` (paper), ``magnitude`` or ``momentum`` (``--redistribution``), or one
            registered with :func:`slaknet.sparse.register_redistribution`: how the regrowth count is shared
            across layers.
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
        prune: prune criterion: ``magnitude`` (paper: the smallest |w|) or one registered with
            :func:`slaknet.sparse.register_prune`.
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
    prune: str = "magnitude"

    def validate(self) -> None:
        """Raise :class:`ConfigError` (one line) for an invalid or ill-defined combination."""
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        choices = (("sparse_init", tuple(init_names())), ("growth", tuple(growth_names())),
                   ("redistribution", tuple(redistribution_names())), ("prune", tuple(prune_names())),
                   ("prune_rate_decay", _DECAYS), ("optimizer_state", _OPT_POLICIES), ("masking", _MASKINGS))
        for field, allowed in choices:
            if getattr(self, field) not in allowed:
                raise ConfigError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
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
