"""Monitoring: global density, ITOP rate, a JSON stats dict and a short human-readable summary.

A mixin of :class:`slaknet.sparse.SparseEngine`.
"""
from __future__ import annotations

from typing import Any, Dict

from slaknet.sparse.selection import select_parameters


class ReportMixin:
    """Read-only figures of the engine's layers (see :class:`SparseEngine`)."""

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
