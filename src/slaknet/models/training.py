"""Model defaults for training and kernel fitting: what ``slaknet train`` needs from the models package.

:func:`fit_kernel_sizes` caps kernels that can only ever see padding at a given input size (same function,
less compute); :func:`recommended_drop_path` reads a variant's stochastic-depth default; and
:func:`build_training_model` creates the variant a training configuration names, returning the model and
what was resolved (kernels, small kernel, drop path), so the caller never has to write them back.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Optional, Sequence, Tuple

import torch.nn as nn

__all__ = ["fit_kernel_sizes", "recommended_drop_path", "build_training_model", "ResolvedModel"]

log = logging.getLogger("slaknet.train")


def fit_kernel_sizes(kernel_sizes: Sequence[int], small_kernel: Optional[int], input_size: int,
                     stem_stride: int = 4) -> Tuple[int, ...]:
    """Cap stage ``i``'s kernel at ``2 * map_i - 1`` (map_i = input / (stem * 2^i)), never below N + 2.

    With 'same' padding, kernel taps farther than ``map - 1`` from the centre only ever see padding, so
    the capped network computes exactly the same function with less work.
    """
    out = []
    for i, k in enumerate(kernel_sizes):
        fmap = max(1, int(math.ceil(input_size / (stem_stride * 2 ** i))))
        cap = 2 * fmap - 1
        # keep M > N so a decomposed layer stays decomposed (M == N would switch to a single M x M kernel)
        lo = small_kernel + 2 if small_kernel is not None and small_kernel < k else 1
        out.append(int(max(min(k, cap), lo)))
    return tuple(out)


def _spec(name: str) -> dict:
    from slaknet.models.slak import MODEL_SPECS

    return dict(MODEL_SPECS.get(name, {}))


def recommended_drop_path(name: str) -> float:
    """The variant's stochastic-depth rate for ImageNet training (0 where none is known)."""
    from slaknet.models.slak import recipe_defaults

    return float(recipe_defaults(name).get("drop_path", 0.0))


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """What building a model from a config decided: kernels per stage, the small kernel N, drop path."""

    kernel_size: Tuple[int, ...]
    small_kernel: Optional[int]
    drop_path: float

    def kernel_list(self) -> list:
        """Kernels followed by N (the official ``--kernel_size`` layout), as stored in checkpoints."""
        return list(self.kernel_size) + ([self.small_kernel] if self.small_kernel is not None else [])


def build_training_model(cfg: Any, num_classes: int, input_size: int) -> Tuple[nn.Module, ResolvedModel]:
    """Create the SLaK variant ``cfg.name`` with the model settings' kernel / width / decomposition overrides.

    ``cfg``: a :class:`slaknet.settings.ModelSettings` (the ``model`` section of a training configuration);
    ``input_size``: the training image side (for ``fit_kernels``).
    """
    import slaknet
    from slaknet.models.slak import resolve_kernel_sizes

    name = cfg.name
    spec = _spec(name)
    if not spec:
        slaknet.create_model(name)  # raises the one-line "unknown model" error with suggestions
    drop_path = float(cfg.drop_path) if cfg.drop_path is not None else recommended_drop_path(name)
    kw: dict = dict(num_classes=num_classes, drop_path_rate=drop_path)
    for key in ("width_factor", "decompose", "layer_scale_init_value", "head_init_scale"):
        if getattr(cfg, key, None) is not None:
            kw[key] = getattr(cfg, key)
    small = spec.get("small_kernel", 5)
    kernels: Tuple[int, ...] = tuple(spec.get("kernel_size", (51, 49, 47, 13)))
    if cfg.kernel_size:
        ks, small = resolve_kernel_sizes(cfg.kernel_size, small, len(spec["depths"]))
        kernels = tuple(ks)
    if cfg.fit_kernels:
        fitted = fit_kernel_sizes(kernels, small, int(input_size))
        if fitted != kernels:
            log.info("kernels %s capped to %s for %d px input (same function, less compute)",
                     list(kernels), list(fitted), input_size)
        kernels = fitted
    if cfg.kernel_size or cfg.fit_kernels:
        kw["kernel_size"] = kernels
        kw["small_kernel"] = small
    return slaknet.create_model(name, **kw), ResolvedModel(kernels, small, drop_path)
