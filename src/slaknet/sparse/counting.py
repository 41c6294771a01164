"""Sparse-aware parameter and multiply-add counting (reflects the engine's masks, or actual zeros)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from slaknet.sparse.selection import unwrap_model

__all__ = ["sparse_counts"]

_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@torch.no_grad()
def sparse_counts(model: nn.Module, input_size: Optional[Sequence[int]] = None,
                  masks: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, Any]:
    """Dense vs. non-zero parameters and (with ``input_size`` = C,H,W) multiply-adds for one image.

    A weight's non-zero count is its mask's active count when ``masks`` (name -> bool mask, e.g.
    ``engine.masks()``) has it, else the number of non-zero entries. MACs are counted for conv and
    linear layers only: ``positions * weight_count`` (conv: output positions; linear: input rows per image).
    """
    model = unwrap_model(model)
    masks = dict(masks or {})
    params_dense = 0
    params_nonzero = 0
    weight_nz: Dict[str, int] = {}
    for name, p in model.named_parameters():
        params_dense += p.numel()
        nz = int(masks[name].sum().item()) if name in masks else int((p != 0).sum().item())
        params_nonzero += nz
        weight_nz[name] = nz
    out: Dict[str, Any] = {"params_dense": params_dense, "params_nonzero": params_nonzero}
    if input_size is None:
        return out
    macs = {"dense": 0, "nonzero": 0}
    hooks = []

    def hook(name: str):
        def fn(mod: nn.Module, inp: Any, outp: torch.Tensor) -> None:
            w = mod.weight
            if isinstance(mod, nn.Linear):
                positions = outp.numel() // outp.shape[-1]
            else:
                positions = outp.numel() // (outp.shape[0] * outp.shape[1])
            macs["dense"] += positions * w.numel()
            macs["nonzero"] += positions * weight_nz.get(f"{name}.weight" if name else "weight", w.numel())
            if mod.bias is not None:
                pass  # additions, not multiply-adds
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, _COUNTED) and getattr(mod, "weight", None) is not None:
            hooks.append(mod.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        p0 = next(model.parameters())
        model(torch.zeros(1, *input_size, device=p0.device, dtype=p0.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    out["macs_dense"] = macs["dense"]
    out["macs_nonzero"] = macs["nonzero"]
    return out
