"""Loading SLaK checkpoints (official releases and slaknet's own) into models, with readable mismatches.

Reading, the architecture description and the key schema live in :mod:`slaknet.checkpoints` (re-exported
here): the architecture is read off the tensor shapes, the matching model can be built from it, and a
mismatch is reported as "the file looks like X, the model is Y" instead of a wall of missing keys.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Union

import torch.nn as nn

from slaknet.checkpoints.arch import ArchSpec, describe_state_dict
from slaknet.checkpoints.reader import EMA_KEYS, RAW_KEYS, extract_state_dict, read_checkpoint
from slaknet.checkpoints.schema import RENAMED_KEYS
from slaknet.errors import CheckpointError

__all__ = [
    "ArchSpec", "read_checkpoint", "extract_state_dict", "describe_state_dict", "describe_model",
    "load_checkpoint", "RENAMED_KEYS", "RAW_KEYS", "EMA_KEYS",
]

PathLike = Union[str, os.PathLike]


def describe_model(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` of a built model (via its state dict, so both sides are read the same way)."""
    return describe_state_dict(model.state_dict())


def load_checkpoint(model: nn.Module, path_or_state: Union[PathLike, Mapping[str, Any]],
                    use_ema: Optional[bool] = None, strict: bool = True) -> Dict[str, List[str]]:
    """Load official or slaknet weights into ``model``; raise a readable error if they do not fit.

    Returns ``{"missing_keys": [...], "unexpected_keys": [...]}`` (both empty for a strict load).
    """
    obj = read_checkpoint(path_or_state) if isinstance(path_or_state, (str, os.PathLike)) else path_or_state
    sd = extract_state_dict(obj, use_ema=use_ema)
    file_spec = describe_state_dict(sd)
    model_spec = describe_model(model)
    diffs = file_spec.differences(model_spec)
    if diffs and (strict or any(not d.startswith("num_classes") for d in diffs)):
        hint = ("build the matching model with slaknet.create_model(name, checkpoint=path)"
                if not file_spec.reparameterized else
                "build the model, call slaknet.reparameterize_model on it, then load")
        raise CheckpointError("checkpoint does not fit the model.\n  file:  " + file_spec.summary() +
                              "\n  model: " + model_spec.summary() + "\n  differences: " + "; ".join(diffs) +
                              f"\n  hint: {hint}")
    if not strict:  # e.g. a new classifier: skip tensors whose shapes differ
        own = model.state_dict()
        sd = OrderedDict((k, v) for k, v in sd.items() if k not in own or own[k].shape == v.shape)
    result = model.load_state_dict(sd, strict=strict)
    return {"missing_keys": list(result.missing_keys), "unexpected_keys": list(result.unexpected_keys)}
