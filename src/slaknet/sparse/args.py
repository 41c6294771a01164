"""Command-line flags of the sparse engine (official SLaK names) and the :class:`SparseConfig` they make.

Torch-free at import, so a command's ``--help`` stays instant; the engine is imported when a config is
built. ``--sparse-init``, ``--growth`` and ``--redistribution`` accept any registered strategy
(:func:`slaknet.sparse.register_init`, ``register_growth``, ``register_redistribution``), checked when the
config is validated.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # pragma: no cover
    from slaknet.sparse.config import SparseConfig

__all__ = ["add_sparse_arguments", "config_from_args"]


def add_sparse_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sparse-training flags (official SLaK names, dashes or underscores) to ``parser``."""
    g = parser.add_argument_group("sparse training (slaknet.sparse)")
    g.add_argument("--sparse", action="store_true", help="train with the dynamic sparse engine")
    g.add_argument("--sparsity", type=float, default=0.4, help="global fraction of zero weights (default 0.4)")
    g.add_argument("--sparse-init", "--sparse_init", dest="sparse_init", default="ERK",
                   help="initial layer-wise density: ERK (default), uniform, snip, or one registered with "
                        "slaknet.sparse.register_init")
    g.add_argument("--erk-power-scale", dest="erk_power_scale", type=float, default=1.0,
                   help="ERK power scale (default 1.0)")
    g.add_argument("--prune-rate", "--prune_rate", dest="prune_rate", type=float, default=0.3,
                   help="initial prune (= regrow) fraction per update (default 0.3), cosine-decayed")
    g.add_argument("--prune-rate-final", dest="prune_rate_final", type=float, default=0.005,
                   help="prune rate at the end of the cosine schedule (default 0.005)")
    g.add_argument("--growth", default="random",
                   help="regrowth criterion: random (default, the paper's), gradient, momentum, or one registered "
                        "with slaknet.sparse.register_growth")
    g.add_argument("-u", "--update-frequency", "--update_frequency", dest="update_frequency", type=int,
                   default=100, help="topology update every U optimizer steps (default 100)")
    g.add_argument("--redistribution", default="none",
                   help="share regrowth across layers: none (default, the paper's), magnitude, momentum, or one "
                        "registered with slaknet.sparse.register_redistribution")
    g.add_argument("--fix", action="store_true", help="static sparse training: masks never change")
    g.add_argument("--sparse-layers", dest="sparse_layers", default="all", choices=["all", "large_kernel"],
                   help="which weights are sparse: every conv/linear (default) or only large-kernel strips")
    g.add_argument("--sparse-include", dest="sparse_include", default=None,
                   help="comma-separated glob patterns of extra weights to make sparse")
    g.add_argument("--sparse-exclude", dest="sparse_exclude", default=None,
                   help="comma-separated glob patterns of weights to keep dense")
    g.add_argument("--sparse-optimizer-state", dest="sparse_optimizer_state", default="zero",
                   choices=["zero", "keep"], help="optimizer state of pruned/regrown weights (default zero)")
    g.add_argument("--sparse-masking", dest="sparse_masking", default="auto", choices=["auto", "pass"],
                   help="how pruned weights stay zero between updates: auto (default: through the optimizer "
                        "state with fused Adam/AdamW on CPU, else a pass after every step) or pass")
    g.add_argument("--sparse-seed", dest="sparse_seed", type=int, default=None,
                   help="seed of mask randomness (default: the run's --seed, else 0)")


def config_from_args(args: argparse.Namespace, total_steps: Optional[int] = None) -> Optional[SparseConfig]:
    """A :class:`SparseConfig` from flags added by :func:`add_sparse_arguments` (None without --sparse).

    Missing attributes (or ``None`` values) take the :class:`SparseConfig` defaults, so a namespace built
    from a recipe dict works too.
    """
    if not getattr(args, "sparse", False):
        return None
    from slaknet.sparse.config import SparseConfig
    from slaknet.sparse.selection import parse_filter

    d = SparseConfig()

    def get(name: str, default):
        v = getattr(args, name, None)
        return default if v is None else v

    seed = getattr(args, "sparse_seed", None)
    if seed is None:
        seed = getattr(args, "seed", 0) or 0
    cfg = SparseConfig(sparsity=float(get("sparsity", d.sparsity)), sparse_init=get("sparse_init", d.sparse_init),
                       erk_power_scale=float(get("erk_power_scale", d.erk_power_scale)),
                       prune_rate=float(get("prune_rate", d.prune_rate)),
                       prune_rate_final=float(get("prune_rate_final", d.prune_rate_final)),
                       growth=get("growth", d.growth), update_frequency=int(get("update_frequency", d.update_frequency)),
                       total_steps=total_steps, redistribution=get("redistribution", d.redistribution),
                       fix=bool(get("fix", d.fix)), layers=get("sparse_layers", d.layers),
                       include=parse_filter(get("sparse_include", None)),
                       exclude=parse_filter(get("sparse_exclude", None)),
                       optimizer_state=get("sparse_optimizer_state", d.optimizer_state), seed=int(seed),
                       masking=get("sparse_masking", d.masking))
    cfg.validate()
    return cfg
