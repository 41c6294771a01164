"""Dynamic sparse training (SLaK's sparse-from-scratch training with prune-and-regrow).

Public API::

    from slaknet.sparse import SparseEngine, SparseConfig
    engine = SparseEngine(model, optimizer, sparsity=0.4, total_steps=steps)   # masks + optimizer hook
    # train as usual; optimizer.step() / scaler.step(optimizer) keep the model sparse
    ckpt["sparse"] = engine.state_dict()                                       # exact resume

Every field of :class:`SparseConfig` is also the declaration of its ``slaknet train`` flag (``--sparsity``,
``--sparse-init``...): the training configuration uses this class as its ``sparse`` section.

Strategies are registered by name, one registry per choice: initial densities (``register_init``,
``sparse_init``), the prune criterion (``register_prune``, ``prune``), the redistribution of regrowth
across layers (``register_redistribution``, ``redistribution``) and the regrowth criterion
(``register_growth``, ``growth``); see docs/sparse.md.
"""
from slaknet.lazy import lazy_exports

_EXPORTS = {
    "counts_from_scores": "slaknet.sparse.density",
    "erk_counts": "slaknet.sparse.density",
    "erk_densities": "slaknet.sparse.density",
    "uniform_counts": "slaknet.sparse.density",
    "SparseConfig": "slaknet.sparse.config",
    "SparseEngine": "slaknet.sparse.engine",
    "SparseLayer": "slaknet.sparse.engine",
    "GrowthCriterion": "slaknet.sparse.growth",
    "growth_names": "slaknet.sparse.growth",
    "register_growth": "slaknet.sparse.growth",
    "InitRule": "slaknet.sparse.init_rules",
    "init_names": "slaknet.sparse.init_rules",
    "init_rule": "slaknet.sparse.init_rules",
    "register_init": "slaknet.sparse.init_rules",
    "PruneCriterion": "slaknet.sparse.prune",
    "prune_names": "slaknet.sparse.prune",
    "register_prune": "slaknet.sparse.prune",
    "Redistribution": "slaknet.sparse.redistribution",
    "ScoreRedistribution": "slaknet.sparse.redistribution",
    "redistribution_names": "slaknet.sparse.redistribution",
    "register_redistribution": "slaknet.sparse.redistribution",
    "parse_filter": "slaknet.sparse.selection",
    "select_parameters": "slaknet.sparse.selection",
    "unwrap_model": "slaknet.sparse.selection",
    "sparse_counts": "slaknet.sparse.counting",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["SparseEngine", "SparseConfig", "SparseLayer", "select_parameters", "unwrap_model", "parse_filter",
           "erk_densities", "erk_counts", "uniform_counts", "counts_from_scores", "sparse_counts",
           "GrowthCriterion", "register_growth", "growth_names",
           "InitRule", "register_init", "init_names", "init_rule", "PruneCriterion", "register_prune", "prune_names",
           "Redistribution", "ScoreRedistribution", "register_redistribution", "redistribution_names"]
