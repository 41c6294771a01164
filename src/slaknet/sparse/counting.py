"""Sparse-aware parameter and multiply-add counting that reflects the engine's masks.

A thin view on :func:`slaknet.analysis.counting.count_model` (one counter for the whole library).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from slaknet.sparse.selection import unwrap_model

__all__ = ["sparse_counts"]


@torch.no_grad()
def sparse_counts(model: nn.Module, input_size: Optional[Sequence[int]] = None,
                  masks: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, Any]:
    """Dense vs. non-zero parameters and (with ``input_size`` = C,H,W) multiply-adds for one image.

    A weight's non-zero count is its mask's active count when ``masks`` (name -> bool mask, e.g.
    ``engine.masks()``) has it, else its number of non-zero entries. MACs are those of conv and linear
    layers at every output position (padding included): ``macs_dense`` for all weights, ``macs_nonzero``
    for the kept ones; :func:`~slaknet.analysis.counting.count_model` also gives in-bounds figures.
    """
    from slaknet.analysis.counting import count_model

    model = unwrap_model(model)
    if input_size is None:
        params = sum(p.numel() for p in model.parameters())
        nonzero = sum(int(masks[n].sum()) if masks and n in masks else int((p != 0).sum())
                      for n, p in model.named_parameters())
        return {"params_dense": params, "params_nonzero": nonzero}
    c, h, w = input_size
    counts = count_model(model, (h, w), in_chans=c, masks=masks)
    return {"params_dense": counts.params, "params_nonzero": counts.params_nonzero,
            "macs_dense": counts.macs_dense, "macs_nonzero": counts.macs_nonzero_padded}
