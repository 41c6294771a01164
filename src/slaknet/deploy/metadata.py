"""The model record stored with exported and converted files (variant, architecture, sparsity, preprocessing)."""
from __future__ import annotations

import datetime as _dt
import hashlib
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["model_metadata", "weight_sparsity", "file_sha256"]


def weight_sparsity(model_or_state: Any) -> float:
    """Fraction of exact zeros over all conv / linear weights (tensors with 2+ dims named ``*weight``)."""
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    zeros = total = 0
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2 and k.endswith("weight"):
            zeros += int((v == 0).sum())
            total += v.numel()
    return zeros / total if total else 0.0


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def model_metadata(model: nn.Module, class_names: Optional[Sequence[str]] = None,
                   **extra: Any) -> Dict[str, Any]:
    """A JSON-serialisable record of ``model``: variant, architecture, sparsity, classes, preprocessing.

    ``extra`` entries (e.g. ``source=...`` provenance) are added as given.
    """
    from slaknet import __version__

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if num_classes and len(class_names) != num_classes:
            from slaknet.errors import ConfigError

            raise ConfigError(f"{len(class_names)} class names for a model with {num_classes} classes")
    reparam = sorted({m.reparameterized for m in model.modules()
                      if getattr(m, "reparameterized", None) is not None})
    meta: Dict[str, Any] = {
        "variant": cfg.get("architecture"),
        "depths": list(getattr(model, "depths", []) or []),
        "widths": list(getattr(model, "dims", []) or []),
        "kernel_sizes": list(getattr(model, "kernel_sizes", []) or []),
        "small_kernel": getattr(model, "small_kernel", None),
        "decompose": getattr(model, "decompose", None),
        "width_factor": getattr(model, "width_factor", None),
        "num_classes": num_classes,
        "class_names": class_names,
        "reparameterized": reparam[0] if reparam else None,
        "sparsity": round(weight_sparsity(model), 6),
        "preprocessing": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()
                          if k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")},
        "slaknet_version": __version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra)
    return meta
