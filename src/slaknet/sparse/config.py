"""The options of the sparse engine (:class:`SparseConfig`) and their validation."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

from slaknet.errors import ConfigError
from slaknet.settings import setting

__all__ = ["SparseConfig"]

# a weight filter: glob patterns on parameter names (a comma-separated string or a list) or a predicate
# ``(name, module, param) -> bool`` (slaknet.sparse.selection); typed loosely here to keep this module torch-free
ParamFilter = Any

_DECAYS = ("cosine", "constant")
_OPT_POLICIES = ("zero", "keep")
_MASKINGS = ("auto", "pass")
_LAYERS = ("all", "large_kernel", "none")


# the strategy registries import torch: their names are read only when a value is validated
def _growth_choices() -> Tuple[str, ...]:
    from slaknet.sparse.growth import growth_names

    return tuple(growth_names())


def _init_choices() -> Tuple[str, ...]:
    from slaknet.sparse.init_rules import init_names

    return tuple(init_names())


def _redist_choices() -> Tuple[str, ...]:
    from slaknet.sparse.redistribution import redistribution_names

    return tuple(redistribution_names())


def _prune_choices() -> Tuple[str, ...]:
    from slaknet.sparse.prune import prune_names

    return tuple(prune_names())


@dataclasses.dataclass
class SparseConfig:
    """All options of the engine; each field is the one declaration of its ``slaknet train`` flag (the flag is
    the field's key: ``--sparsity``, ``--sparse-layers``...). See docs/sparse.md.

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
        total_steps: planned number of optimizer steps (cosine horizon; the trainer fills it in).
        update_end: no topology updates at or after this step (default: ``total_steps``).
        redistribution: ``none`` (paper), ``magnitude`` or ``momentum`` (``--redistribution``), or one
            registered with :func:`slaknet.sparse.register_redistribution`: how the regrowth count is shared
            across layers.
        fix: static masks, never updated (``--fix``).
        layers: ``all`` (every conv / linear weight), ``large_kernel`` (only SLaK's large-kernel strips)
            or ``none`` (only ``include``) (``--sparse-layers``).
        include / exclude: extra / excluded weights: glob patterns on parameter names or a predicate
            ``(name, module, param) -> bool``.
        dense_threshold: a layer whose initial density is at least this stays dense (no mask); 1.0 keeps
            exact counts, 0.99 is the research code's cut.
        optimizer_state: ``zero`` (default, RigL's: pruned and regrown positions get zeroed optimizer
            state, so a regrown weight starts from 0 with fresh moments) or ``keep`` (the research code's).
            Either way a regrown weight starts at 0, also one pruned and regrown in the same update.
        seed: seed of all mask randomness (keyed by seed, step and layer; under torch.distributed rank 0's
            seed is used on every rank, so per-rank seeding cannot split the masks). None: 0 for the engine,
            the run's ``--seed`` in training.
        sync_check: under torch.distributed, compare a mask checksum across ranks once at initialisation
            (``ConfigError`` if they differ) and at each update (``RuntimeError``).
        masking: how inactive weights are kept at zero between updates. ``auto`` (default): with a fused
            ``torch.optim.Adam``/``AdamW`` on CPU and ``optimizer_state='zero'``, their second moment is
            held at +inf, so the optimizer's own update there is exactly 0 and no pass over the weights
            is needed; with any other optimizer, and with ``pass``, the masks are multiplied into the
            weights after every step.
        enabled: the trainer's switch (``--sparse``): train with the engine at all. The engine itself
            ignores it.
        prune: prune criterion: ``magnitude`` (paper: the smallest |w|) or one registered with
            :func:`slaknet.sparse.register_prune`.
    """

    sparsity: float = setting(0.4, "global fraction of zero weights over the sparse layers", low=0.0, high=1.0,
                              high_open=True)
    sparse_init: str = setting("ERK", "initial layer-wise density: uniform, ERK, snip, or one registered with "
                                      "slaknet.sparse.register_init", choices_from=_init_choices)
    erk_power_scale: float = setting(1.0, "ERK power scale (0 gives uniform densities)", low=0.0)
    prune_rate: float = setting(0.3, "initial prune (= regrow) fraction per update, decayed to --prune-rate-final",
                                low=0.0, high=1.0, high_open=True)
    prune_rate_final: float = setting(0.005, "prune rate at the end of the decay", low=0.0, high=1.0)
    prune_rate_decay: str = setting("cosine", "how the prune rate decays over the run", choices=_DECAYS)
    growth: str = setting("random", "regrowth criterion: random (the paper's), gradient, momentum, or one "
                                    "registered with slaknet.sparse.register_growth", choices_from=_growth_choices)
    update_frequency: int = setting(100, "topology update every U optimizer steps", low=1)
    total_steps: Optional[int] = setting(None, "planned optimizer steps (the trainer fills it in)", low=1,
                                         internal=True)
    update_end: Optional[int] = setting(None, "no topology updates from this step on", low=0, internal=True)
    redistribution: str = setting("none", "share regrowth across layers: none (the paper's), magnitude, momentum, "
                                          "or one registered with slaknet.sparse.register_redistribution",
                                  choices_from=_redist_choices)
    fix: bool = setting(False, "static sparse training: masks never change")
    layers: str = setting("all", "which weights are sparse: every conv/linear, only the large-kernel strips, or "
                                 "only --sparse-include", choices=_LAYERS, key="sparse_layers")
    include: ParamFilter = setting(None, "comma-separated glob patterns of extra weights to make sparse",
                                   key="sparse_include", metavar="GLOBS")
    exclude: ParamFilter = setting(None, "comma-separated glob patterns of weights to keep dense",
                                   key="sparse_exclude", metavar="GLOBS")
    dense_threshold: float = setting(1.0, "a layer whose initial density is at least this stays dense", low=0.0,
                                     high=1.0, low_open=True)
    optimizer_state: str = setting("zero", "optimizer state of pruned/regrown weights", choices=_OPT_POLICIES,
                                   key="sparse_optimizer_state")
    seed: Optional[int] = setting(None, "seed of mask randomness (default: the run's --seed)", key="sparse_seed")
    sync_check: bool = setting(True, "compare masks across DDP ranks", internal=True)
    masking: str = setting("auto", "how pruned weights stay zero between updates: auto (through the optimizer "
                                   "state with fused Adam/AdamW on CPU, else a pass after every step) or pass",
                           choices=_MASKINGS, key="sparse_masking")
    enabled: bool = setting(False, "train with the dynamic sparse engine", key="sparse")
    prune: str = setting("magnitude", "prune criterion: magnitude (the paper's) or one registered with "
                                      "slaknet.sparse.register_prune", choices_from=_prune_choices)

    def validate(self) -> None:
        """Raise :class:`ConfigError` (one line) for an invalid or ill-defined combination."""
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        choices = (("sparse_init", _init_choices()), ("growth", _growth_choices()),
                   ("redistribution", _redist_choices()), ("prune", _prune_choices()),
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
