"""Monitoring: global density, ITOP rate, a JSON stats dict and a short human-readable summary.

A mixin of :class:`slaknet.sparse.SparseEngine`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

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

    @torch.no_grad()
    def densities(self, exact: bool = True) -> Dict[str, Optional[float]]:
        """Non-zero fractions of the model's weights, each named for what it covers:

        * ``large_kernel_density``: every large-kernel weight of the model (``LoRA1``, ``LoRA2``, ``lkb_origin``
          of :class:`~slaknet.layers.LargeKernelConv`, selected or not; None if it has none);
        * ``sparse_layers_density``: the weights this engine selected (layers left dense included);
        * ``model_density``: every parameter of the model (biases and norms included).

        ``exact``: count the exact zeros of the weights (an inactive entry of a sparse layer counts as zero even
        before the masks reach the weights at the first forward); False: only the masks' inactive entries
        count as zero (what sparsity alone gives, e.g. at initialisation, where biases start at exactly 0).
        """
        masks = {id(layer.param): layer.mask for layer in self.layers}

        def count(params: Any) -> Optional[float]:
            nonzero = total = 0
            for p in params:
                mask = masks.get(id(p))
                if exact:
                    nz = p.detach() != 0
                    if mask is not None:
                        nz &= mask.to(nz.device)
                    nonzero += int(torch.count_nonzero(nz))
                else:
                    nonzero += int(torch.count_nonzero(mask)) if mask is not None else p.numel()
                total += p.numel()
            return nonzero / total if total else None

        return {"large_kernel_density": count(p for _, _, p in select_parameters(self.model, "large_kernel")),
                "sparse_layers_density": count(p for _, p in self.candidates),
                "model_density": count(self.model.parameters())}

    def density_report(self) -> Dict[str, Any]:
        """Per-layer initial densities, how many large-kernel (SLaK strip) weights are sparse / dense, and the
        :meth:`densities` of the masks (large-kernel weights, sparse layers, whole model).

        For a run header: ``{"layers": {name: density}, "large_kernel": {"sparse": n, "dense": m},
        "large_kernel_density": ..., "sparse_layers_density": ..., "model_density": ...}`` (``large_kernel``
        counts only weights this engine selected).
        """
        lk = {n for n, _, _ in select_parameters(self.model, "large_kernel")} if self.candidates else set()
        names = [n for n, _ in self.candidates]
        sparse = {l.name for l in self.layers}
        return {"layers": {n: self.init_densities.get(n, 1.0) for n in names},
                "large_kernel": {"sparse": sum(1 for n in names if n in lk and n in sparse),
                                 "dense": sum(1 for n in names if n in lk and n not in sparse)},
                **self.densities(exact=False)}

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
