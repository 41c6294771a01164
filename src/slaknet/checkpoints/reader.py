"""The one checkpoint reader: every accepted file layout, wrapper and key spelling, safely.

Files are read with ``torch.load(weights_only=True)`` (plus ``argparse.Namespace``, which official training
checkpoints carry as ``args``) or as safetensors; slaknet's compact sparse safetensors files are decoded to
their dense tensors. Nothing arbitrary is ever unpickled.

:func:`extract_state_dict` then finds the model's tensors inside whatever the file holds: a plain state
dict, or one under ``model`` / ``state_dict`` / ``model_state_dict`` / ``module`` / ``net`` / ``params``
(raw weights) or ``model_ema`` / ``state_dict_ema`` (EMA weights), nested up to three levels, with
``module.`` (DDP), ``_orig_mod.`` (torch.compile) and a ``model.`` wrapper prefix removed and the names of
older releases renamed (``Decom1`` -> ``LoRA1``; :mod:`slaknet.checkpoints.schema`).
"""
from __future__ import annotations

import argparse
import os
import pickle
from collections import OrderedDict
from typing import Any, Mapping, Optional, Union

import torch

from slaknet.checkpoints.schema import rename_key
from slaknet.errors import CheckpointError

__all__ = ["CheckpointNotFoundError", "read_checkpoint", "extract_state_dict", "read_state_dict", "normalize_key",
           "RAW_KEYS", "EMA_KEYS", "first_line"]

PathLike = Union[str, os.PathLike]
# Where files keep the state dict, in order of preference for raw and EMA weights.
RAW_KEYS = ("model", "state_dict", "model_state_dict", "module", "net", "params")
EMA_KEYS = ("model_ema", "state_dict_ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MODEL_TOP = ("stages", "downsample_layers", "stem", "norm", "head")  # "model." is stripped only before these


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not name a file."""


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (for one-line errors that wrap a library's exception)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def read_checkpoint(path: PathLike) -> Any:
    """Load a checkpoint file without unpickling arbitrary objects (``.safetensors`` or torch zip/pickle)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint not found: {path} (the file does not exist)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        from slaknet.checkpoints.sparse_format import is_sparse_checkpoint, load_sparse_checkpoint

        if is_sparse_checkpoint(path):  # slaknet's compact sparse format: decoded to the dense tensors
            return load_sparse_checkpoint(path).state_dict
        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read checkpoint {path}: not a readable safetensors file "
                                  f"({first_line(exc)})") from exc
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc).replace(" ", "_").lower():
            raise CheckpointError(
                f"cannot read checkpoint {path}: it holds pickled Python objects, not only tensors; slaknet never unpickles arbitrary objects; re-save the state dict alone "
                "(torch.save(model.state_dict(), ...)) or as safetensors") from exc
        reason = first_line(exc).split(". ")[0]
        raise CheckpointError(f"cannot read checkpoint {path}: the file is damaged or not a PyTorch checkpoint "
                              f"({reason}); copy or download it again") from exc


def normalize_key(key: str) -> str:
    """A state-dict key without wrapper prefixes (``module.``, ``_orig_mod.``, ``model.``) and old names."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
        if key.startswith("model.") and key[len("model."):].split(".")[0] in _MODEL_TOP:
            key, changed = key[len("model."):], True
    return rename_key(key)


def _is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    if any(isinstance(obj.get(k), Mapping) for k in RAW_KEYS + EMA_KEYS):
        return False
    return sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


def _find(obj: Mapping, keys: tuple) -> Optional[Mapping]:
    current: Any = obj
    for _ in range(3):  # nested wrappers, e.g. {"state_dict": {"model": {...}}}
        inner = next((current[k] for k in keys if isinstance(current.get(k), Mapping)), None)
        if inner is None:
            return None
        if _is_state_dict(inner):
            return inner
        current = inner
    return None


def extract_state_dict(obj: Any, use_ema: Optional[bool] = None) -> "OrderedDict[str, torch.Tensor]":
    """The model state dict inside a checkpoint object, keys normalised (module docstring).

    ``use_ema``: True takes EMA weights (``model_ema``/``state_dict_ema``), False the raw ones, None the raw
    ones when present, else EMA.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict or a dict holding one, got {type(obj).__name__}")
    if _is_state_dict(obj):
        if use_ema:
            raise CheckpointError("EMA weights were requested, but the file holds a single plain state dict")
        sd: Mapping = obj
    else:
        raw, ema = _find(obj, RAW_KEYS), _find(obj, EMA_KEYS)
        keys = f"(keys: {sorted(map(str, obj))[:10]})"
        if use_ema is True and ema is None:
            raise CheckpointError(f"EMA weights were requested, but the file has none {keys}")
        if use_ema is False and raw is None:
            raise CheckpointError(f"raw weights were requested, but the file has none {keys}")
        found = ema if use_ema else raw if use_ema is False else (raw if raw is not None else ema)
        if found is None:
            raise CheckpointError("no state dict found: expected tensors at the top level or under one of "
                                  f"{RAW_KEYS + EMA_KEYS} {keys}")
        sd = found
    return OrderedDict((normalize_key(str(k)), v) for k, v in sd.items() if isinstance(v, torch.Tensor))


def read_state_dict(path: PathLike, use_ema: Optional[bool] = None) -> "OrderedDict[str, torch.Tensor]":
    """:func:`read_checkpoint` + :func:`extract_state_dict`."""
    return extract_state_dict(read_checkpoint(path), use_ema=use_ema)
